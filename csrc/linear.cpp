// Skinny fp32 GEMM for the CPU runtime: y[M, N] = x[M, K] . w[N, K]^T (+ bias), M small (decode and
// verification forwards: 1 to a few dozen tokens).
//
// Why: a verification forward multiplies a handful of token rows by every weight matrix, so it is bound
// by reading the weights once. General BLAS kernels pack and tile for large M and, on this machine class,
// read the weights at a few GB/s for 2 <= M <= 32. Here each block of 4 weight rows is streamed from
// memory once and then reused from L1 for every token row (tiles of 4 weight rows x 2 token rows = 8
// vector accumulators), so the cost stays near one pass over the weights until the FMAs become the limit.
// Threads split N. Accumulation is in fp32 in a fixed order per output (8 lanes, then a horizontal sum):
// the result does not depend on the number of threads.
#include <cstdint>
#include <cstring>

#include "common.h"
#include "kernels.h"

namespace spd {
namespace {

__attribute__((always_inline)) inline float hsum(f8v v) {
  float s = 0.f;
  for (int l = 0; l < 8; ++l) s += v[l];
  return s;
}

// Software prefetch of a later weight block, spread evenly over every pass of the current block. With
// M > 2 rows a block is read from memory in the first pass and from L1 in the others; without this the
// weight stream stops during those passes and the time is memory + compute instead of the larger of the
// two (measured here: 5 and 9 rows ~25% faster, 5 rows then cost about what 1 row does).
constexpr int64_t kPrefetchBlocks = 2;  // how far ahead, in blocks of 4 weight rows

struct Prefetcher {
  const char* base = nullptr;
  int64_t lines = 0, iters = 1, issued = 0, it = 0;
  Prefetcher(const float* next, int64_t bytes, int64_t total_iters) {
    if (next) {
      base = reinterpret_cast<const char*>(next);
      lines = (bytes + 63) / 64;
      iters = total_iters > 0 ? total_iters : 1;
    }
  }
  __attribute__((always_inline)) void step() {  // one inner iteration done: issue the lines now due
    ++it;
    while (issued < lines && issued * iters < it * lines) __builtin_prefetch(base + 64 * issued++, 0, 3);
  }
};
// nr weight rows (1..4) starting at w, all M token rows; K % 8 handled by a scalar tail. next: the block
// to prefetch (or null).
template <bool kPin>
__attribute__((always_inline)) inline void tile_impl(const float* x, int64_t ldx, const float* w, int64_t K,
                                                     int nr, int64_t M, float* y, int64_t ldy, const float* bias,
                                                     const float* next) {
  const int64_t Km = K - K % 8;
  const float* wr[4];
  for (int j = 0; j < 4; ++j) wr[j] = w + (j < nr ? j : 0) * K;  // unused rows alias row 0 (results dropped)
  Prefetcher pf(next, 4 * K * static_cast<int64_t>(sizeof(float)), (M + 1) / 2 * (Km / 8));
  int64_t m = 0;
  for (; m + 2 <= M; m += 2) {
    const float* x0 = x + m * ldx;
    const float* x1 = x0 + ldx;
    f8v a00{}, a01{}, a02{}, a03{}, a10{}, a11{}, a12{}, a13{};
    for (int64_t k = 0; k < Km; k += 8) {
      pf.step();
      f8v u = load_f8(x0 + k), v = load_f8(x1 + k);
      f8v w0 = load_f8(wr[0] + k), w1 = load_f8(wr[1] + k), w2 = load_f8(wr[2] + k), w3 = load_f8(wr[3] + k);
      pin<kPin>(w0), pin<kPin>(w1), pin<kPin>(w2), pin<kPin>(w3), pin<kPin>(u), pin<kPin>(v);
      a00 += u * w0; a01 += u * w1; a02 += u * w2; a03 += u * w3;
      a10 += v * w0; a11 += v * w1; a12 += v * w2; a13 += v * w3;
    }
    float r0[4] = {hsum(a00), hsum(a01), hsum(a02), hsum(a03)};
    float r1[4] = {hsum(a10), hsum(a11), hsum(a12), hsum(a13)};
    for (int64_t k = Km; k < K; ++k)
      for (int j = 0; j < 4; ++j) { r0[j] += x0[k] * wr[j][k]; r1[j] += x1[k] * wr[j][k]; }
    for (int j = 0; j < nr; ++j) {
      const float b = bias ? bias[j] : 0.f;
      y[m * ldy + j] = r0[j] + b;
      y[(m + 1) * ldy + j] = r1[j] + b;
    }
  }
  if (m < M) {
    const float* x0 = x + m * ldx;
    f8v a0{}, a1{}, a2{}, a3{};
    for (int64_t k = 0; k < Km; k += 8) {
      pf.step();
      const f8v u = load_f8(x0 + k);
      a0 += u * load_f8(wr[0] + k); a1 += u * load_f8(wr[1] + k);
      a2 += u * load_f8(wr[2] + k); a3 += u * load_f8(wr[3] + k);
    }
    float r0[4] = {hsum(a0), hsum(a1), hsum(a2), hsum(a3)};
    for (int64_t k = Km; k < K; ++k)
      for (int j = 0; j < 4; ++j) r0[j] += x0[k] * wr[j][k];
    for (int j = 0; j < nr; ++j) y[m * ldy + j] = r0[j] + (bias ? bias[j] : 0.f);
  }
}

void tile_base(const float* x, int64_t ldx, const float* w, int64_t K, int nr, int64_t M, float* y, int64_t ldy,
               const float* bias, const float* next) {
  tile_impl<false>(x, ldx, w, K, nr, M, y, ldy, bias, next);
}
using TileFn = void (*)(const float*, int64_t, const float*, int64_t, int, int64_t, float*, int64_t, const float*,
                        const float*);

SPD_V3 void tile_v3(const float* x, int64_t ldx, const float* w, int64_t K, int nr, int64_t M, float* y,
                    int64_t ldy, const float* bias, const float* next) {
  tile_impl<kHaveV3>(x, ldx, w, K, nr, M, y, ldy, bias, next);
}
TileFn pick_tile() { return has_v3() ? tile_v3 : tile_base; }

}  // namespace

void skinny_linear_f32(std::uintptr_t x_, int64_t ldx, std::uintptr_t w_, std::uintptr_t bias_,
                       std::uintptr_t y_, int64_t ldy, int64_t M, int64_t N, int64_t K) {
  const float* x = ptr<const float>(x_);
  const float* w = ptr<const float>(w_);
  const float* bias = bias_ ? ptr<const float>(bias_) : nullptr;
  float* y = ptr<float>(y_);
  const TileFn tile = pick_tile();  // x86-64-v3 (AVX2 + FMA) when the CPU has it (and the ISA cap allows)
  const int64_t nblocks = (N + 3) / 4;
  parallel_for_each(nblocks, 1, [&](int64_t bi) {
    const int64_t n = bi * 4;
    const int nr = static_cast<int>(N - n < 4 ? N - n : 4);
    tile(x, ldx, w + n * K, K, nr, M, y + n, ldy, bias ? bias + n : nullptr,
         n + 4 * kPrefetchBlocks < N ? w + (n + 4 * kPrefetchBlocks) * K : nullptr);
  });
}

}  // namespace spd
