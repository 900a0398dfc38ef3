// rejection_sample on the CPU: lossless speculative sampling of chains and token trees
// (docs/contract.md section 3; the reference is spdkernels/reference/rejection_sample.py).
//
// Parallel over requests (dynamic schedule). A sampled request walks its tree. Without top-k / top-p a
// visited row is read once: one pass per block of 512 logits takes the block's max and the sum of
// 2^((x - max_b) * log2(e) / T) (the block is in L1 for the second look; fp32 lane sums, blocks added in
// double), and the row's mass is the sum of the block sums rescaled to the row max. No probability row is written: p(t) is one
// exponential, a point-mass rejection removes one token from the mass and from its block sum, and the
// final token is drawn by inverse CDF over the block sums, recomputing the weights of one block only.
// A rejection against draft_probs materialises max(0, p - q) (one pass) and the walk goes on over the
// materialised weights. With top-k / top-p the row is materialised too, and a selection finds the kept
// set (std::nth_element for the K-th largest logit; a mass-weighted quickselect for the top-p boundary:
// expected O(V), no sort). Greedy requests reuse the greedy walk (argmax of the visited rows only).
// Coins: explicit uniforms or Philox4x32-10 (the same bits as the reference and the Triton kernel).
#include <algorithm>
#include <cmath>
#include <limits>
#include <utility>
#include <vector>

#include "common.h"
#include "kernels.h"
#include "vec_exp.h"

#if SPD_HAVE_V4
#include <immintrin.h>
#endif

namespace spd {
namespace {

inline uint32_t philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1) {
  for (int i = 0; i < 10; ++i) {
    if (i) { k0 += 0x9E3779B9u; k1 += 0xBB67AE85u; }
    const uint64_t p0 = static_cast<uint64_t>(0xD2511F53u) * c0;
    const uint64_t p1 = static_cast<uint64_t>(0xCD9E8D57u) * c2;
    const uint32_t n0 = static_cast<uint32_t>(p1 >> 32) ^ c1 ^ k0;
    const uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ c3 ^ k1;
    c1 = static_cast<uint32_t>(p1);
    c3 = static_cast<uint32_t>(p0);
    c0 = n0;
    c2 = n2;
  }
  return c0;
}

// Same mapping as spdkernels.reference.philox_uniform: ((x >> 9) + 0.5) / 2^23: 24 significant bits,
// so exact in fp32, and strictly inside (0, 1) (between 2^-24 and 1 - 2^-24).
inline float philox_uniform(int64_t seed, int64_t offset, uint32_t index, uint32_t stream) {
  const uint64_t s = static_cast<uint64_t>(seed), o = static_cast<uint64_t>(offset);
  const uint32_t x = philox4x32_10(index, stream, static_cast<uint32_t>(o), static_cast<uint32_t>(o >> 32),
                                   static_cast<uint32_t>(s), static_cast<uint32_t>(s >> 32));
  return (static_cast<float>(x >> 9) + 0.5f) * (1.0f / 8388608.0f);
}

inline float load_f(const void* row, int64_t i, int code) {
  switch (code) {
    case kF32: return static_cast<const float*>(row)[i];
    case kBF16: return bf16_to_f32(static_cast<const uint16_t*>(row)[i]);
    default: return f16_to_f32(static_cast<const uint16_t*>(row)[i]);
  }
}

// Order-preserving key of a float (NaN excluded): comparing keys compares values.
inline uint32_t f32_key(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  // negative: all bits flipped; positive: the sign bit set. Branch-free (a branch on the sign of random
  // logits mispredicts half the time: it made the top-k count pass 5x slower)
  return u ^ (static_cast<uint32_t>(static_cast<int32_t>(u) >> 31) | 0x80000000u);
}

// Largest value tau among cand[0:n) such that above + sum_{x >= tau} w >= target, or the smallest value if
// none reaches it. Quickselect on (value, weight) pairs: expected O(n).
float mass_quickselect(std::pair<float, float>* cand, size_t n, double target, double above) {
  size_t lo = 0, hi = n;
  while (hi - lo > 1) {
    const float pivot = cand[lo + (hi - lo) / 2].first;
    auto gt_end = std::partition(cand + lo, cand + hi, [&](const auto& e) { return e.first > pivot; });
    auto eq_end = std::partition(gt_end, cand + hi, [&](const auto& e) { return e.first == pivot; });
    double m_gt = above, m_eq = 0.0;
    for (auto it = cand + lo; it != gt_end; ++it) m_gt += it->second;
    for (auto it = gt_end; it != eq_end; ++it) m_eq += it->second;
    const size_t g = static_cast<size_t>(gt_end - cand), e = static_cast<size_t>(eq_end - cand);
    if (g > lo && m_gt >= target) {
      hi = g;  // the answer is a value above the pivot
    } else if (m_gt + m_eq >= target || e == hi) {
      return pivot;
    } else {
      above = m_gt + m_eq;
      lo = e;
    }
  }
  return cand[lo].first;
}

// Largest value tau among the n candidates (n >= 1) such that sum_{x >= tau} w >= target (the candidates all
// pass any earlier threshold and hold every token at or above tau). Radix passes first: the
// candidates' mass per bin of 11 bits of their order-preserving key (the top 11 first: a quarter of an
// octave), summed from the top bin down, finds the one bin the boundary lies in; the candidates of that bin
// are kept, and while they are many the next 11 bits split them again. The quickselect then runs on the last
// bin alone (its partitions are branchy: on a flat 128k row the first bin alone can hold thousands). Same
// answer as the quickselect over all candidates: every value above a bin holds less than the target (with
// what lies above it), the bin's lowest value at least the target. Two interleaved tables (even and odd
// candidates) keep runs of equal bins from serialising on one double add.
float mass_threshold(std::pair<float, float>* cand, size_t n, double target, std::vector<double>& hist) {
  constexpr int kBits = 11, kBins = 1 << kBits;
  double above = 0.0;
  for (int shift = 32 - kBits; shift >= 0 && n > 1024; shift -= kBits) {
    auto bin = [&](float x) { return (f32_key(x) >> shift) & (kBins - 1); };
    hist.assign(2 * kBins, 0.0);
    double* h0 = hist.data();
    double* h1 = h0 + kBins;
    size_t i = 0;
    for (; i + 2 <= n; i += 2) {
      h0[bin(cand[i].first)] += cand[i].second;
      h1[bin(cand[i + 1].first)] += cand[i + 1].second;
    }
    if (i < n) h0[bin(cand[i].first)] += cand[i].second;
    int b = kBins - 1, last = -1;
    for (; b >= 0; --b) {
      const double hb = h0[b] + h1[b];
      // empty, or only weight-0 tokens (top-k's candidates can underflow): those never move the boundary, and
      // they cannot be drawn; only where rounding leaves the target unreached does the threshold then stop
      // at the lowest positive-weight bin rather than at the lowest candidate (the same tokens can be drawn)
      if (!(hb > 0.0)) continue;
      last = b;
      if (above + hb >= target) break;
      above += hb;
    }
    if (b < 0) {  // the target is never reached (rounding): the lowest bin, where the smallest value lies
      b = last;
      above -= h0[b] + h1[b];
    }
    size_t m = 0;
    for (i = 0; i < n; ++i)
      if (bin(cand[i].first) == static_cast<uint32_t>(b)) cand[m++] = cand[i];
    n = m;
  }
  return mass_quickselect(cand, n, target, above);
}

struct Params {
  std::uintptr_t logits;
  int code;
  int64_t row_stride, V;
  std::uintptr_t draft_ids;
  int tok_code;
  const int32_t* cu;
  const int32_t* parents;
  const float* draft_probs;
  const float* temperature;
  const int32_t* top_k;
  const float* top_p;
  const float* uniforms;
  const int64_t* seed;
  const int64_t* offset;  // null: zeros
  int64_t R, N, max_depth;
  int32_t* out;
  int32_t* num;
  int32_t* path;
  std::uintptr_t bonus;  // bonus_token_ids (0: none): chains whose rows stop at the last draft
  int bonus_code;
  bool probs;  // target_is_probs: the rows are probabilities, not logits
};

// First row of request r: with given bonus tokens there is no row after a request's last draft.
inline int64_t first_row(const Params& P, int64_t r) { return P.bonus ? P.cu[r] : P.cu[r] + r; }

// With given bonus tokens, a request without drafts, or one that accepted its last draft, emits its bonus
// token at `depth` and stops: true if it did.
inline bool emit_bonus(const Params& P, int64_t r, int64_t k, int64_t node, int64_t depth, int32_t* out,
                       int32_t* path) {
  if (!P.bonus || node != k - 1) return false;
  out[depth] = static_cast<int32_t>(load_index(P.bonus, P.bonus_code, r));
  P.num[r] = static_cast<int32_t>(depth + 1);
  for (int64_t d = depth + 1; d <= P.max_depth; ++d) out[d] = -1;
  for (int64_t d = depth; d < P.max_depth; ++d) path[d] = -1;
  return true;
}

const void* row_ptr(const Params& P, int64_t row) {
  return reinterpret_cast<const char*>(P.logits) + row * P.row_stride * element_size(P.code);
}

// ---- vectorised row passes ---------------------------------------------------------------------------
// Same GCC vector-extension style as the argmax in common.h, cloned for AVX2 and baseline x86-64.

// binary16 -> binary32 for 8 lanes, exact: the magnitude bits shifted into place and scaled by 2^112
// turn normals and subnormals into the right value in one multiply; inf/NaN get the all-ones exponent.
inline f8v f16x8_to_f32(u8h h) {
  const i8v w = __builtin_convertvector(h, i8v);
  const i8v mag = (w & 0x7FFF) << 13;
  f8v f = __builtin_bit_cast(f8v, mag) * 5.192296858534828e+33f;  // 2^112
  i8v bits = __builtin_bit_cast(i8v, f);
  bits = ((w & 0x7C00) == 0x7C00) ? (mag | 0x7F800000) : bits;
  bits |= (w & 0x8000) << 16;
  return __builtin_bit_cast(f8v, bits);
}

template <int kCode>
__attribute__((always_inline)) inline f8v load8f(const void* row, int64_t i) {
  if constexpr (kCode == kF16) {
    u8h h;
    std::memcpy(&h, static_cast<const uint16_t*>(row) + i, sizeof h);
    return f16x8_to_f32(h);
  } else {
    return Row<kCode>::load8(row, i);
  }
}

// xs <- the row as fp32; returns its max.
template <int kCode>
__attribute__((always_inline)) inline float load_max_impl(const void* row, int64_t V, float* xs) {
  f8v m0 = f8v{} - __builtin_inff(), m1 = m0;
  const int64_t Vm = V - V % 16;
  for (int64_t i = 0; i < Vm; i += 16) {
    const f8v a = load8f<kCode>(row, i), b = load8f<kCode>(row, i + 8);
    std::memcpy(xs + i, &a, sizeof a);
    std::memcpy(xs + i + 8, &b, sizeof b);
    m0 = a > m0 ? a : m0;
    m1 = b > m1 ? b : m1;
  }
  float m = -__builtin_inff();
  for (int l = 0; l < 8; ++l) m = std::max(m, std::max(m0[l], m1[l]));
  for (int64_t i = Vm; i < V; ++i) {
    xs[i] = load_f(row, i, kCode);
    m = std::max(m, xs[i]);
  }
  return m;
}
SPD_CLONES float load_max_f32(const void* r, int64_t V, float* xs) { return load_max_impl<kF32>(r, V, xs); }
SPD_CLONES float load_max_bf16(const void* r, int64_t V, float* xs) { return load_max_impl<kBF16>(r, V, xs); }
SPD_CLONES float load_max_f16(const void* r, int64_t V, float* xs) { return load_max_impl<kF16>(r, V, xs); }

float load_max(const void* row, int64_t V, int code, float* xs) {
  switch (code) {
    case kF32: return load_max_f32(row, V, xs);
    case kBF16: return load_max_bf16(row, V, xs);
    default: return load_max_f16(row, V, xs);
  }
}

// Sum of w[0:n] in double, 8 lanes at a time.
SPD_CLONES double block_sum(const float* w, int64_t n) {
  typedef double d4v __attribute__((vector_size(32)));
  typedef float f4v __attribute__((vector_size(16)));
  d4v s0{};
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) {
    f4v x;
    std::memcpy(&x, w + i, sizeof x);
    s0 += __builtin_convertvector(x, d4v);
  }
  double s = (s0[0] + s0[1]) + (s0[2] + s0[3]);
  for (; i < n; ++i) s += w[i];
  return s;
}

// ---- a row's distribution without materialising it (no top-k / top-p) --------------------------------
// The weights are w(v) = 2^((x_v - m) * scale) with m the row max and scale = log2(e) / T: the same
// exponential as exp_weights (up to FMA contraction, which only moves floating-point boundary cases).

#include "vec_exp2.inc"

constexpr int64_t kBlk = 512;  // 2 KiB of fp32 logits: the block's second look hits L1
constexpr int64_t kAhead = 2;  // software prefetch distance, in blocks

// Lanes [0, n) of the row from i, the others -inf (weight 0).
template <int kCode>
__attribute__((always_inline)) inline f8v load8f_tail(const void* row, int64_t i, int64_t n) {
  f8v x = f8v{} - __builtin_inff();
  for (int64_t l = 0; l < n; ++l) x[l] = load_f(row, i + l, kCode);
  return x;
}

// 16 logits from i as two fp32 vectors, in any order (for a max or a sum). bf16: evens and odds straight
// from the 32-bit words (a shift and a mask, no widening shuffle).
template <int kCode>
__attribute__((always_inline)) inline void load16f(const void* row, int64_t i, f8v& a, f8v& b) {
  if constexpr (kCode == kBF16) {
    i8v w;
    std::memcpy(&w, static_cast<const uint16_t*>(row) + i, sizeof w);
    const i8v lo = w << 16, hi = w & static_cast<int32_t>(0xFFFF0000u);
    a = __builtin_bit_cast(f8v, lo);
    b = __builtin_bit_cast(f8v, hi);
  } else {
    a = load8f<kCode>(row, i);
    b = load8f<kCode>(row, i + 8);
  }
}

// Per block b of kBlk logits: mb[b] = the block max and sb[b] = the sum of 2^((x - mb[b]) * scale) over
// the block. One read of the row from memory; the exponentials see the block in L1. The sum runs in fp32
// lanes (each lane adds 64 terms, four at a time: a few ulp of the block sum at most, against a term 2^0 = 1)
// and the blocks add in double: a double accumulator in the inner loop would be a loop-carried chain.
template <int kCode, bool kAvx>
__attribute__((always_inline)) inline void row_stats_impl(const void* row, int64_t V, float scale, float* mb,
                                                          double* sb) {
  constexpr int64_t kElt = kCode == kF32 ? 4 : 2;
  for (int64_t b0 = 0, b = 0; b0 < V; b0 += kBlk, ++b) {
    const int64_t n = std::min(kBlk, V - b0), n16 = n - n % 16;
    f8v m0 = f8v{} - __builtin_inff(), m1 = m0, x0, x1;
    int64_t i = 0;
    for (; i < n16; i += 16) {
      load16f<kCode>(row, b0 + i, x0, x1);
      m0 = x0 > m0 ? x0 : m0;
      m1 = x1 > m1 ? x1 : m1;
    }
    for (; i + 8 <= n; i += 8) {
      x0 = load8f<kCode>(row, b0 + i);
      m0 = x0 > m0 ? x0 : m0;
    }
    if (i < n) {
      x1 = load8f_tail<kCode>(row, b0 + i, n - i);
      m1 = x1 > m1 ? x1 : m1;
    }
    m0 = m1 > m0 ? m1 : m0;
    float m = m0[0];
    for (int l = 1; l < 8; ++l) m = std::max(m, m0[l]);
    mb[b] = m;
    if (m == -__builtin_inff()) {
      sb[b] = 0.0;
      continue;
    }
    // 2^-((m - x) * scale): m - x is exact near the max whatever the size of m, and >= +0
    auto e = [&](f8v x) { return exp2_8_sum<kAvx>((m - x) * scale); };
    f8v s0{}, s1{}, x2, x3, x4, x5, x6, x7;
    for (i = 0; i + 64 <= n16; i += 64) {
      // the block kAhead blocks on comes from memory meanwhile (prefetch never faults past the row's end)
      const char* pf = static_cast<const char*>(row) + (b0 + kAhead * kBlk + i) * kElt;
      for (int64_t o = 0; o < 64 * kElt; o += 64) __builtin_prefetch(pf + o);
      load16f<kCode>(row, b0 + i, x0, x1);
      load16f<kCode>(row, b0 + i + 16, x2, x3);
      load16f<kCode>(row, b0 + i + 32, x4, x5);
      load16f<kCode>(row, b0 + i + 48, x6, x7);
      s0 += (e(x0) + e(x1)) + (e(x2) + e(x3));
      s1 += (e(x4) + e(x5)) + (e(x6) + e(x7));
    }
    for (; i < n16; i += 16) {
      load16f<kCode>(row, b0 + i, x0, x1);
      s0 += e(x0) + e(x1);
    }
    for (; i + 8 <= n; i += 8) s1 += e(load8f<kCode>(row, b0 + i));
    if (i < n)  // exact zeros for the padding lanes
      s1 += exp2_8_nonpos((load8f_tail<kCode>(row, b0 + i, n - i) - m) * scale);
    s0 += s1;
    double s = 0.0;
    for (int l = 0; l < 8; ++l) s += s0[l];
    sb[b] = s;
  }
}

// w[0:n] <- 2^((x - m) * scale) for the logits [b0, b0 + n) of the row.
template <int kCode>
__attribute__((always_inline)) inline void row_weights_impl(const void* row, int64_t b0, int64_t n, float m,
                                                            float scale, float* w) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) store_f8(w + i, exp2_8_nonpos((load8f<kCode>(row, b0 + i) - m) * scale));
  if (i < n) {
    const f8v e = exp2_8_nonpos((load8f_tail<kCode>(row, b0 + i, n - i) - m) * scale);
    for (int64_t l = 0; l < n - i; ++l) w[i + l] = e[l];
  }
}

#if SPD_HAVE_V4
// The row pass for AVX-512: the same blocks and sums as row_stats_impl, 16 lanes wide, with an exponential
// built on AVX-512's own range reduction. y = (x - m) * scale (<= 0) is clamped at -125; vreduceps gives
// f = y - floor(y) in [0, 1) in one instruction; 2^f is a degree-5 polynomial (fit error 7.5e-8 relative, the
// same as exp2_8_sum's); vscalefps multiplies by 2^floor(y) in one more. 11 instructions per 16 logits,
// where the AVX2 path spends 14 per 8. The tail of a row (V % 64 logits) goes through a -inf padded buffer
// with masked adds, so padding lanes add nothing.
struct Exp2SumV4 {
  __m512 m, scale, lo, c0, c1, c2, c3, c4, c5;
};

SPD_V4 __attribute__((always_inline)) inline __m512 exp2_sum_v4(__m512 x, const Exp2SumV4& k) {
  const __m512 y = _mm512_max_ps(_mm512_mul_ps(_mm512_sub_ps(x, k.m), k.scale), k.lo);
  const __m512 f = _mm512_reduce_ps(y, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  __m512 p = _mm512_fmadd_ps(k.c5, f, k.c4);
  p = _mm512_fmadd_ps(p, f, k.c3);
  p = _mm512_fmadd_ps(p, f, k.c2);
  p = _mm512_fmadd_ps(p, f, k.c1);
  p = _mm512_fmadd_ps(p, f, k.c0);
  return _mm512_scalef_ps(p, y);
}

// 32 logits from i as two fp32 vectors, in any order (bf16: evens and odds of the 32-bit words).
template <int kCode>
SPD_V4 __attribute__((always_inline)) inline void load32_v4(const void* row, int64_t i, __m512& a, __m512& b) {
  if constexpr (kCode == kBF16) {
    const __m512i w = _mm512_loadu_si512(static_cast<const uint16_t*>(row) + i);
    a = _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
    b = _mm512_castsi512_ps(_mm512_and_si512(w, _mm512_set1_epi32(static_cast<int32_t>(0xFFFF0000u))));
  } else if constexpr (kCode == kF16) {  // vcvtph2ps: exact, subnormals included
    const uint16_t* h = static_cast<const uint16_t*>(row) + i;
    a = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(h)));
    b = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(h + 16)));
  } else {
    a = _mm512_loadu_ps(static_cast<const float*>(row) + i);
    b = _mm512_loadu_ps(static_cast<const float*>(row) + i + 16);
  }
}

template <int kCode>
SPD_V4 void row_stats_v4(const void* row, int64_t V, float scale, float* mb, double* sb) {
  constexpr int64_t kElt = kCode == kF32 ? 4 : 2;
  Exp2SumV4 k{_mm512_setzero_ps(),         _mm512_set1_ps(scale),      _mm512_set1_ps(-125.0f),
              _mm512_set1_ps(0.99999993f), _mm512_set1_ps(0.69315307f), _mm512_set1_ps(0.24015362f),
              _mm512_set1_ps(0.05582632f), _mm512_set1_ps(0.00898934f), _mm512_set1_ps(0.00187758f)};
  alignas(64) float tail[64];
  for (int64_t b0 = 0, b = 0; b0 < V; b0 += kBlk, ++b) {
    const int64_t n = std::min(kBlk, V - b0), n64 = n - n % 64, rem = n - n64;
    __m512 m0 = _mm512_set1_ps(-__builtin_inff()), m1 = m0, x0, x1, x2, x3;
    for (int64_t i = 0; i < n64; i += 32) {
      load32_v4<kCode>(row, b0 + i, x0, x1);
      m0 = _mm512_max_ps(m0, x0);
      m1 = _mm512_max_ps(m1, x1);
    }
    if (rem) {  // the row's last rem < 64 logits, padded with -inf
      for (int64_t l = 0; l < 64; ++l) tail[l] = l < rem ? load_f(row, b0 + n64 + l, kCode) : -__builtin_inff();
      for (int q = 0; q < 64; q += 32) {
        m0 = _mm512_max_ps(m0, _mm512_load_ps(tail + q));
        m1 = _mm512_max_ps(m1, _mm512_load_ps(tail + q + 16));
      }
    }
    const float m = _mm512_reduce_max_ps(_mm512_max_ps(m0, m1));
    mb[b] = m;
    if (m == -__builtin_inff()) {
      sb[b] = 0.0;
      continue;
    }
    k.m = _mm512_set1_ps(m);
    __m512 s0 = _mm512_setzero_ps(), s1 = s0;
    for (int64_t i = 0; i < n64; i += 64) {
      const char* pf = static_cast<const char*>(row) + (b0 + kAhead * kBlk + i) * kElt;
      for (int64_t o = 0; o < 64 * kElt; o += 64) __builtin_prefetch(pf + o);
      load32_v4<kCode>(row, b0 + i, x0, x1);
      load32_v4<kCode>(row, b0 + i + 32, x2, x3);
      s0 = _mm512_add_ps(s0, _mm512_add_ps(exp2_sum_v4(x0, k), exp2_sum_v4(x1, k)));
      s1 = _mm512_add_ps(s1, _mm512_add_ps(exp2_sum_v4(x2, k), exp2_sum_v4(x3, k)));
    }
    for (int64_t q = 0; q < rem; q += 16) {
      const __mmask16 live = rem - q >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (rem - q)) - 1);
      s1 = _mm512_mask_add_ps(s1, live, s1, exp2_sum_v4(_mm512_load_ps(tail + q), k));
    }
    s0 = _mm512_add_ps(s0, s1);
    const __m512d d = _mm512_add_pd(_mm512_cvtps_pd(_mm512_castps512_ps256(s0)),
                                    _mm512_cvtps_pd(_mm512_extractf32x8_ps(s0, 1)));
    sb[b] = _mm512_reduce_add_pd(d);
  }
}
#endif

// The row pass, compiled for baseline x86-64, for x86-64-v3 (AVX2 + FMA) and for AVX-512, picked per row by
// isa_level() (so that the ISA cap of the tests reaches it).
using RowStatsFn = void (*)(const void*, int64_t, float, float*, double*);
template <int kCode>
void row_stats_base(const void* r, int64_t V, float s, float* mb, double* sb) {
  row_stats_impl<kCode, false>(r, V, s, mb, sb);
}
template <int kCode>
SPD_V3 void row_stats_v3(const void* r, int64_t V, float s, float* mb, double* sb) {
  row_stats_impl<kCode, kHaveV3>(r, V, s, mb, sb);
}
template <int kCode>
RowStatsFn pick_row_stats(int isa) {
#if SPD_HAVE_V4
  if (isa >= kIsaV4) return row_stats_v4<kCode>;
#endif
  if (isa >= kIsaV3) return row_stats_v3<kCode>;
  return row_stats_base<kCode>;
}
void row_stats(const void* r, int code, int64_t V, float s, float* mb, double* sb) {
  const int isa = isa_level();
  (code == kF32    ? pick_row_stats<kF32>(isa)
   : code == kBF16 ? pick_row_stats<kBF16>(isa)
                   : pick_row_stats<kF16>(isa))(r, V, s, mb, sb);
}

SPD_V3_CLONES void row_weights_f32(const void* r, int64_t b0, int64_t n, float m, float s, float* w) {
  row_weights_impl<kF32>(r, b0, n, m, s, w);
}
SPD_V3_CLONES void row_weights_bf16(const void* r, int64_t b0, int64_t n, float m, float s, float* w) {
  row_weights_impl<kBF16>(r, b0, n, m, s, w);
}
SPD_V3_CLONES void row_weights_f16(const void* r, int64_t b0, int64_t n, float m, float s, float* w) {
  row_weights_impl<kF16>(r, b0, n, m, s, w);
}

// The target distribution of one row without top-k / top-p, kept as per-block masses: p(v) = w(v) / M,
// where point-mass rejections have removed some tokens (weight 0, taken out of M and of their block).
struct LazyRow {
  const void* row = nullptr;
  int code = kF32;
  int64_t V = 0;
  float m = 0.0f, scale = 1.0f;
  double M = 0.0;                // mass of the tokens not removed
  std::vector<double> bs;        // per-block mass, in the row-max scale
  std::vector<float> mb;         // per-block max (scratch)
  std::vector<int32_t> removed;  // tokens taken out by point-mass rejections (few: siblings at one node)
  float wbuf[kBlk];

  void weights(int64_t b0, int64_t n, float* w) const {
    switch (code) {
      case kF32: row_weights_f32(row, b0, n, m, scale, w); break;
      case kBF16: row_weights_bf16(row, b0, n, m, scale, w); break;
      default: row_weights_f16(row, b0, n, m, scale, w);
    }
    for (int32_t t : removed)
      if (t >= b0 && t < b0 + n) w[t - b0] = 0.0f;
  }

  void init(const void* row_, int code_, int64_t V_, float T) {
    row = row_;
    code = code_;
    V = V_;
    scale = 1.44269504088896341f / T;
    removed.clear();
    const int64_t nb = (V + kBlk - 1) / kBlk;
    bs.resize(nb);
    mb.resize(nb);
    row_stats(row, code, V, scale, mb.data(), bs.data());
    m = *std::max_element(mb.begin(), mb.end());
    M = 0.0;
    for (int64_t b = 0; b < nb; b += 8) {  // block masses to the row-max scale, 8 factors at a time
      const int64_t nl = std::min<int64_t>(8, nb - b);
      f8v d = f8v{} - __builtin_inff();
      for (int64_t l = 0; l < nl; ++l) d[l] = mb[b + l];
      const f8v factor = exp2_8_nonpos((d - m) * scale);  // a block max of -inf gives 0
      for (int64_t l = 0; l < nl; ++l) {
        bs[b + l] *= factor[l];
        M += bs[b + l];
      }
    }
  }

  float weight(int64_t t) {
    float w;
    weights(t, 1, &w);
    return w;
  }

  // Block masses and M summed again from the weights (after a cancellation, so that a mass that is
  // truly zero comes out as zero).
  void resum() {
    M = 0.0;
    for (int64_t b0 = 0, b = 0; b0 < V; b0 += kBlk, ++b) {
      const int64_t n = std::min(kBlk, V - b0);
      weights(b0, n, wbuf);
      double s = 0.0;
      for (int64_t i = 0; i < n; ++i) s += wbuf[i];
      bs[b] = s;
      M += s;
    }
  }

  // p <- p without token t (weight wt > 0), unless nothing else has mass (then p stays, as the contract says).
  void remove(int64_t t, float wt) {
    if (M - wt <= 1e-6 * M) {  // cancellation: decide on exact sums
      removed.push_back(static_cast<int32_t>(t));
      resum();
      if (M > 0.0) return;
      removed.pop_back();
      resum();
      return;
    }
    removed.push_back(static_cast<int32_t>(t));
    bs[t / kBlk] -= wt;
    M -= wt;
  }

  // Smallest id v with cumsum(w)[v] > u * M: whole blocks are skipped by their masses, the crossing block
  // is scanned element by element (going on into the next blocks if rounding leaves the crossing there).
  int32_t sample(float u) {
    const int64_t nb = static_cast<int64_t>(bs.size());
    const double thr = static_cast<double>(u) * M;
    double c = 0.0;
    int64_t b = 0;
    for (; b < nb && c + bs[b] <= thr; ++b) c += bs[b];
    for (; b < nb; ++b) {
      const int64_t b0 = b * kBlk, n = std::min(kBlk, V - b0);
      weights(b0, n, wbuf);
      for (int64_t i = 0; i < n; ++i) {
        c += wbuf[i];
        if (c > thr && wbuf[i] > 0.0f) return static_cast<int32_t>(b0 + i);
      }
    }
    for (b = nb - 1; b >= 0; --b) {  // rounding: u * M >= the whole sum: the last positive weight
      const int64_t b0 = b * kBlk, n = std::min(kBlk, V - b0);
      weights(b0, n, wbuf);
      for (int64_t i = n - 1; i >= 0; --i)
        if (wbuf[i] > 0.0f) return static_cast<int32_t>(b0 + i);
    }
    return 0;
  }

  // w[0:V] <- the weights (removed tokens 0).
  void materialise(float* w) {
    for (int64_t b0 = 0; b0 < V; b0 += kBlk) weights(b0, std::min(kBlk, V - b0), w + b0);
  }
};

// Per-thread scratch of the top-k / top-p selection (kept across rows and calls: no allocation once a
// thread has seen the vocabulary size).
struct Select {
  std::vector<float> sel, bm;                   // selection candidates; block maxima
  std::vector<std::pair<float, float>> cand;    // top-p candidates (logit, weight)
  std::vector<double> hist;                     // top-p radix pass: mass per bin
  std::vector<uint32_t> count;                  // radix passes: count per bin
};

// Max of each block of 64 of xs[0:V) (the last one ragged) into bm.
SPD_CLONES void block_maxima(const float* xs, int64_t V, float* bm) {
  const int64_t full = V / 64;
  for (int64_t b = 0; b < full; ++b) {
    const float* x = xs + b * 64;
    f8v m0, m1;
    std::memcpy(&m0, x, sizeof m0);
    std::memcpy(&m1, x + 8, sizeof m1);
    for (int j = 16; j < 64; j += 16) {
      f8v a, c;
      std::memcpy(&a, x + j, sizeof a);
      std::memcpy(&c, x + j + 8, sizeof c);
      m0 = a > m0 ? a : m0;
      m1 = c > m1 ? c : m1;
    }
    m0 = m1 > m0 ? m1 : m0;
    float r = m0[0];
    for (int l = 1; l < 8; ++l) r = std::max(r, m0[l]);
    bm[b] = r;
  }
  if (full * 64 < V) {
    float r = -__builtin_inff();
    for (int64_t v = full * 64; v < V; ++v) r = std::max(r, xs[v]);
    bm[full] = r;
  }
}

// The K-th largest of xs[0:V) (1 <= K < V), as std::nth_element over the whole row would give.
// Small K (at most a quarter of the blocks of 64): the K-th largest block maximum L is a lower bound of the
// answer (K blocks hold a value >= L), so only the blocks whose maximum reaches L are scanned for values
// >= L, and the selection runs on those (~100 values for K = 50 of 128k flat logits): one vectorised pass.
// Otherwise a radix pass: counts per bin of the top 12 bits of the order-preserving key, summed from the
// top bin down, find the bin holding the K-th largest, and the selection runs on that bin alone. Two
// interleaved count tables keep runs of equal bins from serialising on one counter.
float kth_largest(const float* xs, int64_t V, int64_t K, Select& s) {
  constexpr int kBits = 12, kBins = 1 << kBits, kShift = 32 - kBits;
  std::vector<float>& sel = s.sel;
  if (V <= 2048) {
    sel.assign(xs, xs + V);
    std::nth_element(sel.begin(), sel.begin() + (K - 1), sel.end(), std::greater<float>());
    return sel[K - 1];
  }
  const int64_t nb = (V + 63) / 64;
  if (K <= nb / 4) {
    s.bm.resize(static_cast<size_t>(nb));
    block_maxima(xs, V, s.bm.data());
    sel.assign(s.bm.begin(), s.bm.end());
    std::nth_element(sel.begin(), sel.begin() + (K - 1), sel.end(), std::greater<float>());
    const float L = sel[K - 1];
    sel.clear();
    for (int64_t b = 0; b < nb; ++b) {
      if (!(s.bm[b] >= L)) continue;
      for (int64_t v = b * 64, e = std::min(V, v + 64); v < e; ++v)
        if (xs[v] >= L) sel.push_back(xs[v]);
    }
    if (static_cast<int64_t>(sel.size()) >= K) {  // always (the K blocks' maxima are in); never read past the end
      std::nth_element(sel.begin(), sel.begin() + (K - 1), sel.end(), std::greater<float>());
      return sel[K - 1];
    }
  }
  s.count.assign(2 * kBins, 0u);
  uint32_t* c0 = s.count.data();
  uint32_t* c1 = c0 + kBins;
  int64_t v = 0;
  for (; v + 2 <= V; v += 2) {
    ++c0[f32_key(xs[v]) >> kShift];
    ++c1[f32_key(xs[v + 1]) >> kShift];
  }
  if (v < V) ++c0[f32_key(xs[v]) >> kShift];
  int64_t above = 0;
  int b = kBins - 1;
  for (; b > 0; --b) {
    const int64_t nbin = static_cast<int64_t>(c0[b]) + c1[b];
    if (above + nbin >= K) break;
    above += nbin;
  }
  sel.clear();
  for (v = 0; v < V; ++v)
    if ((f32_key(xs[v]) >> kShift) == static_cast<uint32_t>(b)) sel.push_back(xs[v]);
  const int64_t k = K - above;  // 1-based rank inside the bin
  std::nth_element(sel.begin(), sel.begin() + (k - 1), sel.end(), std::greater<float>());
  return sel[k - 1];
}

// ---- the target distribution of one row ----------------------------------------------------------------
// A sampled request's temperature, raised to at least 2^-126 (the smallest normal fp32): below about 4.2e-39 the
// scale log2(e) / T overflows to inf, and (x - m) * inf at the row max is NaN. The reference applies the same
// floor; it only changes weights of logits within ~1.2e-36 of the max.
inline float min_temperature(float T) { return std::max(T, std::numeric_limits<float>::min()); }

// p <- unnormalised kept weights; returns their mass (double). xs holds the row as fp32 afterwards; *tau_out
// (if given) the threshold: the kept set is {v : x_v >= tau}, -inf when top-k and top-p keep everything.
double target_weights(const Params& P, int64_t row, float T, int64_t K, float top_p, std::vector<float>& p,
                      std::vector<float>& xs, Select& s, float* tau_out = nullptr) {
  const int64_t V = P.V;
  const float mx = load_max(row_ptr(P, row), V, P.code, xs.data());
  double mass = exp_weights(xs.data(), V, mx, T, p.data());
  float tau = -__builtin_inff();
  if (K > 0 && K < V) tau = kth_largest(xs.data(), V, K, s);  // ties kept by the >= below
  if (top_p < 1.0f) {
    std::vector<std::pair<float, float>>& cand = s.cand;
    if (cand.size() < static_cast<size_t>(V)) cand.resize(V);
    size_t n = 0;
    double mk = 0.0;
    if (tau > -__builtin_inff()) {  // top-k first: the candidates are the tokens it keeps
      for (int64_t v = 0; v < V; ++v)
        if (xs[v] >= tau) { cand[n++] = {xs[v], p[v]}; mk += p[v]; }
    } else {
      // Without top-k every token is a candidate, but the light ones cannot matter: tokens with weight below
      // c = (1 - top_p) * mass / (2 V) hold less than half the mass top-p leaves out, so the tokens at or
      // above c already hold more than top_p of the mass, and since weights grow with the logit (up to the
      // exponential's rounding, ~1e-7, far inside the factor 2 of margin) the boundary and every token above
      // it are among them: the threshold is the same as over the whole row. On the bench's flat 128k rows
      // this keeps ~1/4 of the vocabulary; on a peaked (trained) distribution far fewer. Branch-free compaction.
      mk = mass;  // exp_weights' sum, in double
      const float c = static_cast<float>(0.5 * (1.0 - static_cast<double>(top_p)) * mk / static_cast<double>(V));
      for (int64_t v = 0; v < V; ++v) {
        cand[n] = {xs[v], p[v]};
        n += p[v] >= c ? 1 : 0;
      }
    }
    tau = std::max(tau, mass_threshold(cand.data(), n, static_cast<double>(top_p) * mk, s.hist));
  }
  if (tau > -__builtin_inff()) {
    float* w = p.data();
    const float* x = xs.data();
    for (int64_t v = 0; v < V; ++v) w[v] = x[v] >= tau ? w[v] : 0.0f;  // a vector select
    mass = block_sum(w, V);
  }
  if (tau_out) *tau_out = tau;
  return mass;
}

// Smallest id v with cumsum(w)[v] > u * mass (the last positive weight if rounding leaves none).
// Blocks of 256 are summed vectorised until the running sum would pass the threshold; the crossing
// block is then scanned element by element.
int32_t sample_inverse_cdf(const std::vector<float>& w, int64_t V, double mass, float u) {
  constexpr int64_t kBlock = 256;
  const double thr = static_cast<double>(u) * mass;
  double c = 0.0;
  int64_t b = 0;
  for (; b < V; b += kBlock) {
    const double s = block_sum(w.data() + b, std::min(kBlock, V - b));
    if (c + s > thr) break;
    c += s;
  }
  for (int64_t v = b; v < std::min(V, b + kBlock); ++v) {
    c += w[v];
    if (c > thr && w[v] > 0) return static_cast<int32_t>(v);
  }
  for (int64_t v = std::min(V, b + kBlock) - 1; v >= 0; --v)  // rounding: u * mass >= the whole sum
    if (w[v] > 0) return static_cast<int32_t>(v);
  return 0;
}

int64_t next_child(const Params& P, int64_t start, int64_t k, int64_t node, int64_t from) {
  for (int64_t j = std::max(from, node + 1); j < k; ++j) {
    const int64_t par = P.parents ? P.parents[start + j] : j - 1;
    if (par == node) return j;
    if (!P.parents) break;
  }
  return -1;
}

void greedy_request(const Params& P, int64_t r) {
  const int64_t start = P.cu[r], k = P.cu[r + 1] - P.cu[r], row0 = first_row(P, r);
  int32_t* out = P.out + r * (P.max_depth + 1);
  int32_t* path = P.path + r * P.max_depth;
  int64_t node = -1, depth = 0;
  if (emit_bonus(P, r, k, node, depth, out, path)) return;
  int32_t best = row_argmax(row_ptr(P, row0), P.V, P.code);
  while (depth < P.max_depth) {
    int64_t child = -1;
    for (int64_t j = next_child(P, start, k, node, 0); j >= 0; j = next_child(P, start, k, node, j + 1))
      if (load_index(P.draft_ids, P.tok_code, start + j) == best) { child = j; break; }
    if (child < 0) break;
    out[depth] = best;
    path[depth++] = static_cast<int32_t>(child);
    node = child;
    if (emit_bonus(P, r, k, node, depth, out, path)) return;
    best = row_argmax(row_ptr(P, row0 + 1 + node), P.V, P.code);
  }
  out[depth] = best;
  P.num[r] = static_cast<int32_t>(depth + 1);
  for (int64_t d = depth + 1; d <= P.max_depth; ++d) out[d] = -1;
  for (int64_t d = depth; d < P.max_depth; ++d) path[d] = -1;
}

// Per-thread scratch, kept across calls (torch's thread pool reuses its threads), so that a call allocates nothing
// once a thread has seen the vocabulary size.
struct Scratch {
  std::vector<float> w, w2, xs;
  Select select;
  LazyRow lazy;
};

// A sampled request. Without top-k / top-p the current distribution starts lazy (LazyRow: the row is read
// once, nothing is written); otherwise, or after a rejection against draft_probs, it is materialised in
// `w`, unnormalised, with its mass M (double): p(t) = w[t] / float(M). A point-mass rejection removes one
// token (O(1)); a rejection against draft_probs writes max(0, p - q) into the second row in one pass.
// (noipa: the scratch stays a plain pointer here; inlined or specialised, GCC re-derives the thread_local's address
// with a __tls_get_addr call inside the hot loops)
__attribute__((noipa)) void sampled_request(const Params& P, int64_t r, Scratch& s) {
  const int64_t start = P.cu[r], k = P.cu[r + 1] - P.cu[r], row0 = first_row(P, r), V = P.V;
  const float T = min_temperature(P.temperature ? P.temperature[r] : 1.0f);
  const int64_t K = P.top_k && !P.probs ? P.top_k[r] : 0;
  const float TP = P.top_p && !P.probs ? P.top_p[r] : 1.0f;
  const bool filtered = (K > 0 && K < V) || TP < 1.0f;
  auto coin = [&](int64_t i) {
    return P.uniforms ? P.uniforms[start + i] : philox_uniform(P.seed[r], P.offset ? P.offset[r] : 0, static_cast<uint32_t>(i), 0);
  };
  std::vector<float>& w = s.w;
  LazyRow& lz = s.lazy;
  bool lazy = false;
  // Probability rows are used as given (mass 1): p(t) is read from the row itself (`direct`), so an accepted
  // row costs one load. The first rejection at a row, or the final draw, materialises it: its values as fp32
  // weights, normalised from then on as the reference does (a residual by its own sum).
  bool direct = false;
  const void* drow = nullptr;
  double M = 0.0;
  auto load_row = [&](int64_t row) {
    lazy = !filtered && !P.probs;
    direct = P.probs;
    if (direct) {
      drow = row_ptr(P, row);
    } else if (lazy) {
      lz.init(row_ptr(P, row), P.code, V, T);
    } else {
      if (s.xs.size() < static_cast<size_t>(V)) s.xs.resize(V);
      M = target_weights(P, row, T, K, TP, w, s.xs, s.select);
    }
  };
  if (w.size() < static_cast<size_t>(V)) w.resize(V);
  int32_t* out = P.out + r * (P.max_depth + 1);
  int32_t* path = P.path + r * P.max_depth;
  int64_t node = -1, depth = 0;
  if (emit_bonus(P, r, k, node, depth, out, path)) return;
  load_row(row0);
  while (depth < P.max_depth) {
    int64_t accepted = -1;
    for (int64_t c = next_child(P, start, k, node, 0); c >= 0; c = next_child(P, start, k, node, c + 1)) {
      const int64_t t = load_index(P.draft_ids, P.tok_code, start + c);
      const float* q = P.draft_probs ? P.draft_probs + (start + c) * V : nullptr;
      const float qt = q ? q[t] : 1.0f;
      const float wt = direct ? load_f(drow, t, P.code) : lazy ? lz.weight(t) : w[t];
      const float M32 = direct ? 1.0f : static_cast<float>(lazy ? lz.M : M);
      const float pt = wt / M32;
      if (pt > 0.0f && coin(c) * qt <= pt) { accepted = c; break; }
      if (direct) {  // the row as fp32 weights with mass 1 (p unchanged)
        load_max(drow, V, P.code, w.data());
        direct = false;
        M = 1.0;
        if (!q) {  // point mass: p without token t, normalised by what is left; kept as given if nothing is
          const double S = block_sum(w.data(), V);
          if (S - w[t] > 0.0) {
            M = S - w[t];
            w[t] = 0.0f;
          }
          continue;
        }
      }
      if (q) {  // residual max(0, p - q), renormalised; kept as is if it has no mass
        if (lazy) {
          lz.materialise(w.data());
          M = lz.M;
          lazy = false;
        }
        if (s.w2.size() < static_cast<size_t>(V)) s.w2.resize(V);
        double S = 0.0;
        for (int64_t v = 0; v < V; ++v) {
          s.w2[v] = std::max(0.0f, w[v] / M32 - q[v]);
          S += s.w2[v];
        }
        if (S > 0.0) { std::swap(w, s.w2); M = S; }
      } else if (pt > 0.0f) {  // point mass: p without token t
        if (lazy) {
          lz.remove(t, wt);
        } else if (M - w[t] > 0.0) {
          M -= w[t];
          w[t] = 0.0f;
        }
      }
    }
    if (accepted < 0) break;
    out[depth] = static_cast<int32_t>(load_index(P.draft_ids, P.tok_code, start + accepted));
    path[depth++] = static_cast<int32_t>(accepted);
    node = accepted;
    if (emit_bonus(P, r, k, node, depth, out, path)) return;
    load_row(row0 + 1 + node);
  }
  const float u = P.uniforms ? P.uniforms[P.N + r] : philox_uniform(P.seed[r], P.offset ? P.offset[r] : 0, 0, 1);
  if (direct) {  // inverse CDF against the row's actual sum
    load_max(drow, V, P.code, w.data());
    M = block_sum(w.data(), V);
  }
  out[depth] = lazy ? lz.sample(u) : sample_inverse_cdf(w, V, M, u);
  P.num[r] = static_cast<int32_t>(depth + 1);
  for (int64_t d = depth + 1; d <= P.max_depth; ++d) out[d] = -1;
  for (int64_t d = depth; d < P.max_depth; ++d) path[d] = -1;
}

}  // namespace

// One row's target distribution, for the tests (torch.ops.spdkernels._cpu_target_weights): out[0:V) <- the unnormalised
// kept weights (fp32); returns (mass, threshold), as target_weights above (temperature > 0).
std::pair<double, float> target_weights_row(std::uintptr_t logits, int logit_code, int64_t V, float temperature,
                                            int64_t top_k, float top_p, std::uintptr_t out) {
  Params P{};
  P.logits = logits;
  P.code = logit_code;
  P.V = V;
  std::vector<float> p(V), xs(V);
  Select sel;
  float tau = 0.0f;
  const double mass = target_weights(P, 0, min_temperature(temperature), top_k, top_p, p, xs, sel, &tau);
  std::memcpy(ptr<float>(out), p.data(), static_cast<size_t>(V) * sizeof(float));
  return {mass, tau};
}

void rejection_sample(std::uintptr_t logits, int logit_code, int64_t row_stride, int64_t V, std::uintptr_t draft_ids,
                      int tok_code, std::uintptr_t cu_num_draft, std::uintptr_t parents, std::uintptr_t draft_probs,
                      std::uintptr_t temperature, std::uintptr_t top_k, std::uintptr_t top_p, std::uintptr_t uniforms,
                      std::uintptr_t seed, std::uintptr_t offset, int64_t R, int64_t N, int64_t max_depth,
                      std::uintptr_t out_tokens, std::uintptr_t num_emitted, std::uintptr_t accepted_path,
                      std::uintptr_t bonus_token_ids, int bonus_code, int target_is_probs) {
  check_draft_batch(ptr<const int32_t>(cu_num_draft), R, N, ptr<const int32_t>(parents), draft_ids, tok_code, V,
                    true);
  if (bonus_token_ids && parents)  // the rows of a tree cannot stop at its leaves
    throw std::invalid_argument("bonus_token_ids: only for chains (parents must be None)");
  const Params P{logits, logit_code, row_stride, V, draft_ids, tok_code, ptr<const int32_t>(cu_num_draft),
                 ptr<const int32_t>(parents), ptr<const float>(draft_probs), ptr<const float>(temperature),
                 ptr<const int32_t>(top_k), ptr<const float>(top_p), ptr<const float>(uniforms),
                 ptr<const int64_t>(seed), ptr<const int64_t>(offset), R, N, max_depth,
                 ptr<int32_t>(out_tokens), ptr<int32_t>(num_emitted), ptr<int32_t>(accepted_path),
                 bonus_token_ids, bonus_code, target_is_probs != 0};
  parallel_dynamic(R, [&P] {
    return [&P](int64_t r) {
      static thread_local Scratch scratch;  // per thread, kept across calls
      if (P.temperature && P.temperature[r] == 0.0f)
        greedy_request(P, r);
      else
        sampled_request(P, r, scratch);
    };
  });
}

}  // namespace spd
