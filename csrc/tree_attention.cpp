// tree_attention on the CPU: flash-attention style over the paged KV cache, read in place.
//
// One work item = (request, KV head). Its G query heads x q_len query tokens are packed into one block of
// rows (so every K/V position is read once per KV head, not once per query head), scaled by the softmax
// scale and widened to fp32. The KV positions are visited page by page in tiles of kTile: scores of all rows
// against the tile, an online softmax (running max m, running sum l, fp32 accumulator), no [q, L] matrix.
// Positions before the request's query tokens need no mask; the last q_len positions apply the tree bits
// (or causality when there is no mask). Items are spread over the OpenMP threads; a single request with
// few KV heads and a long context splits its KV range into chunks per thread and merges the partial
// (m, l, acc) states at the end (flash-decoding), so batch 1 uses every core.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "common.h"
#include "vec_exp.h"

namespace spd {
namespace {

constexpr int kTile = 32;

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
};

// Partial softmax state of one chunk of KV positions for the rows of one item.
struct State {
  std::vector<float> m, l, acc;  // [rows], [rows], [rows * D]
  void init(int64_t rows, int64_t D) {
    m.assign(rows, -std::numeric_limits<float>::infinity());
    l.assign(rows, 0.f);
    acc.assign(rows * D, 0.f);
  }
};

inline f8v load8(const float* p) {
  f8v v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline void store8(float* p, f8v v) { std::memcpy(p, &v, sizeof v); }

// s[i * kTile + j] = q_i . k_j for every row i and the kTile positions of the tile (K given transposed,
// kT[d * kTile + j], zero past the tile's end). Register tile: 2 rows x 32 positions = 8 accumulators;
// per d, 4 loads of K, 2 broadcasts of q, 8 multiply-adds (no horizontal sums).
SPD_CLONES
void qk_tile(const float* q, int64_t rows, const float* kT, int64_t D, float* s) {
  int64_t i = 0;
  for (; i + 2 <= rows; i += 2) {
    const float* q0 = q + i * D;
    const float* q1 = q0 + D;
    f8v a0{}, a1{}, a2{}, a3{}, b0{}, b1{}, b2{}, b3{};
    for (int64_t d = 0; d < D; ++d) {
      const float* kr = kT + d * kTile;
      const f8v k0 = load8(kr), k1 = load8(kr + 8), k2 = load8(kr + 16), k3 = load8(kr + 24);
      const float x = q0[d], y = q1[d];
      a0 += x * k0; a1 += x * k1; a2 += x * k2; a3 += x * k3;
      b0 += y * k0; b1 += y * k1; b2 += y * k2; b3 += y * k3;
    }
    float* s0 = s + i * kTile;
    store8(s0, a0); store8(s0 + 8, a1); store8(s0 + 16, a2); store8(s0 + 24, a3);
    store8(s0 + kTile, b0); store8(s0 + kTile + 8, b1); store8(s0 + kTile + 16, b2); store8(s0 + kTile + 24, b3);
  }
  for (; i < rows; ++i) {
    const float* q0 = q + i * D;
    f8v a0{}, a1{}, a2{}, a3{};
    for (int64_t d = 0; d < D; ++d) {
      const float* kr = kT + d * kTile;
      const float x = q0[d];
      a0 += x * load8(kr); a1 += x * load8(kr + 8); a2 += x * load8(kr + 16); a3 += x * load8(kr + 24);
    }
    float* s0 = s + i * kTile;
    store8(s0, a0); store8(s0 + 8, a1); store8(s0 + 16, a2); store8(s0 + 24, a3);
  }
}

// acc_i <- acc_i * corr_i + sum_j p[i, j] v_j over the n positions of the tile. D % 32 == 0: chunks of 32
// columns x 2 rows = 8 accumulators, loaded and stored once per tile; otherwise a plain loop.
SPD_CLONES
void pv_tile(float* acc, int64_t rows, const float* p, const float* vt, int64_t n, int64_t D, const float* corr) {
  if (D % 32) {
    for (int64_t i = 0; i < rows; ++i) {
      float* ai = acc + i * D;
      for (int64_t d = 0; d < D; ++d) ai[d] *= corr[i];
      for (int64_t j = 0; j < n; ++j) {
        const float pj = p[i * kTile + j];
        for (int64_t d = 0; d < D; ++d) ai[d] += pj * vt[j * D + d];
      }
    }
    return;
  }
  int64_t i = 0;
  for (; i + 2 <= rows; i += 2) {
    const float c0 = corr[i], c1 = corr[i + 1];
    const float* p0 = p + i * kTile;
    const float* p1 = p0 + kTile;
    for (int64_t d0 = 0; d0 < D; d0 += 32) {
      float* x0 = acc + i * D + d0;
      float* x1 = x0 + D;
      f8v a0 = c0 * load8(x0), a1 = c0 * load8(x0 + 8), a2 = c0 * load8(x0 + 16), a3 = c0 * load8(x0 + 24);
      f8v b0 = c1 * load8(x1), b1 = c1 * load8(x1 + 8), b2 = c1 * load8(x1 + 16), b3 = c1 * load8(x1 + 24);
      for (int64_t j = 0; j < n; ++j) {
        const float* v = vt + j * D + d0;
        const f8v v0 = load8(v), v1 = load8(v + 8), v2 = load8(v + 16), v3 = load8(v + 24);
        const float x = p0[j], y = p1[j];
        a0 += x * v0; a1 += x * v1; a2 += x * v2; a3 += x * v3;
        b0 += y * v0; b1 += y * v1; b2 += y * v2; b3 += y * v3;
      }
      store8(x0, a0); store8(x0 + 8, a1); store8(x0 + 16, a2); store8(x0 + 24, a3);
      store8(x1, b0); store8(x1 + 8, b1); store8(x1 + 16, b2); store8(x1 + 24, b3);
    }
  }
  for (; i < rows; ++i) {
    const float c0 = corr[i];
    const float* p0 = p + i * kTile;
    for (int64_t d0 = 0; d0 < D; d0 += 32) {
      float* x0 = acc + i * D + d0;
      f8v a0 = c0 * load8(x0), a1 = c0 * load8(x0 + 8), a2 = c0 * load8(x0 + 16), a3 = c0 * load8(x0 + 24);
      for (int64_t j = 0; j < n; ++j) {
        const float* v = vt + j * D + d0;
        const float x = p0[j];
        a0 += x * load8(v); a1 += x * load8(v + 8); a2 += x * load8(v + 16); a3 += x * load8(v + 24);
      }
      store8(x0, a0); store8(x0 + 8, a1); store8(x0 + 16, a2); store8(x0 + 24, a3);
    }
  }
}

// Positions [lo, hi) of request r, KV head h, into state st. Q rows are row = g * ql + i.
template <int kCode>
void attend_chunk(const Args& a, int64_t r, int64_t h, const float* qbuf, int64_t ql, int64_t lo, int64_t hi,
                  State& st) {
  const int64_t D = a.D, G = a.Hq / a.Hkv, rows = G * ql;
  const int64_t L = a.kv_lens[r], P = L - ql, q0 = a.cu_q[r];
  std::vector<float> kt(kTile * D), vt(kTile * D), s(rows * kTile), corr(rows);
  const int32_t* bt = a.block_table + r * a.max_blocks;
  for (int64_t j0 = lo; j0 < hi; j0 += kTile) {
    const int64_t n = std::min<int64_t>(kTile, hi - j0);
    for (int64_t j = 0; j < n; ++j) {  // gather the tile's K/V rows of head h, widened to fp32
      const int64_t pos = j0 + j;
      const int64_t slot = static_cast<int64_t>(bt[pos / a.block_size]) * a.block_size + pos % a.block_size;
      const int64_t off = (slot * a.Hkv + h) * D;
      for (int64_t d = 0; d < D; ++d) {
        kt[d * kTile + j] = load_elem<kCode>(a.k, off + d);
        vt[j * D + d] = load_elem<kCode>(a.v, off + d);
      }
    }
    if (n < kTile)
      for (int64_t d = 0; d < D; ++d) std::fill(kt.data() + d * kTile + n, kt.data() + (d + 1) * kTile, 0.f);
    qk_tile(qbuf, rows, kt.data(), D, s.data());
    const bool masked = j0 + n > P;  // the tile reaches the query tokens
    for (int64_t row = 0; row < rows; ++row) {
      float* sr = s.data() + row * kTile;
      const int64_t i = row % ql;
      if (masked) {
        for (int64_t j = 0; j < n; ++j) {
          const int64_t t = j0 + j - P;  // local query index of this position, if >= 0
          if (t < 0) continue;
          bool ok;
          if (a.mask) ok = (a.mask[(q0 + i) * a.mask_words + t / 32] >> (t % 32)) & 1;
          else ok = t <= i;
          if (!ok) sr[j] = -std::numeric_limits<float>::infinity();
        }
      }
      float mx = st.m[row];
      for (int64_t j = 0; j < n; ++j) mx = std::max(mx, sr[j]);
      if (mx == -std::numeric_limits<float>::infinity()) {  // nothing visible yet for this row
        corr[row] = 1.f;
        for (int64_t j = 0; j < n; ++j) sr[j] = 0.f;
        continue;
      }
      const float c = std::exp(st.m[row] - mx);
      const float sum = static_cast<float>(exp_weights(sr, n, mx, 1.f, sr));
      st.l[row] = st.l[row] * c + sum;
      st.m[row] = mx;
      corr[row] = c;
    }
    pv_tile(st.acc.data(), rows, s.data(), vt.data(), n, D, corr.data());
  }
}

template <int kCode>
void run(const Args& a, int num_threads) {
  const int64_t G = a.Hq / a.Hkv, D = a.D;
  const int64_t items = a.R * a.Hkv;
  // Split every item's KV range into `chunks` pieces when there are fewer items than threads.
  int64_t chunks = 1;
  if (items > 0 && items < num_threads) chunks = (num_threads + items - 1) / items;
  const int64_t work = items * chunks;
  std::vector<State> states(work);
#ifdef SPD_HAVE_OPENMP
#pragma omp parallel for schedule(dynamic, 1) num_threads(num_threads)
#endif
  for (int64_t w = 0; w < work; ++w) {
    const int64_t item = w / chunks, c = w % chunks;
    const int64_t r = item / a.Hkv, h = item % a.Hkv;
    const int64_t q0 = a.cu_q[r], ql = a.cu_q[r + 1] - q0;
    if (ql == 0) continue;
    const int64_t L = a.kv_lens[r];
    const int64_t per = ((L + chunks - 1) / chunks + kTile - 1) / kTile * kTile;
    const int64_t lo = std::min(L, c * per), hi = std::min(L, lo + per);
    std::vector<float> qbuf(G * ql * D);
    for (int64_t g = 0; g < G; ++g)
      for (int64_t i = 0; i < ql; ++i) {
        const int64_t off = (q0 + i) * a.q_stride_t + (h * G + g) * a.q_stride_h;
        for (int64_t d = 0; d < D; ++d) qbuf[(g * ql + i) * D + d] = load_elem<kCode>(a.q, off + d) * a.scale;
      }
    states[w].init(G * ql, D);
    if (lo < hi) attend_chunk<kCode>(a, r, h, qbuf.data(), ql, lo, hi, states[w]);
  }
  // Merge the chunks of each item and write the output.
#ifdef SPD_HAVE_OPENMP
#pragma omp parallel for schedule(static) num_threads(num_threads)
#endif
  for (int64_t item = 0; item < items; ++item) {
    const int64_t r = item / a.Hkv, h = item % a.Hkv;
    const int64_t q0 = a.cu_q[r], ql = a.cu_q[r + 1] - q0;
    if (ql == 0) continue;
    for (int64_t row = 0; row < G * ql; ++row) {
      float m = -std::numeric_limits<float>::infinity();
      for (int64_t c = 0; c < chunks; ++c) m = std::max(m, states[item * chunks + c].m[row]);
      float l = 0.f;
      std::vector<float> o(D, 0.f);
      for (int64_t c = 0; c < chunks; ++c) {
        const State& st = states[item * chunks + c];
        if (st.l[row] == 0.f) continue;
        const float f = std::exp(st.m[row] - m);
        l += st.l[row] * f;
        for (int64_t d = 0; d < D; ++d) o[d] += st.acc[row * D + d] * f;
      }
      const int64_t g = row / ql, i = row % ql;
      const int64_t off = (q0 + i) * a.o_stride_t + (h * G + g) * a.o_stride_h;
      const float inv = 1.f / l;
      for (int64_t d = 0; d < D; ++d) store_elem<kCode>(a.out, off + d, o[d] * inv);
    }
  }
}

}  // namespace

void tree_attention(std::uintptr_t q, int code, std::uintptr_t k, std::uintptr_t v, std::uintptr_t out,
                    std::uintptr_t block_table, std::uintptr_t kv_lens, std::uintptr_t cu_q, std::uintptr_t mask,
                    int64_t R, int64_t Hq, int64_t Hkv, int64_t D, int64_t block_size, int64_t max_blocks,
                    int64_t mask_words, int64_t q_stride_t, int64_t q_stride_h, int64_t o_stride_t,
                    int64_t o_stride_h, double scale, int num_threads) {
  Args a{ptr<const void>(q), ptr<const void>(k), ptr<const void>(v), ptr<void>(out),
         ptr<const int32_t>(block_table), ptr<const int32_t>(kv_lens), ptr<const int32_t>(cu_q),
         mask ? ptr<const int32_t>(mask) : nullptr, R, Hq, Hkv, D, block_size, max_blocks, mask_words,
         q_stride_t, q_stride_h, o_stride_t, o_stride_h, static_cast<float>(scale)};
  if (code == kF32) run<kF32>(a, num_threads);
  else if (code == kBF16) run<kBF16>(a, num_threads);
  else run<kF16>(a, num_threads);
}

}  // namespace spd
