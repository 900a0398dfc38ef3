// The CPU kernels' entry points, called by csrc/ops.cpp once it has checked the tensors of an op call.
// They take data pointers, sizes, strides and dtype codes (common.h) and write preallocated outputs; they make
// the always-on index checks of docs/contract.md themselves (std::invalid_argument naming the argument) before
// any parallel loop. Threads: torch's intra-op pool (at::parallel_for).
#pragma once

#include <cstdint>
#include <utility>

#include "verify_greedy.h"

namespace spd {

void rejection_sample(std::uintptr_t logits, int logit_code, int64_t row_stride, int64_t V, std::uintptr_t draft_ids,
                      int tok_code, std::uintptr_t cu_num_draft, std::uintptr_t parents, std::uintptr_t draft_probs,
                      std::uintptr_t temperature, std::uintptr_t top_k, std::uintptr_t top_p, std::uintptr_t uniforms,
                      std::uintptr_t seed, std::uintptr_t offset, int64_t R, int64_t N, int64_t max_depth,
                      std::uintptr_t out_tokens, std::uintptr_t num_emitted, std::uintptr_t accepted_path,
                      std::uintptr_t bonus_token_ids, int bonus_code, int target_is_probs);

// One row's kept target weights (unnormalised, fp32, into out[0:V)) and (mass, threshold), as the sampler
// computes them (temperature > 0); for the tests.
std::pair<double, float> target_weights_row(std::uintptr_t logits, int logit_code, int64_t V, float temperature,
                                            int64_t top_k, float top_p, std::uintptr_t out);

// y[M, N] (row stride ldy) = x[M, K] (row stride ldx) @ w[N, K]^T (+ bias[N]), fp32, for small M (decoding).
void skinny_linear_f32(std::uintptr_t x, int64_t ldx, std::uintptr_t w, std::uintptr_t bias, std::uintptr_t y,
                       int64_t ldy, int64_t M, int64_t N, int64_t K);

// The same product with the weights in a compact exact form (csrc/linear.cpp): fmt kWeightF16 (w fp16 [N, K]),
// kWeightQ8_0 (w int8 [N, K], scale fp32 [N, K / 32]; K % 32 == 0), kWeightQ4_1 (w uint8 [N, K / 2], two
// weights a byte: byte i of a block of 16 holds weight i low and i + 16 high, as in GGUF; scale and min fp32 [N, K / 32]; K % 32 == 0) or kWeightF32.
enum WeightFormat : int { kWeightF32 = 0, kWeightF16 = 1, kWeightQ8_0 = 2, kWeightQ4_1 = 3 };
void skinny_linear_packed(std::uintptr_t x, int64_t ldx, int fmt, std::uintptr_t w, std::uintptr_t scale,
                          std::uintptr_t min, std::uintptr_t bias, std::uintptr_t y, int64_t ldy, int64_t M, int64_t N,
                          int64_t K);
// The packed matrix itself widened to fp32 out[N, K] (contiguous): the values the product above multiplies by.
void widen_packed(int fmt, std::uintptr_t w, std::uintptr_t scale, std::uintptr_t min, std::uintptr_t out, int64_t N,
                  int64_t K);

void tree_attention(std::uintptr_t q, int code, std::uintptr_t k, std::uintptr_t v, std::uintptr_t out,
                    std::uintptr_t block_table, std::uintptr_t kv_lens, std::uintptr_t cu_q, std::uintptr_t mask,
                    int64_t R, int64_t T, int64_t Hq, int64_t Hkv, int64_t D, int64_t block_size, int64_t num_blocks,
                    int64_t max_blocks, int64_t mask_words, int64_t q_stride_t, int64_t q_stride_h, int64_t o_stride_t,
                    int64_t o_stride_h, double scale, int64_t k_stride_b, int64_t k_stride_s, int64_t k_stride_h,
                    int64_t v_stride_b, int64_t v_stride_s, int64_t v_stride_h);

// The runtime's elementwise steps (csrc/norm_rope.cpp), fp32: y[T, N] (contiguous) <- RMSNorm of the rows of x
// (ldx apart) times w[N]; y[T, H, D] (contiguous) <- the rotary embedding (half-split) of x (strides sx_t, sx_h, 1)
// with cos / sin rows sc_t apart, D even.
void rms_norm_f32(const float* x, int64_t ldx, const float* w, float* y, int64_t T, int64_t N, double eps);
void rotary_f32(const float* x, int64_t sx_t, int64_t sx_h, const float* cos, const float* sin, int64_t sc_t,
                float* y, int64_t T, int64_t H, int64_t D);

// sgl-kernel's tree batch (spdkernels/adapters/sglang.py): bs requests of n nodes (node 0 the root), int64 [bs, n]
// candidates / retrive_index / retrive_next_token / retrive_next_sibling, and the in-place int32 outputs predicts
// (flat_limit = min(bs * n, its length) bounds every retrive_index value), accept_index [bs, num_spec],
// accept_num [bs] (csrc/adapters.cpp).
struct SglTrees {
  int64_t bs, n, num_spec, flat_limit;
  const int64_t *cand, *ri, *nt, *ns;
  int32_t *predicts, *accept_index, *accept_num;
};

// verify_tree_greedy: the prediction after node v is target_predict[ri[v]] (int64), or, with target_predict null,
// the argmax of logits row ri[v] (rows of V, row_stride elements apart, dtype logit_code).
void sgl_verify_tree_greedy(const SglTrees& t, const int64_t* target_predict, std::uintptr_t logits, int logit_code,
                            int64_t row_stride, int64_t V);

// tree_speculative_sampling_target_only: coins [bs, n], final_coins [bs], tp [bs, n, V] fp32 probabilities,
// draft_probs [bs, n, V] or null (each rejected child's token gets its target probability, as in sgl-kernel).
void sgl_tree_sampling_target_only(const SglTrees& t, const float* coins, const float* final_coins, const float* tp,
                                   int64_t V, float* draft_probs, double threshold_single, double threshold_acc);

}  // namespace spd
