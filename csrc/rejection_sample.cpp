// rejection_sample on the CPU: lossless speculative sampling of chains and token trees
// (DESIGN.md section 3; the reference is spdkernels/reference/rejection_sample.py).
//
// Parallel over requests (dynamic schedule). A sampled request walks its tree; each visited row costs
// two vectorised passes (load + convert + max into a per-thread fp32 row; exp((x - max) / T) + fp64 sum)
// and, with top-k / top-p, a selection (std::nth_element for the K-th largest logit; a mass-weighted
// quickselect for the top-p boundary: expected O(V), no sort). The distribution stays unnormalised with
// its mass, so a point-mass rejection is O(1) and a rejection against draft_probs one pass. The final
// token is drawn by inverse CDF over ids with the request's final coin (stops at the hit). Greedy
// requests reuse the greedy walk (argmax of the visited rows only). Coins: explicit uniforms or
// Philox4x32-10 (the same bits as the reference and the Triton kernel).
#include <algorithm>
#include <cmath>
#include <utility>
#include <vector>

#include "common.h"
#include "vec_exp.h"

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

// Largest value tau among xs such that sum_{x >= tau} w >= target (the candidates all pass any earlier
// threshold). Quickselect on (value, weight) pairs: expected O(n).
float mass_threshold(std::vector<std::pair<float, float>>& cand, double target) {
  size_t lo = 0, hi = cand.size();
  double above = 0.0;  // mass of the candidates already known to be above [lo, hi)
  while (hi - lo > 1) {
    const float pivot = cand[lo + (hi - lo) / 2].first;
    auto gt_end = std::partition(cand.begin() + lo, cand.begin() + hi, [&](const auto& e) { return e.first > pivot; });
    auto eq_end = std::partition(gt_end, cand.begin() + hi, [&](const auto& e) { return e.first == pivot; });
    double m_gt = above, m_eq = 0.0;
    for (auto it = cand.begin() + lo; it != gt_end; ++it) m_gt += it->second;
    for (auto it = gt_end; it != eq_end; ++it) m_eq += it->second;
    const size_t g = static_cast<size_t>(gt_end - cand.begin()), e = static_cast<size_t>(eq_end - cand.begin());
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
  const int64_t* offset;
  int64_t R, N, max_depth;
  int32_t* out;
  int32_t* num;
  int32_t* path;
};

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
  f8v f = reinterpret_cast<const f8v&>(mag) * 5.192296858534828e+33f;  // 2^112
  i8v bits = reinterpret_cast<i8v&>(f);
  bits = ((w & 0x7C00) == 0x7C00) ? (mag | 0x7F800000) : bits;
  bits |= (w & 0x8000) << 16;
  return reinterpret_cast<f8v&>(bits);
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

// ---- the target distribution of one row ----------------------------------------------------------------
// p <- unnormalised kept weights; returns their mass (double). xs holds the row as fp32 afterwards.
double target_weights(const Params& P, int64_t row, float T, int64_t K, float top_p, std::vector<float>& p,
                      std::vector<float>& xs, std::vector<float>& sel, std::vector<std::pair<float, float>>& cand) {
  const int64_t V = P.V;
  const float mx = load_max(row_ptr(P, row), V, P.code, xs.data());
  double mass = exp_weights(xs.data(), V, mx, T, p.data());
  float tau = -__builtin_inff();
  if (K > 0 && K < V) {  // the K-th largest logit (selection, ties kept by the >= below)
    sel.assign(xs.begin(), xs.begin() + V);  // per-thread scratch: no allocation after the first row
    std::nth_element(sel.begin(), sel.begin() + (K - 1), sel.end(), std::greater<float>());
    tau = sel[K - 1];
  }
  if (top_p < 1.0f) {
    cand.clear();
    double mk = 0.0;
    for (int64_t v = 0; v < V; ++v)
      if (xs[v] >= tau) { cand.emplace_back(xs[v], p[v]); mk += p[v]; }
    tau = std::max(tau, mass_threshold(cand, static_cast<double>(top_p) * mk));
  }
  if (tau > -__builtin_inff()) {
    mass = 0.0;
    for (int64_t v = 0; v < V; ++v) {
      if (!(xs[v] >= tau)) p[v] = 0.0f;
      mass += p[v];
    }
  }
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
  const int64_t start = P.cu[r], k = P.cu[r + 1] - P.cu[r], row0 = start + r;
  int32_t* out = P.out + r * (P.max_depth + 1);
  int32_t* path = P.path + r * P.max_depth;
  int64_t node = -1, depth = 0;
  int32_t best = row_argmax(row_ptr(P, row0), P.V, P.code);
  while (depth < P.max_depth) {
    int64_t child = -1;
    for (int64_t j = next_child(P, start, k, node, 0); j >= 0; j = next_child(P, start, k, node, j + 1))
      if (load_index(P.draft_ids, P.tok_code, start + j) == best) { child = j; break; }
    if (child < 0) break;
    out[depth] = best;
    path[depth++] = static_cast<int32_t>(child);
    node = child;
    best = row_argmax(row_ptr(P, row0 + 1 + node), P.V, P.code);
  }
  out[depth] = best;
  P.num[r] = static_cast<int32_t>(depth + 1);
  for (int64_t d = depth + 1; d <= P.max_depth; ++d) out[d] = -1;
  for (int64_t d = depth; d < P.max_depth; ++d) path[d] = -1;
}

// A sampled request. The current distribution is kept unnormalised in `w` with its mass M (double):
// p(t) = w[t] / float(M). A point-mass rejection removes one token in O(1) (M -= w[t]; w[t] = 0); a
// rejection against draft_probs writes max(0, p - q) into the second scratch row in one pass and swaps.
void sampled_request(const Params& P, int64_t r, std::vector<float>& w, std::vector<float>& w2,
                     std::vector<float>& xs, std::vector<float>& sel, std::vector<std::pair<float, float>>& cand) {
  const int64_t start = P.cu[r], k = P.cu[r + 1] - P.cu[r], row0 = start + r, V = P.V;
  const float T = P.temperature ? P.temperature[r] : 1.0f;
  const int64_t K = P.top_k ? P.top_k[r] : 0;
  const float TP = P.top_p ? P.top_p[r] : 1.0f;
  auto coin = [&](int64_t i) {
    return P.uniforms ? P.uniforms[start + i] : philox_uniform(P.seed[r], P.offset[r], static_cast<uint32_t>(i), 0);
  };
  int32_t* out = P.out + r * (P.max_depth + 1);
  int32_t* path = P.path + r * P.max_depth;
  int64_t node = -1, depth = 0;
  double M = target_weights(P, row0, T, K, TP, w, xs, sel, cand);
  while (depth < P.max_depth) {
    int64_t accepted = -1;
    for (int64_t c = next_child(P, start, k, node, 0); c >= 0; c = next_child(P, start, k, node, c + 1)) {
      const int64_t t = load_index(P.draft_ids, P.tok_code, start + c);
      const float* q = P.draft_probs ? P.draft_probs + (start + c) * V : nullptr;
      const float qt = q ? q[t] : 1.0f;
      const float M32 = static_cast<float>(M);
      const float pt = w[t] / M32;
      if (pt > 0.0f && coin(c) * qt <= pt) { accepted = c; break; }
      if (q) {  // residual max(0, p - q), renormalised; kept as is if it has no mass
        double S = 0.0;
        for (int64_t v = 0; v < V; ++v) {
          w2[v] = std::max(0.0f, w[v] / M32 - q[v]);
          S += w2[v];
        }
        if (S > 0.0) { std::swap(w, w2); M = S; }
      } else if (pt > 0.0f && M - w[t] > 0.0) {  // point mass: p without token t
        M -= w[t];
        w[t] = 0.0f;
      }
    }
    if (accepted < 0) break;
    out[depth] = static_cast<int32_t>(load_index(P.draft_ids, P.tok_code, start + accepted));
    path[depth++] = static_cast<int32_t>(accepted);
    node = accepted;
    M = target_weights(P, row0 + 1 + node, T, K, TP, w, xs, sel, cand);
  }
  const float u = P.uniforms ? P.uniforms[P.N + r] : philox_uniform(P.seed[r], P.offset[r], 0, 1);
  out[depth] = sample_inverse_cdf(w, V, M, u);
  P.num[r] = static_cast<int32_t>(depth + 1);
  for (int64_t d = depth + 1; d <= P.max_depth; ++d) out[d] = -1;
  for (int64_t d = depth; d < P.max_depth; ++d) path[d] = -1;
}

}  // namespace

void rejection_sample(std::uintptr_t logits, int logit_code, int64_t row_stride, int64_t V, std::uintptr_t draft_ids,
                      int tok_code, std::uintptr_t cu_num_draft, std::uintptr_t parents, std::uintptr_t draft_probs,
                      std::uintptr_t temperature, std::uintptr_t top_k, std::uintptr_t top_p, std::uintptr_t uniforms,
                      std::uintptr_t seed, std::uintptr_t offset, int64_t R, int64_t N, int64_t max_depth,
                      std::uintptr_t out_tokens, std::uintptr_t num_emitted, std::uintptr_t accepted_path,
                      int num_threads) {
  const Params P{logits, logit_code, row_stride, V, draft_ids, tok_code, ptr<const int32_t>(cu_num_draft),
                 ptr<const int32_t>(parents), ptr<const float>(draft_probs), ptr<const float>(temperature),
                 ptr<const int32_t>(top_k), ptr<const float>(top_p), ptr<const float>(uniforms),
                 ptr<const int64_t>(seed), ptr<const int64_t>(offset), R, N, max_depth,
                 ptr<int32_t>(out_tokens), ptr<int32_t>(num_emitted), ptr<int32_t>(accepted_path)};
  (void)num_threads;
#ifdef SPD_HAVE_OPENMP
#pragma omp parallel num_threads(num_threads) if (R > 1)
#endif
  {
    std::vector<float> w, w2, xs, sel;
    std::vector<std::pair<float, float>> cand;
#ifdef SPD_HAVE_OPENMP
#pragma omp for schedule(dynamic, 1)
#endif
    for (int64_t r = 0; r < R; ++r) {
      const bool greedy = P.temperature && P.temperature[r] == 0.0f;
      if (greedy) {
        greedy_request(P, r);
      } else {
        if (w.empty()) {
          w.resize(V);
          xs.resize(V);
          if (P.draft_probs) w2.resize(V);
        }
        sampled_request(P, r, w, w2, xs, sel, cand);
      }
    }
  }
}

}  // namespace spd
