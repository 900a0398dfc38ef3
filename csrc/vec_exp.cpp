// Vectorised exp (see vec_exp.h).
#include "vec_exp.h"

#include <cstring>

#include "common.h"

namespace spd {
namespace {

#include "vec_exp2.inc"

}  // namespace

// w <- exp((xs - m) / T), computed as 2^((xs - m) * (log2 e / T)); returns the sum in double. The
// polynomial is latency-bound without FMA: an x86-64-v3 clone contracts it into FMAs (results may
// differ from the default clone in the last bit, which only moves floating-point boundary cases).
SPD_V3_CLONES double exp_weights(const float* xs, int64_t V, float m, float T, float* w) {
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
