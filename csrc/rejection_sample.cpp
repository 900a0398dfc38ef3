// rejection_sample on the CPU: lossless speculative sampling of chains and token trees
// (DESIGN.md section 3; the reference is spdkernels/reference/rejection_sample.py).
//
// Parallel over requests. A sampled request walks its tree; at each visited node the row's target
// distribution is built once in a per-thread scratch row (one read of the logits): weights
// exp((x - max) / T), the top-k threshold by selection (std::nth_element: the k-th largest logit), the
// top-p threshold by a mass-weighted quickselect (expected O(V); no sort of the vocabulary), then
// normalised. Rejections update the scratch row in place (p <- normalise(max(0, p - q))); the final
// token is drawn by inverse CDF over ids with the request's final coin. Greedy requests reuse the
// greedy walk (argmax of the visited rows only). Coins: explicit uniforms or Philox4x32-10.
#include <algorithm>
#include <cmath>
#include <utility>
#include <vector>

#include "common.h"

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

// Same mapping as spdkernels.reference.philox_uniform: ((x >> 8) + 0.5) / 2^24, in (0, 1), exact in fp32.
inline float philox_uniform(int64_t seed, int64_t offset, uint32_t index, uint32_t stream) {
  const uint64_t s = static_cast<uint64_t>(seed), o = static_cast<uint64_t>(offset);
  const uint32_t x = philox4x32_10(index, stream, static_cast<uint32_t>(o), static_cast<uint32_t>(o >> 32),
                                   static_cast<uint32_t>(s), static_cast<uint32_t>(s >> 32));
  return (static_cast<float>(x >> 8) + 0.5f) * (1.0f / 16777216.0f);
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

// p <- target distribution of `row` (normalised fp32), using xs as scratch for the converted logits.
void target_dist(const Params& P, int64_t row, float T, int64_t K, float top_p, std::vector<float>& p,
                 std::vector<float>& xs, std::vector<float>& sel, std::vector<std::pair<float, float>>& cand) {
  const int64_t V = P.V;
  const void* src = row_ptr(P, row);
  float mx = -__builtin_inff();
  for (int64_t v = 0; v < V; ++v) { xs[v] = load_f(src, v, P.code); mx = std::max(mx, xs[v]); }
  for (int64_t v = 0; v < V; ++v) p[v] = std::exp((xs[v] - mx) / T);
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
  double mass = 0.0;
  for (int64_t v = 0; v < V; ++v) {
    if (!(xs[v] >= tau)) p[v] = 0.0f;
    mass += p[v];
  }
  const float inv = static_cast<float>(mass);
  for (int64_t v = 0; v < V; ++v) p[v] = p[v] / inv;
}

int32_t sample_inverse_cdf(const std::vector<float>& p, int64_t V, float u) {
  double total = 0.0;
  for (int64_t v = 0; v < V; ++v) total += p[v];
  const double thr = static_cast<double>(u) * total;
  double c = 0.0;
  int32_t last_pos = 0;
  for (int64_t v = 0; v < V; ++v) {
    if (p[v] > 0) last_pos = static_cast<int32_t>(v);
    c += p[v];
    if (c > thr) return static_cast<int32_t>(v);
  }
  return last_pos;  // rounding: u * total >= the running sum at the end
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

void sampled_request(const Params& P, int64_t r, std::vector<float>& p, std::vector<float>& xs,
                     std::vector<float>& sel, std::vector<std::pair<float, float>>& cand) {
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
  target_dist(P, row0, T, K, TP, p, xs, sel, cand);
  while (depth < P.max_depth) {
    int64_t accepted = -1;
    for (int64_t c = next_child(P, start, k, node, 0); c >= 0; c = next_child(P, start, k, node, c + 1)) {
      const int64_t t = load_index(P.draft_ids, P.tok_code, start + c);
      const float* q = P.draft_probs ? P.draft_probs + (start + c) * V : nullptr;
      const float qt = q ? q[t] : 1.0f;
      if (p[t] > 0.0f && coin(c) * qt <= p[t]) { accepted = c; break; }
      double mass = 0.0;  // residual max(0, p - q), renormalised; kept as is if it has no mass
      if (q) {
        for (int64_t v = 0; v < V; ++v) mass += std::max(0.0f, p[v] - q[v]);
      } else {
        for (int64_t v = 0; v < V; ++v) mass += (v == t) ? std::max(0.0f, p[v] - 1.0f) : p[v];
      }
      if (mass > 0.0) {
        const float m = static_cast<float>(mass);
        for (int64_t v = 0; v < V; ++v) p[v] = std::max(0.0f, p[v] - (q ? q[v] : (v == t ? 1.0f : 0.0f))) / m;
      }
    }
    if (accepted < 0) break;
    out[depth] = static_cast<int32_t>(load_index(P.draft_ids, P.tok_code, start + accepted));
    path[depth++] = static_cast<int32_t>(accepted);
    node = accepted;
    target_dist(P, row0 + 1 + node, T, K, TP, p, xs, sel, cand);
  }
  const float u = P.uniforms ? P.uniforms[P.N + r] : philox_uniform(P.seed[r], P.offset[r], 0, 1);
  out[depth] = sample_inverse_cdf(p, V, u);
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
    std::vector<float> p, xs, sel;
    std::vector<std::pair<float, float>> cand;
#ifdef SPD_HAVE_OPENMP
#pragma omp for schedule(dynamic, 1)
#endif
    for (int64_t r = 0; r < R; ++r) {
      const bool greedy = P.temperature && P.temperature[r] == 0.0f;
      if (greedy) {
        greedy_request(P, r);
      } else {
        if (p.empty()) { p.resize(V); xs.resize(V); }
        sampled_request(P, r, p, xs, sel, cand);
      }
    }
  }
}

}  // namespace spd
