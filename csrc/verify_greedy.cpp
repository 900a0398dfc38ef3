// verify_greedy on the CPU: greedy verification of chains and token trees (docs/contract.md section 3).
//
// Phase 1, parallel over all N + R logit rows: argmax of each row, one read of the row.
// Phase 2, parallel over requests: walk from the root; among the children of the current node (index
// order) accept the first whose token equals the current row's argmax; otherwise emit the argmax and
// stop. The walk stops accepting at max_depth (only reachable when validation is off and max_depth is
// smaller than the tree's depth): the token emitted there is still the greedy token of that row.
#include <vector>

#include "common.h"
#include "verify_greedy.h"

namespace spd {

void greedy_walk(const int32_t* row_argmax_ids, std::uintptr_t draft_ids, int tok_code, const int32_t* cu,
                 const int32_t* parents, int64_t R, int64_t max_depth, int32_t* out_tokens,
                 int32_t* num_emitted, int32_t* accepted_path) {
  parallel_for_each(R, 64, [&](int64_t r) {
    const int64_t start = cu[r], k = cu[r + 1] - cu[r];
    const int64_t row0 = start + r;
    int32_t* out = out_tokens + r * (max_depth + 1);
    int32_t* path = accepted_path + r * max_depth;
    int64_t node = -1, depth = 0;
    int32_t best = row_argmax_ids[row0];
    while (depth < max_depth) {
      int64_t child = -1;
      for (int64_t j = node + 1; j < k; ++j) {
        const int64_t par = parents ? parents[start + j] : j - 1;
        if (par == node && load_index(draft_ids, tok_code, start + j) == best) { child = j; break; }
        if (!parents) break;  // chain: the only child of `node` is node + 1
      }
      if (child < 0) break;
      out[depth] = best;
      path[depth] = static_cast<int32_t>(child);
      ++depth;
      node = child;
      best = row_argmax_ids[row0 + 1 + node];
    }
    out[depth] = best;
    num_emitted[r] = static_cast<int32_t>(depth + 1);
    for (int64_t d = depth + 1; d <= max_depth; ++d) out[d] = -1;
    for (int64_t d = depth; d < max_depth; ++d) path[d] = -1;
  });
}

void verify_greedy(std::uintptr_t logits, int logit_code, int64_t row_stride, int64_t V,
                   std::uintptr_t draft_ids, int tok_code, std::uintptr_t cu_num_draft,
                   std::uintptr_t parents, int64_t R, int64_t N, int64_t max_depth, std::uintptr_t out_tokens,
                   std::uintptr_t num_emitted, std::uintptr_t accepted_path) {
  const int32_t* cu = ptr<const int32_t>(cu_num_draft);
  check_draft_batch(cu, R, N, parents ? ptr<const int32_t>(parents) : nullptr, draft_ids, tok_code, V, false);
  const int64_t rows = R > 0 ? N + R : 0;
  std::vector<int32_t> amax(static_cast<size_t>(rows));
  const char* base = ptr<const char>(logits);
  const int64_t row_bytes = row_stride * element_size(logit_code);
  parallel_for_each(rows, 1, [&](int64_t i) { amax[i] = row_argmax(base + i * row_bytes, V, logit_code); });

  greedy_walk(amax.data(), draft_ids, tok_code, cu, parents ? ptr<const int32_t>(parents) : nullptr, R,
              max_depth, ptr<int32_t>(out_tokens), ptr<int32_t>(num_emitted), ptr<int32_t>(accepted_path));
}

}  // namespace spd
