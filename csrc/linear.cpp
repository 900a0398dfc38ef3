// Skinny fp32 GEMM for the CPU runtime: y[M, N] = x[M, K] . w[N, K]^T (+ bias), M small (decode and
// verification forwards: 1 to a few dozen tokens).
//
// Why: a verification forward multiplies a handful of token rows by every weight matrix, so it is bound
// by reading the weights once. General BLAS kernels pack and tile for large M and, on this machine class,
// read the weights at a few GB/s for 2 <= M <= 32. Here each block of 4 weight rows is streamed from
// memory once and then reused from L1 for every token row (tiles of 4 weight rows x up to 3 token rows of 8
// lanes on AVX2, 4 x 4 of 16 lanes on AVX-512), so the cost stays near one pass over the weights until the FMAs
// become the limit. Threads split N. Accumulation is in fp32 in a fixed order per output (the lanes over k, then
// the lanes summed as a fixed tree, then the K tail): the result depends neither on the number of threads nor on M.
//
// Compact weights (skinny_linear_packed): each block of 4 weight rows is read in a smaller exact form (fp16, or
// GGUF-style blocks of 32 along K: Q8_0 = int8 x scale, Q4_1 = 4-bit x scale + min) and widened once into a
// per-thread fp32 buffer that the same fp32 tile then reads; on AVX2 the first pass of 1 to 3 token rows widens in
// registers as it multiplies instead (block_row1; block_pass, fp16 too, for K % 32 == 0), and on AVX-512 (K % 32 ==
// 0) 1 to 8 rows (block_pass16 for 1-4, block_pairs16 for 5-8), else a first pass of 4 rows (block_pass16),
// storing to the buffer only for later passes. Widening is exact given GGUF's binary16 scales: an fp16 value is an
// fp32 value; scale x int8 is one rounded product (exact for a binary16 scale); scale x nibble is exact for a
// binary16 scale, so Q4_1 adds its min with one rounding, FMA or not (with other fp32 scales the AVX paths round
// scale x nibble + min once and the baseline path twice). The accumulation order is the fp32 kernel's, so y is bit
// for bit what the fp32 kernel gives for the widened weights, with 2x (fp16), ~3.8x (Q8_0) or ~6.4x (Q4_1) fewer
// bytes to stream.
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "common.h"
#include "kernels.h"

namespace spd {
namespace {

__attribute__((always_inline)) inline float hsum(f8v v) {
  float s = 0.f;
  for (int l = 0; l < 8; ++l) s += v[l];
  return s;
}

// Software prefetch of a later weight block, spread evenly over the passes of the current block (the AVX2 paths
// that widen in registers issue it all in their first pass). With
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
struct Args {
  const float* x;
  int64_t ldx;
  const void* w;
  const float* scale;
  const float* min;
  const float* bias;
  float* y;
  int64_t ldy, M, N, K;
};

namespace base {
constexpr bool kAvx = false, kAvx512 = false;
#include "linear_kernel.inc"
}  // namespace base

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define SPD_LINEAR_V3 1
#pragma GCC push_options
#pragma GCC target("arch=x86-64-v3")
namespace v3 {
constexpr bool kAvx = true, kAvx512 = false;
#include "linear_kernel.inc"
}  // namespace v3
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("arch=x86-64-v3,avx512f,avx512dq,avx512bw,avx512vl")
namespace v4 {
constexpr bool kAvx = true, kAvx512 = true;
#include "linear_kernel.inc"
}  // namespace v4
#pragma GCC pop_options
#endif

using BlockFn = void (*)(const Args&, int64_t, int);

// Every block of 4 weight rows, threads splitting N; the AVX-512 copy (16-lane tile) or the x86-64-v3 copy
// (AVX2 + FMA + F16C) when the CPU has it (and the ISA cap allows).
void run_blocks(const Args& a, BlockFn base_fn, BlockFn v3_fn, BlockFn v4_fn) {
  const int isa = isa_level();
  const BlockFn fn = v4_fn != nullptr && isa >= kIsaV4 ? v4_fn : v3_fn != nullptr && isa >= kIsaV3 ? v3_fn : base_fn;
  parallel_for_each((a.N + 3) / 4, 1, [&](int64_t bi) {
    const int64_t n0 = bi * 4;
    fn(a, n0, static_cast<int>(a.N - n0 < 4 ? a.N - n0 : 4));
  });
}

#ifdef SPD_LINEAR_V3
#define SPD_BLOCKS(kFmt) base::block_fn<kFmt>, v3::block_fn<kFmt>, v4::block_fn<kFmt>
#define SPD_WIDEN(kFmt) base::widen_fn<kFmt>, v3::widen_fn<kFmt>, v4::widen_fn<kFmt>
#else
#define SPD_BLOCKS(kFmt) base::block_fn<kFmt>, nullptr, nullptr
#define SPD_WIDEN(kFmt) base::widen_fn<kFmt>, nullptr, nullptr
#endif

}  // namespace

void skinny_linear_f32(std::uintptr_t x_, int64_t ldx, std::uintptr_t w_, std::uintptr_t bias_,
                       std::uintptr_t y_, int64_t ldy, int64_t M, int64_t N, int64_t K) {
  skinny_linear_packed(x_, ldx, kWeightF32, w_, 0, 0, bias_, y_, ldy, M, N, K);
}

void skinny_linear_packed(std::uintptr_t x_, int64_t ldx, int fmt, std::uintptr_t w_, std::uintptr_t scale_,
                          std::uintptr_t min_, std::uintptr_t bias_, std::uintptr_t y_, int64_t ldy, int64_t M, int64_t N,
                          int64_t K) {
  if (M <= 0 || N <= 0) return;  // (the paths that widen in registers assume at least one token row)
  const Args a{ptr<const float>(x_), ldx, ptr<const void>(w_), scale_ ? ptr<const float>(scale_) : nullptr,
               min_ ? ptr<const float>(min_) : nullptr, bias_ ? ptr<const float>(bias_) : nullptr, ptr<float>(y_),
               ldy, M, N, K};
  switch (fmt) {
    case kWeightF32: run_blocks(a, SPD_BLOCKS(kWeightF32)); break;
    case kWeightF16: run_blocks(a, SPD_BLOCKS(kWeightF16)); break;
    case kWeightQ8_0: run_blocks(a, SPD_BLOCKS(kWeightQ8_0)); break;
    default: run_blocks(a, SPD_BLOCKS(kWeightQ4_1));
  }
}

void widen_packed(int fmt, std::uintptr_t w_, std::uintptr_t scale_, std::uintptr_t min_, std::uintptr_t out_,
                  int64_t N, int64_t K) {
  const Args a{nullptr, 0, ptr<const void>(w_), scale_ ? ptr<const float>(scale_) : nullptr,
               min_ ? ptr<const float>(min_) : nullptr, nullptr, ptr<float>(out_), K, 0, N, K};
  switch (fmt) {
    case kWeightF16: run_blocks(a, SPD_WIDEN(kWeightF16)); break;
    case kWeightQ8_0: run_blocks(a, SPD_WIDEN(kWeightQ8_0)); break;
    default: run_blocks(a, SPD_WIDEN(kWeightQ4_1));
  }
}

}  // namespace spd
