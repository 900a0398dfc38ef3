#pragma once
#include <cstdint>

namespace spd {

// Greedy walk over precomputed per-row argmaxes; shared by verify_greedy and the greedy requests of
// rejection_sample. Writes out_tokens [R, max_depth+1], num_emitted [R], accepted_path [R, max_depth].
void greedy_walk(const int32_t* row_argmax_ids, std::uintptr_t draft_ids, int tok_code, const int32_t* cu,
                 const int32_t* parents, int64_t R, int64_t max_depth, int32_t* out_tokens,
                 int32_t* num_emitted, int32_t* accepted_path);

// The op (csrc/ops.cpp has checked the layout): argmax of every row, then the walk.
void verify_greedy(std::uintptr_t logits, int logit_code, int64_t row_stride, int64_t V,
                   std::uintptr_t draft_ids, int tok_code, std::uintptr_t cu_num_draft,
                   std::uintptr_t parents, int64_t R, int64_t N, int64_t max_depth, std::uintptr_t out_tokens,
                   std::uintptr_t num_emitted, std::uintptr_t accepted_path);

}  // namespace spd
