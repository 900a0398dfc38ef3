// Vectorised exp (see vec_exp.h).
#include "vec_exp.h"

#include <cstring>

#include "common.h"

#if SPD_HAVE_V4
#include <immintrin.h>
#endif

namespace spd {
namespace {

#include "vec_exp2.inc"

}  // namespace

// w <- exp((xs - m) / T), computed as 2^((xs - m) * (log2 e / T)); returns the sum in double. The
// polynomial is latency-bound without FMA: an x86-64-v3 clone contracts it into FMAs (results may
// differ from the default clone in the last bit, which only moves floating-point boundary cases).
SPD_V3_CLONES double exp_weights_v3(const float* xs, int64_t V, float m, float T, float* w) {
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

#if SPD_HAVE_V4
// The same for AVX-512, 16 lanes: the same exponential as exp_weights_v3's x86-64-v3 clone (n = round(y), the
// same degree-6 polynomial on f = y - n in FMAs, exact 2^0 = 1, one rounding when scaling by 2^n, which
// vscalefps does in one instruction, subnormals included; y < -151 and -inf give 0), so the weights are
// bit-identical to that clone's and 3x faster; the mass is summed in double, 16 lanes. Ragged tail: masked.
SPD_V4 double exp_weights_v4(const float* xs, int64_t V, float m, float T, float* w) {
  const __m512 vm = _mm512_set1_ps(m), scale = _mm512_set1_ps(1.44269504088896341f / T);
  const __m512 lo = _mm512_set1_ps(-151.0f), ninf = _mm512_set1_ps(-__builtin_inff());
  __m512d s0 = _mm512_setzero_pd(), s1 = s0;
  for (int64_t i = 0; i < V; i += 16) {
    const __mmask16 live = V - i >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (V - i)) - 1);
    const __m512 x = _mm512_mask_loadu_ps(ninf, live, xs + i);  // padding lanes: -inf, weight 0
    const __m512 y = _mm512_max_ps(_mm512_mul_ps(_mm512_sub_ps(x, vm), scale), lo);
    const __m512 n = _mm512_roundscale_ps(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 f = _mm512_sub_ps(y, n);
    __m512 p = _mm512_fmadd_ps(f, _mm512_set1_ps(1.53533620e-4f), _mm512_set1_ps(1.33988750e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.61843692e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.55033237e-2f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.40226477e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.93147182e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
    const __m512 e = _mm512_scalef_ps(p, n);
    _mm512_mask_storeu_ps(w + i, live, e);
    s0 = _mm512_add_pd(s0, _mm512_cvtps_pd(_mm512_castps512_ps256(e)));
    s1 = _mm512_add_pd(s1, _mm512_cvtps_pd(_mm512_extractf32x8_ps(e, 1)));
  }
  return _mm512_reduce_add_pd(_mm512_add_pd(s0, s1));
}
#endif

double exp_weights(const float* xs, int64_t V, float m, float T, float* w) {
#if SPD_HAVE_V4
  if (isa_level() >= kIsaV4) return exp_weights_v4(xs, V, m, T, w);
#endif
  return exp_weights_v3(xs, V, m, T, w);
}

}  // namespace spd
