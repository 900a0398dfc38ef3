// Kernels for the serving-stack adapters (spdkernels/adapters/): the stacks' own rules in their own layouts, so that
// an adapter is one op call instead of a chain of small tensor operations (each of which costs 50-120 us on a CPU
// right after a forward pass has flushed the caches; docs/adapters.md).
//
//   sgl_verify_tree_greedy          sgl-kernel's verify_tree_greedy (target_predict, or the argmax of logit rows)
//   sgl_tree_sampling_target_only   sgl-kernel's tree_speculative_sampling_target_only
//
// Both walk sgl-kernel's linked lists (retrive_next_token / retrive_next_sibling) as sgl-kernel does, after the
// same checks as the adapter's generic path (spdkernels/adapters/sglang.py, identical messages): every tree is read
// and checked before anything is written, so a refused call leaves the outputs as they were. Every index read
// (node ids, flat indices, token ids) is bounds-checked, with validation on or off.
#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>
#include <vector>

#include "common.h"
#include "kernels.h"

namespace spd {
namespace {

[[noreturn]] void fail(const char* arg, const std::string& what) {
  throw std::invalid_argument(std::string(arg) + ": " + what);
}

std::string req(int64_t b) { return "request " + std::to_string(b) + ": "; }

// The adapter's tree checks (sglang.py, _Batch): every node reachable from the root is listed once, after its
// parent (topological numbering), siblings in increasing index order, no path deeper than num_spec - 1 drafts.
// Also: the flat indices of all nodes lie in [0, limit) (predicts and the per-node rows are indexed by them).
// Returns the reachable flags [bs * n].
std::vector<uint8_t> check_sgl_trees(const SglTrees& t) {
  const int64_t bs = t.bs, n = t.n;
  std::vector<uint8_t> reach(bs * n, 0);
  std::vector<int32_t> depth(n);
  for (int64_t i = 0; i < bs * n; ++i)
    if (t.ri[i] < 0 || t.ri[i] >= t.flat_limit)
      fail("retrive_index", "values must lie in [0, " + std::to_string(t.flat_limit) +
                                ") (bs * num_draft_tokens, and the length of predicts), got " + std::to_string(t.ri[i]));
  for (int64_t b = 0; b < bs; ++b) {
    const int64_t* nxt = t.nt + b * n;
    const int64_t* sib = t.ns + b * n;
    uint8_t* seen = reach.data() + b * n;
    seen[0] = 1;
    depth[0] = 0;
    for (int64_t v = 0; v < n; ++v) {
      if (!seen[v]) continue;  // unreachable: sgl-kernel never reads its lists
      int64_t c = nxt[v];
      while (c != -1) {
        if (!(0 < c && c < n) || seen[c])
          fail("retrive_next_token", req(b) + "malformed linked lists at node " + std::to_string(c));
        if (c <= v)
          fail("retrive_next_token", req(b) + "node " + std::to_string(c) + " is a child of node " +
                                         std::to_string(v) +
                                         ": nodes must be numbered in topological order (every child after its parent)");
        seen[c] = 1;
        depth[c] = depth[v] + 1;
        if (depth[c] > t.num_spec - 1)
          fail("accept_index", req(b) + "the tree is deeper than num_spec_step - 1 = " +
                                   std::to_string(t.num_spec - 1) + " drafts (sgl-kernel would stop there)");
        const int64_t s = sib[c];
        if (s != -1 && s <= c)
          fail("retrive_next_sibling", req(b) + "siblings must be listed in increasing node index order (node " +
                                           std::to_string(c) + " is followed by " + std::to_string(s) + ")");
        c = s;
      }
    }
  }
  return reach;
}

// The token of every reachable node but the root lies in [0, V).
void check_drafted_tokens(const SglTrees& t, const std::vector<uint8_t>& reach, int64_t V) {
  for (int64_t i = 0; i < t.bs * t.n; ++i)
    if (reach[i] && i % t.n != 0 && (t.cand[i] < 0 || t.cand[i] >= V))
      fail("candidates", req(i / t.n) + "token " + std::to_string(t.cand[i]) + " of node " + std::to_string(i % t.n) +
                             " is outside the vocabulary [0, " + std::to_string(V) + ")");
}

// The outputs of one request from its path (node ids, root first) and the token after its last node.
void write_path(const SglTrees& t, int64_t b, const std::vector<int64_t>& path, int64_t last_token) {
  const int64_t n = t.n;
  const int64_t* ri = t.ri + b * n;
  const int64_t* cand = t.cand + b * n;
  for (size_t d = 0; d < path.size(); ++d) {
    t.accept_index[b * t.num_spec + static_cast<int64_t>(d)] = static_cast<int32_t>(ri[path[d]]);
    t.predicts[ri[path[d]]] = static_cast<int32_t>(d + 1 < path.size() ? cand[path[d + 1]] : last_token);
  }
  t.accept_num[b] = static_cast<int32_t>(path.size() - 1);
}

// The positive part of p (NaN and negative entries carry no mass).
inline float mass(float p) { return p > 0.0f ? p : 0.0f; }

// Sum of the positive parts of row[0:len), fp32 lanes (vectorised), returned in double.
SPD_CLONES double block_mass(const float* row, int64_t len) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= len; i += 8)
    for (int j = 0; j < 8; ++j) acc[j] += mass(row[i + j]);
  double s = 0.0;
  for (int j = 0; j < 8; ++j) s += acc[j];
  for (; i < len; ++i) s += mass(row[i]);
  return s;
}

// One token from a probability row without the tokens in `ex` (the children tried at the node, in sibling order), by
// inverse CDF with `coin`: the first id whose running sum of mass exceeds coin * (the row's mass without ex). The
// tried tokens are removed as the generic path's forced rejection removes them: unless the first of them holds at
// least 1 - 2^-24 of the row (the rejection cannot be forced) or nothing is left without them (then the whole
// row). Block sums of 512 entries find the block (fp32 lanes: a coin within ~1e-7 of a step may land on the
// neighbouring token), then that block is summed entry by entry in double; the blocks holding a tried token are
// summed entry by entry, so a small remaining mass is not lost to rounding. A row without any mass (invalid input,
// validation off) gives its argmax, so the token is always in [0, V).
int64_t draw_excluding(const float* row, int64_t V, const std::vector<int64_t>& ex, float coin) {
  constexpr int64_t kBlock = 512;
  const int64_t nblocks = (V + kBlock - 1) / kBlock;
  std::vector<int64_t> excl(ex);
  std::sort(excl.begin(), excl.end());
  excl.erase(std::unique(excl.begin(), excl.end()), excl.end());
  const auto excluded = [&](int64_t i) { return std::binary_search(excl.begin(), excl.end(), i); };
  std::vector<double> blocks(nblocks);
  std::vector<uint8_t> has_excl(nblocks, 0);
  for (int64_t x : excl) has_excl[x / kBlock] = 1;
  const auto sum_blocks = [&](bool exclude) {
    double total = 0.0;
    for (int64_t k = 0; k < nblocks; ++k) {
      const int64_t lo = k * kBlock, len = std::min(kBlock, V - lo);
      if (exclude && has_excl[k]) {
        double b = 0.0;
        for (int64_t i = lo; i < lo + len; ++i)
          if (!excluded(i)) b += mass(row[i]);
        blocks[k] = b;
      } else {
        blocks[k] = block_mass(row + lo, len);
      }
      total += blocks[k];
    }
    return total;
  };
  bool use_excl = !ex.empty() && !(row[ex[0]] >= kRejectCoin);  // (the generic path's forced rejection fails there)
  double kept = sum_blocks(use_excl);
  if (use_excl && !(kept > 0.0 && std::isfinite(kept))) {  // nothing left without the tried tokens: the whole row
    use_excl = false;
    kept = sum_blocks(false);
  }
  if (!use_excl) excl.clear();
  if (!(kept > 0.0) || !std::isfinite(kept)) return row_argmax(row, V, kF32);
  const double target = static_cast<double>(coin) * kept;
  double run = 0.0;
  int64_t last_pos = -1;
  for (int64_t k = 0; k < nblocks; ++k) {
    if (run + blocks[k] <= target && k + 1 < nblocks) {  // not in this block (up to rounding, checked below)
      run += blocks[k];
      continue;
    }
    const int64_t end = std::min(V, (k + 1) * kBlock);
    const bool look_up = !excl.empty() && has_excl[k];  // (binary searches only in the blocks holding a tried token)
    for (int64_t i = k * kBlock; i < end; ++i) {
      const double w = mass(row[i]);
      if (w <= 0.0 || (look_up && excluded(i))) continue;
      run += w;
      last_pos = i;
      if (run > target) return i;
    }
  }
  if (last_pos >= 0) return last_pos;  // rounding: the coin at the very top
  for (int64_t i = V - 1; i >= 0; --i)  // (blocks skipped by rounding held the last mass)
    if (mass(row[i]) > 0.0f && !excluded(i)) return i;
  return row_argmax(row, V, kF32);
}

}  // namespace

void sgl_verify_tree_greedy(const SglTrees& t, const int64_t* target_predict, std::uintptr_t logits, int logit_code,
                            int64_t row_stride, int64_t V) {
  const std::vector<uint8_t> reach = check_sgl_trees(t);
  if (!target_predict) check_drafted_tokens(t, reach, V);  // (with logits: a token outside [0, V) is a caller's bug)
  const int64_t n = t.n;
  const size_t esz = static_cast<size_t>(element_size(logit_code));
  std::vector<int64_t> path;
  for (int64_t b = 0; b < t.bs; ++b) {
    const int64_t* ri = t.ri + b * n;
    const int64_t* cand = t.cand + b * n;
    const auto pred = [&](int64_t v) -> int64_t {
      if (target_predict) return target_predict[ri[v]];
      return row_argmax(reinterpret_cast<const char*>(logits) + static_cast<size_t>(ri[v] * row_stride) * esz, V,
                        logit_code);
    };
    path.assign(1, 0);
    int64_t p = pred(0);
    while (static_cast<int64_t>(path.size()) < t.num_spec) {
      int64_t c = t.nt[b * n + path.back()];
      while (c != -1 && cand[c] != p) c = t.ns[b * n + c];
      if (c == -1) break;
      path.push_back(c);
      p = pred(c);
    }
    write_path(t, b, path, p);
  }
}

void sgl_tree_sampling_target_only(const SglTrees& t, const float* coins, const float* final_coins, const float* tp,
                                   int64_t V, float* draft_probs, double threshold_single, double threshold_acc) {
  const std::vector<uint8_t> reach = check_sgl_trees(t);
  const int64_t bs = t.bs, n = t.n;
  check_drafted_tokens(t, reach, V);  // the tokens whose probabilities the walk reads
  // sgl-kernel's fp32 arithmetic: accept child c of node v iff coin(v) <= S / max(threshold_acc, 1e-9) or
  // p(c) >= threshold_single, S the running sum of v's row over the children tried so far, c included
  const float th_acc = static_cast<float>(std::max(threshold_acc, 1e-9));
  const float th_single = static_cast<float>(threshold_single);
  std::vector<std::vector<int64_t>> paths(bs);
  std::vector<std::vector<int64_t>> tried(bs);  // tokens of the children tried at the path's last node
  for (int64_t b = 0; b < bs; ++b) {
    const int64_t* cand = t.cand + b * n;
    std::vector<int64_t>& path = paths[b];
    path.assign(1, 0);
    while (static_cast<int64_t>(path.size()) < t.num_spec) {
      const int64_t v = path.back();
      const float* row = tp + (b * n + v) * V;
      const float coin = coins[b * n + v];
      float acc = 0.0f;
      int64_t c = t.nt[b * n + v];
      tried[b].clear();
      while (c != -1) {
        const float p = row[cand[c]];
        acc += p;
        if (coin <= acc / th_acc || p >= th_single) break;
        tried[b].push_back(cand[c]);
        if (draft_probs) draft_probs[(b * n + v) * V + cand[c]] = p;  // sgl-kernel's side effect
        c = t.ns[b * n + c];
      }
      if (c == -1) break;
      path.push_back(c);
      tried[b].clear();
    }
  }
  // The token after each path's last node: inverse CDF (the first id whose running sum exceeds coin * sum) over that
  // node's row without the tokens tried there; the whole row if those held all of its mass.
  std::vector<int64_t> sampled(bs);
  parallel_for_each(bs, std::max<int64_t>(1, 65536 / std::max<int64_t>(V, 1)), [&](int64_t b) {
    sampled[b] = draw_excluding(tp + (b * n + paths[b].back()) * V, V, tried[b], final_coins[b]);
  });
  for (int64_t b = 0; b < bs; ++b) write_path(t, b, paths[b], sampled[b]);
}

}  // namespace spd
