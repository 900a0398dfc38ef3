// The runtime's per-layer elementwise steps on the CPU, each one pass instead of a chain of torch ops: RMSNorm
// (torch's CPU rms_norm runs ~8 ops: pow, mean, add, rsqrt, two multiplies and casts) and the rotary embedding
// (7 ops: two slices, a negation, a concatenation, two multiplies and an add). At decoding sizes (one row of 576
// values, 9 heads of 64) those are microseconds of dispatch each, twice per layer.
//
// Compiled with -ffp-contract=off (CMakeLists.txt sets it for this file, whatever -march a build adds), so the
// rotary embedding rounds every product and sum as torch's ops do and equals them bit for bit. RMSNorm sums the
// squares in double (torch: fp32 pairwise sums), so its scale can differ from torch's by an ulp; each row's result
// depends on that row alone.
#include <algorithm>
#include <cmath>
#include <cstdint>

#include <ATen/Parallel.h>

#include "kernels.h"

namespace spd {

void rms_norm_f32(const float* x, int64_t ldx, const float* w, float* y, int64_t T, int64_t N, double eps) {
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(N, 1));  // decoding rows: one thread
  at::parallel_for(0, T, grain, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      const float* xr = x + t * ldx;
      float* yr = y + t * N;
      double s0 = 0.0, s1 = 0.0;  // two chains (even / odd index)
      int64_t i = 0;
      for (; i + 2 <= N; i += 2) {
        s0 += static_cast<double>(xr[i]) * xr[i];
        s1 += static_cast<double>(xr[i + 1]) * xr[i + 1];
      }
      if (i < N) s0 += static_cast<double>(xr[i]) * xr[i];
      const float r = static_cast<float>(1.0 / std::sqrt((s0 + s1) / static_cast<double>(N) + eps));
      for (int64_t j = 0; j < N; ++j) yr[j] = (xr[j] * r) * w[j];  // torch's order: (x * rsqrt) * weight
    }
  });
}

void rotary_f32(const float* x, int64_t sx_t, int64_t sx_h, const float* cos, const float* sin, int64_t sc_t,
                float* y, int64_t T, int64_t H, int64_t D) {
  const int64_t half = D / 2;
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(H * D, 1));
  at::parallel_for(0, T, grain, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      const float* c = cos + t * sc_t;
      const float* s = sin + t * sc_t;
      for (int64_t h = 0; h < H; ++h) {
        const float* xr = x + t * sx_t + h * sx_h;
        float* yr = y + (t * H + h) * D;
        for (int64_t d = 0; d < half; ++d) {  // x * cos + cat(-x2, x1) * sin, each step rounded
          const float a = xr[d] * c[d], m = -xr[d + half] * s[d];
          yr[d] = a + m;
        }
        for (int64_t d = half; d < D; ++d) {
          const float a = xr[d] * c[d], m = xr[d - half] * s[d];
          yr[d] = a + m;
        }
      }
    }
  });
}

}  // namespace spd
