// tree_attention on the CPU: flash-attention style over the paged KV cache, read in place.
//
// One work item = (request, KV head). Its G query heads x q_len query tokens are packed into one block of
// rows (so every K/V position is read once per KV head, not once per query head), transposed to [D][rows]
// and scaled by the softmax scale times log2(e). The KV positions are visited in tiles of kTile: scores of
// all rows against the tile, an online softmax (running max m, running sum l, fp32 accumulator), no
// [q, L] matrix. Positions before the request's query tokens need no mask; the last q_len positions apply
// the tree bits (or causality when there is no mask). Work is spread over torch's intra-op threads; when there
// are few items (batch 1, few KV heads) each item's KV range is split into chunks whose partial
// (m, l, acc) states are merged at the end (flash-decoding), so every core has work.
//
// The tile loop lives in tree_attention_kernel.inc, compiled twice: for baseline x86-64 and for
// x86-64-v3 (AVX2 + FMA), chosen once at run time from the CPU's features.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "common.h"
#include "kernels.h"
#include "vec_exp.h"

namespace spd {
namespace {

constexpr int kTile = 64;      // KV positions per tile (a multiple of 8: the QK micro-kernels' position groups)
constexpr int kRowBlock = 32;  // packed query rows per block (a multiple of 8): queries, scores and tile stay in cache

template <int kCode>
inline float load_elem(const void* p, int64_t i);
template <>
inline float load_elem<kF32>(const void* p, int64_t i) { return static_cast<const float*>(p)[i]; }
template <>
inline float load_elem<kBF16>(const void* p, int64_t i) { return bf16_to_f32(static_cast<const uint16_t*>(p)[i]); }
template <>
inline float load_elem<kF16>(const void* p, int64_t i) { return f16_to_f32(static_cast<const uint16_t*>(p)[i]); }

inline uint16_t f32_to_bf16(float f) {  // round to nearest even; NaN stays NaN
  uint32_t b;
  std::memcpy(&b, &f, 4);
  if ((b & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<uint16_t>((b >> 16) | 0x40u);
  b += 0x7FFFu + ((b >> 16) & 1u);
  return static_cast<uint16_t>(b >> 16);
}

inline uint16_t f32_to_f16(float f) {
  _Float16 h = static_cast<_Float16>(f);  // IEEE round to nearest even (GCC >= 12 on x86-64)
  uint16_t b;
  std::memcpy(&b, &h, 2);
  return b;
}

template <int kCode>
inline void store_elem(void* p, int64_t i, float v) {
  if constexpr (kCode == kF32) static_cast<float*>(p)[i] = v;
  else if constexpr (kCode == kBF16) static_cast<uint16_t*>(p)[i] = f32_to_bf16(v);
  else static_cast<uint16_t*>(p)[i] = f32_to_f16(v);
}

struct Args {
  const void* q; const void* k; const void* v; void* out;
  const int32_t* block_table; const int32_t* kv_lens; const int32_t* cu_q; const int32_t* mask;
  int64_t R, Hq, Hkv, D, block_size, max_blocks, mask_words;
  int64_t q_stride_t, q_stride_h, o_stride_t, o_stride_h;  // in elements
  float scale;
  // cache strides of the block, slot and head dims, in elements (the head dim is unit-stride): K and V may be
  // views of one fused cache, read in place
  int64_t k_stride_b, k_stride_s, k_stride_h, v_stride_b, v_stride_s, v_stride_h;
  int block_shift;  // log2(block_size) (a power of two): a position's page and slot by shift and mask, no division
};

// Partial softmax state of one chunk of KV positions for the rows of one item (m and l in the log2 domain,
// padded to whole row blocks; acc [rows][D]).
struct State {
  std::vector<float> m, l, acc;
  void init(int64_t rows, int64_t RP, int64_t D) {
    m.assign(RP, -std::numeric_limits<float>::infinity());
    l.assign(RP, 0.f);
    acc.assign(rows * D, 0.f);
  }
};

namespace base {
constexpr bool kAvx = false;
#include "tree_attention_kernel.inc"
}  // namespace base

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define SPD_TA_V3 1
#pragma GCC push_options
#pragma GCC target("arch=x86-64-v3")
namespace v3 {
constexpr bool kAvx = true;
#include "tree_attention_kernel.inc"
}  // namespace v3
#pragma GCC pop_options
#endif

using ChunkFn = void (*)(const Args&, int64_t, int64_t, int64_t, int64_t, const float*, int64_t, int64_t, State&,
                         float*, float*, const float*, float*, float*);

template <int kCode>
ChunkFn pick_chunk_fn() {
#ifdef SPD_TA_V3
  if (has_v3()) return v3::attend_chunk<kCode>;
#endif
  return base::attend_chunk<kCode>;
}

template <int kCode>
void run(const Args& a) {
  const int64_t num_threads = at::get_num_threads();
  const ChunkFn chunk_fn = pick_chunk_fn<kCode>();  // per call: follows the ISA cap
  const int64_t G = a.Hq / a.Hkv, D = a.D;
  const int64_t items = a.R * a.Hkv;
  int64_t max_ql = 0, max_L = 0;
  for (int64_t r = 0; r < a.R; ++r) {
    max_ql = std::max<int64_t>(max_ql, a.cu_q[r + 1] - a.cu_q[r]);
    max_L = std::max<int64_t>(max_L, a.kv_lens[r]);
  }
  const int64_t max_blocks = (G * max_ql + kRowBlock - 1) / kRowBlock;  // row blocks of the largest request
  // Split every item's KV range into `chunks` pieces of whole tiles when there are too few items to give
  // every thread several (dynamic scheduling then balances items of different lengths).
  int64_t chunks = 1;
  if (num_threads > 1 && items > 0 && items < 4 * num_threads)
    chunks = std::max<int64_t>(1, std::min<int64_t>((4 * num_threads + items - 1) / items,
                                                    (max_L + kTile - 1) / kTile));
  const int64_t work = items * chunks;
  std::vector<State> states(work);
  parallel_dynamic(work, [&] {
    // per-worker scratch, owned by the function the worker calls for each item
    const int64_t wide = kCode == kF32 ? 0 : kTile * D;
    return [&, kbuf = std::vector<float>(wide), vbuf = std::vector<float>(wide), zero = std::vector<float>(D, 0.f),
            sc = std::vector<float>((kTile + 12) * kRowBlock), corr = std::vector<float>(kRowBlock),
            qT = std::vector<float>(max_blocks * kRowBlock * D)](int64_t w) mutable {
      const int64_t item = w / chunks, c = w % chunks;
      const int64_t r = item / a.Hkv, h = item % a.Hkv;
      const int64_t q0 = a.cu_q[r], ql = a.cu_q[r + 1] - q0;
      if (ql == 0) return;
      const int64_t L = a.kv_lens[r], rows = G * ql;
      const int64_t per = ((L + chunks - 1) / chunks + kTile - 1) / kTile * kTile;
      const int64_t lo = std::min(L, c * per), hi = std::min(L, lo + per);
      states[w].init(rows, (rows + kRowBlock - 1) / kRowBlock * kRowBlock, D);
      if (lo >= hi) return;
      // queries of row block b at qT + b * kRowBlock * D, as [D][RP_b] (RP_b = its rows rounded up to 8)
      const float qs = a.scale * 1.44269504088896341f;  // log2(e): the kernel works with exp2
      // zero this request's row blocks only (padding rows must be 0; the buffer is sized for the largest)
      std::fill(qT.begin(), qT.begin() + (rows + kRowBlock - 1) / kRowBlock * kRowBlock * D, 0.f);
      for (int64_t row = 0; row < rows; ++row) {
        const int64_t g = row / ql, i = row % ql, row0 = row / kRowBlock * kRowBlock;
        const int64_t RP = (std::min(rows - row0, int64_t{kRowBlock}) + 7) / 8 * 8;
        float* dst = qT.data() + row0 * D + (row - row0);
        const int64_t off = (q0 + i) * a.q_stride_t + (h * G + g) * a.q_stride_h;
        for (int64_t d = 0; d < D; ++d) dst[d * RP] = load_elem<kCode>(a.q, off + d) * qs;
      }
      chunk_fn(a, r, h, ql, rows, qT.data(), lo, hi, states[w], kbuf.data(), vbuf.data(), zero.data(), sc.data(),
               corr.data());
    };
  });
  // Merge the chunks of each item (log2 domain) and write the output.
  parallel_for_each(items, 1, [&](int64_t item) {
    const int64_t r = item / a.Hkv, h = item % a.Hkv;
    const int64_t q0 = a.cu_q[r], ql = a.cu_q[r + 1] - q0;
    const State* st = states.data() + item * chunks;
    std::vector<float> o(D);
    for (int64_t row = 0; row < G * ql; ++row) {
      float m = -std::numeric_limits<float>::infinity();
      for (int64_t c = 0; c < chunks; ++c) m = std::max(m, st[c].m[row]);
      float l = 0.f;
      std::fill(o.begin(), o.end(), 0.f);
      for (int64_t c = 0; c < chunks; ++c) {
        if (st[c].l[row] == 0.f) continue;
        const float f = std::exp2(st[c].m[row] - m);
        l += st[c].l[row] * f;
        for (int64_t d = 0; d < D; ++d) o[d] += st[c].acc[row * D + d] * f;
      }
      const int64_t g = row / ql, i = row % ql;
      const int64_t off = (q0 + i) * a.o_stride_t + (h * G + g) * a.o_stride_h;
      const float inv = 1.f / l;
      for (int64_t d = 0; d < D; ++d) store_elem<kCode>(a.out, off + d, o[d] * inv);
    }
  });
}

}  // namespace

// Always-on structural checks (with validation off too): every index the kernel follows stays inside its
// tensor. O(R * max_blocks) integer reads. Throws std::invalid_argument naming the argument.
static void check_layout(const int32_t* cu, const int32_t* kv, const int32_t* bt, int64_t R, int64_t T, int64_t max_blocks,
                  int64_t block_size, int64_t num_blocks, bool has_mask, int64_t mask_words) {
  auto fail = [](const char* arg, const std::string& what) {
    throw std::invalid_argument(std::string(arg) + ": " + what + " (checked with validation off too)");
  };
  if (block_size < 1 || (block_size & (block_size - 1)))  // the kernel finds pages by shift and mask
    fail("k_cache", "block size must be a power of two, got " + std::to_string(block_size));
  if (cu[0] != 0) fail("cu_q_lens", "must start at 0, got " + std::to_string(cu[0]));
  for (int64_t r = 0; r < R; ++r) {
    const int64_t ql = static_cast<int64_t>(cu[r + 1]) - cu[r];
    if (ql < 0) fail("cu_q_lens", "must be non-decreasing (entry " + std::to_string(r + 1) + ")");
    if (kv[r] < ql)
      fail("kv_lens", "request " + std::to_string(r) + " has kv_len " + std::to_string(kv[r]) + " < its " +
                          std::to_string(ql) + " query tokens");
    const int64_t need = (static_cast<int64_t>(kv[r]) + block_size - 1) / block_size;
    if (need > max_blocks)
      fail("block_table", "request " + std::to_string(r) + " needs " + std::to_string(need) + " blocks, the table has " +
                              std::to_string(max_blocks) + " columns");
    for (int64_t b = 0; b < need; ++b) {
      const int32_t id = bt[r * max_blocks + b];
      if (id < 0 || id >= num_blocks)
        fail("block_table", "request " + std::to_string(r) + " block " + std::to_string(b) + " is " +
                                std::to_string(id) + ", outside the cache's " + std::to_string(num_blocks) + " blocks");
    }
    if (has_mask && ql > 32 * mask_words)
      fail("tree_mask", "request " + std::to_string(r) + " has " + std::to_string(ql) + " query tokens, more than the " +
                            std::to_string(32 * mask_words) + " bits of a mask row");
  }
  if (cu[R] != T)
    fail("cu_q_lens", "last entry must equal the number of query tokens " + std::to_string(T) + ", got " +
                          std::to_string(cu[R]));
}

void tree_attention(std::uintptr_t q, int code, std::uintptr_t k, std::uintptr_t v, std::uintptr_t out,
                    std::uintptr_t block_table, std::uintptr_t kv_lens, std::uintptr_t cu_q, std::uintptr_t mask,
                    int64_t R, int64_t T, int64_t Hq, int64_t Hkv, int64_t D, int64_t block_size, int64_t num_blocks,
                    int64_t max_blocks, int64_t mask_words, int64_t q_stride_t, int64_t q_stride_h, int64_t o_stride_t,
                    int64_t o_stride_h, double scale, int64_t k_stride_b, int64_t k_stride_s, int64_t k_stride_h,
                    int64_t v_stride_b, int64_t v_stride_s, int64_t v_stride_h) {
  check_layout(ptr<const int32_t>(cu_q), ptr<const int32_t>(kv_lens), ptr<const int32_t>(block_table), R, T,
               max_blocks, block_size, num_blocks, mask != 0, mask_words);
  Args a{ptr<const void>(q), ptr<const void>(k), ptr<const void>(v), ptr<void>(out),
         ptr<const int32_t>(block_table), ptr<const int32_t>(kv_lens), ptr<const int32_t>(cu_q),
         mask ? ptr<const int32_t>(mask) : nullptr, R, Hq, Hkv, D, block_size, max_blocks, mask_words,
         q_stride_t, q_stride_h, o_stride_t, o_stride_h, static_cast<float>(scale), k_stride_b, k_stride_s,
         k_stride_h, v_stride_b, v_stride_s, v_stride_h, __builtin_ctzll(static_cast<unsigned long long>(block_size))};
  if (code == kF32) run<kF32>(a);
  else if (code == kBF16) run<kBF16>(a);
  else run<kF16>(a);
}

}  // namespace spd
