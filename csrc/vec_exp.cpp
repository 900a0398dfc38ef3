// Vectorised exp (see vec_exp.h).
#include "vec_exp.h"

#include <cstring>

#include "common.h"

namespace spd {
namespace {

// 2^y for 8 lanes, y <= 0: y = n + f with n = round(y), |f| <= 1/2; 2^f by its Taylor polynomial of
// degree 7 in f * ln 2 (truncation below 2^-27 relative: ~1 ulp overall); 2^n by two exponent-field
// scalings so that subnormal results are right. y < -151 (and -inf) gives 0.
inline f8v exp2_8_nonpos(f8v y) {
  y = y < -151.0f ? f8v{} - 151.0f : y;
  const f8v t = y + 0.5f;
  i8v n = __builtin_convertvector(t, i8v);  // truncation: floor for t >= 0, ceil for t < 0
  n = (__builtin_convertvector(n, f8v) > t) ? n - 1 : n;
  const f8v g = (y - __builtin_convertvector(n, f8v)) * 0.693147180559945309f;
  f8v p = g * 1.98412698412698413e-4f + 1.38888888888888889e-3f;
  p = p * g + 8.33333333333333333e-3f;
  p = p * g + 4.16666666666666667e-2f;
  p = p * g + 1.66666666666666667e-1f;
  p = p * g + 0.5f;
  p = p * g + 1.0f;
  p = p * g + 1.0f;
  const i8v h = n >> 1;
  const i8v s1 = (h + 127) << 23, s2 = (n - h + 127) << 23;
  return p * reinterpret_cast<const f8v&>(s1) * reinterpret_cast<const f8v&>(s2);
}

}  // namespace

// w <- exp((xs - m) / T), computed as 2^((xs - m) * (log2 e / T)); returns the sum in double. The
// polynomial is latency-bound without FMA: an x86-64-v3 clone contracts it into FMAs (results may
// differ from the default clone in the last bit, which only moves floating-point boundary cases).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("arch=x86-64-v3", "default"), optimize("fp-contract=fast")))
#endif
double exp_weights(const float* xs, int64_t V, float m, float T, float* w) {
  typedef double d4v __attribute__((vector_size(32)));
  typedef float f4v __attribute__((vector_size(16)));
  const float scale = 1.44269504088896341f / T;
  d4v s0{}, s1{};
  const int64_t Vm = V - V % 8;
  for (int64_t i = 0; i < Vm; i += 8) {
    f8v x;
    std::memcpy(&x, xs + i, sizeof x);
    const f8v e = exp2_8_nonpos((x - m) * scale);
    std::memcpy(w + i, &e, sizeof e);
    const f4v lo = {e[0], e[1], e[2], e[3]}, hi = {e[4], e[5], e[6], e[7]};
    s0 += __builtin_convertvector(lo, d4v);
    s1 += __builtin_convertvector(hi, d4v);
  }
  double s = (s0[0] + s0[1]) + (s0[2] + s0[3]) + (s1[0] + s1[1]) + (s1[2] + s1[3]);
  if (Vm < V) {
    f8v x = f8v{} - __builtin_inff();
    std::memcpy(&x, xs + Vm, (V - Vm) * sizeof(float));
    const f8v e = exp2_8_nonpos((x - m) * scale);
    for (int64_t i = Vm; i < V; ++i) {
      w[i] = e[i - Vm];
      s += w[i];
    }
  }
  return s;
}

}  // namespace spd
