// spdkernels._C: the CPU kernels registered with torch's dispatcher.
//
// The public ops (schemas in spdkernels/ops/*.py, defined in Python so that the package also works without this
// extension) get their CPU kernels here: verify_greedy, rejection_sample and tree_attention. Each checks its tensors (dtype,
// shape, device, with TORCH_CHECK_VALUE: a ValueError naming the argument in Python), allocates the outputs and
// runs the kernel; the kernels' always-on index checks (token ids, cu_num_draft, parents, block tables) run with
// the package's validation off too. Policy (value validation, a forced backend) lives in the Python wrappers,
// not here: a call that reaches this kernel runs it.
//
// Private ops, defined here, for the Python side of the package:
//   _cpu_tree_attention  the CPU tree_attention kernel alone (the 'cpp' backend when it is called directly; the
//                        public op's CPU kernel runs the same function, and sends fp64 to the torch backend)
//   _cpu_skinny_linear   the decode-time fp32 linear of the runtime (spdkernels/runtime/linear.py)
//   _cpu_skinny_linear_packed   the same with compact exact weights (fp16, Q8_0, Q4_1 blocks)
//   _cpu_widen_packed    such a weight widened to fp32 (the runtime's BLAS path for many rows)
//   _cpu_rms_norm, _cpu_rotary  the runtime's RMSNorm and rotary embedding, fp32, one pass each (csrc/norm_rope.cpp)
//   _cpu_target_weights  one row's target weights as the sampler computes them (tests)
//   _cpu_sgl_verify_tree_greedy, _cpu_sgl_tree_sampling_target_only  sgl-kernel's ops in its layout, in place
//                        (spdkernels/adapters/sglang.py; kernels in csrc/adapters.cpp)
//   _cpu_flashinfer_chain_sampling  FlashInfer's chain_speculative_sampling in its layout: the rejection_sample
//                        kernel and FlashInfer's counters in one call (spdkernels/adapters/flashinfer.py)
//   _cpu_vllm_rejection_sample  vLLM's rejection_sample in its layout, calls without seeded requests
//                        (spdkernels/adapters/vllm.py)
//   _cpu_hf_verify_greedy  the greedy verification step of the transformers adapter (spdkernels/adapters/
//                        transformers.py): the drafts as host ints
//   _cpu_isa_level, _cpu_set_isa_cap  the instruction-set level of the hand-dispatched kernels
//
// The ops here with float outputs are inference ops (no backward, no forward derivative): their AutogradCPU kernel
// (inference_only) refuses an input that would need one, a tensor that requires grad under grad mode or one carrying
// a forward-mode tangent, with a ValueError naming it; torch's fallback would run the op and give no gradient or a
// zero tangent. Registered for AutogradCUDA too for the public op; spdkernels/_library.py registers the same check
// in Python for the public op's Autograd alias (every device), which these take precedence over.
//
// The module is imported as spdkernels._C (PyInit__C below is all of its Python face): importing it runs the
// registrations. It links the libtorch it was built against; spdkernels/_cpp.py loads it only under that torch.
#include <Python.h>  // first, as Python asks

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/EmptyTensor.h>
#include <ATen/core/DistributionsHelper.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/grad_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/fill.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

#include "common.h"
#include "kernels.h"

namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;
using Out3 = std::tuple<Tensor, Tensor, Tensor>;
using uptr = std::uintptr_t;

int float_code(const Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return spd::kF32;
    case at::kHalf: return spd::kF16;
    case at::kBFloat16: return spd::kBF16;
    default: return -1;
  }
}

int int_code(const Tensor& t) {
  switch (t.scalar_type()) {
    case at::kInt: return spd::kI32;
    case at::kLong: return spd::kI64;
    default: return -1;
  }
}

std::string shape_of(const Tensor& t) {
  std::string s = "[";
  for (int64_t i = 0; i < t.dim(); ++i) s += (i ? ", " : "") + std::to_string(t.size(i));
  return s + "]";
}

// `arg` is a CPU tensor with `ndim` dimensions whose dtype passes `dtype_ok` (`dtypes` names them).
template <typename DtypeOk>
void check_tensor(const Tensor& t, const char* arg, int64_t ndim, DtypeOk dtype_ok, const char* dtypes) {
  TORCH_CHECK_VALUE(t.defined(), arg, ": expected a tensor");
  TORCH_CHECK_VALUE(t.dim() == ndim, arg, ": expected ", ndim, " dimension(s), got shape ", shape_of(t));
  TORCH_CHECK_VALUE(dtype_ok(t), arg, ": expected dtype in (", dtypes, "), got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.device().is_cpu() && t.layout() == at::kStrided, arg,
                    ": expected a strided CPU tensor (like target_logits), got ", t.device());
}

void check_vec(const Tensor& t, const char* arg, at::ScalarType dt, int64_t n, const char* n_name) {
  check_tensor(t, arg, 1, [dt](const Tensor& x) { return x.scalar_type() == dt; }, c10::toString(dt));
  TORCH_CHECK_VALUE(t.size(0) == n, arg, ": expected shape [", n_name, "] = [", n, "], got ", shape_of(t));
}

void check_opt_vec(const OptTensor& t, const char* arg, at::ScalarType dt, int64_t n, const char* n_name) {
  if (t.has_value()) check_vec(*t, arg, dt, n, n_name);
}

// Kernels read every tensor but the logits (whose rows may be strided) as dense arrays.
Tensor dense(const Tensor& t) { return t.is_contiguous() ? t : t.contiguous(); }
OptTensor dense(const OptTensor& t) { return t.has_value() ? OptTensor(dense(*t)) : std::nullopt; }
uptr addr(const Tensor& t) { return reinterpret_cast<uptr>(t.data_ptr()); }
uptr addr(const OptTensor& t) { return t.has_value() ? addr(*t) : 0; }

// The draft batch of docs/contract.md section 3: logits [N + R, V] (or [N, V] with bonus tokens), tokens [N],
// cu_num_draft [R + 1], parents [N] or none. Returns the logits with unit-stride rows; sets R, N, max depth.
Tensor check_draft_batch(const Tensor& logits, const Tensor& ids, const Tensor& cu, const OptTensor& parents,
                         const c10::SymInt& max_depth, int64_t& R, int64_t& N, int64_t& md, bool bonus_rows) {
  check_tensor(logits, "target_logits", 2, [](const Tensor& t) { return float_code(t) >= 0; },
               "float32, float16, bfloat16");
  check_tensor(ids, "draft_token_ids", 1, [](const Tensor& t) { return int_code(t) >= 0; }, "int32, int64");
  check_tensor(cu, "cu_num_draft", 1, [](const Tensor& t) { return t.scalar_type() == at::kInt; }, "int32");
  TORCH_CHECK_VALUE(cu.size(0) >= 1, "cu_num_draft: expected shape [R + 1] with R >= 0, got an empty tensor");
  R = cu.size(0) - 1;
  N = ids.size(0);
  const int64_t rows = bonus_rows ? N : N + R;
  TORCH_CHECK_VALUE(logits.size(0) == rows, "target_logits: expected ", bonus_rows ? "[N, V] = [" : "[N + R, V] = [",
                    rows, ", V] rows, got shape ", shape_of(logits));
  TORCH_CHECK_VALUE(logits.size(1) >= 1, "target_logits: expected a vocabulary of at least one token");
  TORCH_CHECK_VALUE(logits.size(1) <= INT32_MAX,
                    "target_logits: a vocabulary over 2^31 - 1 tokens (token ids are int32)");
  check_opt_vec(parents, "parents", at::kInt, N, "N");
  const auto m = max_depth.maybe_as_int();
  TORCH_CHECK_VALUE(m.has_value() && *m >= 0 && *m < INT32_MAX, "max_depth: expected an int in [0, 2^31 - 1)");
  md = *m;
  return logits.stride(1) == 1 ? logits : logits.contiguous();
}

Out3 int_outputs(int64_t R, int64_t md) {
  const auto o = at::TensorOptions().dtype(at::kInt);
  return {at::empty({R, md + 1}, o), at::empty({R}, o), at::empty({R, md}, o)};
}

// The kernels' index checks throw std::invalid_argument ("arg: what"): a ValueError in Python.
template <typename F>
void run_checked(const F& f) {
  try {
    f();
  } catch (const std::invalid_argument& e) {
    TORCH_CHECK_VALUE(false, e.what());
  }
}

Out3 verify_greedy_cpu(const Tensor& target_logits, const Tensor& draft_token_ids, const Tensor& cu_num_draft,
                       const OptTensor& parents, c10::SymInt max_depth) {
  int64_t R = 0, N = 0, md = 0;
  const Tensor logits =
      check_draft_batch(target_logits, draft_token_ids, cu_num_draft, parents, max_depth, R, N, md, false);
  Out3 out = int_outputs(R, md);  // (R == 0: the kernel still checks cu_num_draft == [N])
  const Tensor ids = dense(draft_token_ids), cu = dense(cu_num_draft);
  const OptTensor par = dense(parents);
  run_checked([&] {
    spd::verify_greedy(addr(logits), float_code(logits), logits.stride(0), logits.size(1), addr(ids), int_code(ids),
                       addr(cu), addr(par), R, N, md, addr(std::get<0>(out)), addr(std::get<1>(out)),
                       addr(std::get<2>(out)));
  });
  return out;
}

Out3 rejection_sample_cpu(const Tensor& target_logits, const Tensor& draft_token_ids, const Tensor& cu_num_draft,
                          const OptTensor& parents, const OptTensor& draft_probs, const OptTensor& temperature,
                          const OptTensor& top_k, const OptTensor& top_p, const OptTensor& uniforms,
                          const OptTensor& seed, const OptTensor& offset, c10::SymInt max_depth,
                          const OptTensor& bonus_token_ids, bool target_is_probs) {
  int64_t R = 0, N = 0, md = 0;
  const bool bonus = bonus_token_ids.has_value();
  const Tensor logits =
      check_draft_batch(target_logits, draft_token_ids, cu_num_draft, parents, max_depth, R, N, md, bonus);
  const int64_t V = logits.size(1);
  if (bonus) {
    check_tensor(*bonus_token_ids, "bonus_token_ids", 1, [](const Tensor& t) { return int_code(t) >= 0; },
                 "int32, int64");
    TORCH_CHECK_VALUE(bonus_token_ids->size(0) == R, "bonus_token_ids: expected shape [R] = [", R, "], got ",
                      shape_of(*bonus_token_ids));
    TORCH_CHECK_VALUE(!parents.has_value(), "bonus_token_ids: only for chains (parents must be None): a tree needs "
                      "the row after every leaf");
  }
  if (target_is_probs) {
    TORCH_CHECK_VALUE(!top_k.has_value(), "top_k: not applied to probabilities (target_is_probs=True)");
    TORCH_CHECK_VALUE(!top_p.has_value(), "top_p: not applied to probabilities (target_is_probs=True)");
  }
  if (draft_probs.has_value()) {
    check_tensor(*draft_probs, "draft_probs", 2, [](const Tensor& t) { return t.scalar_type() == at::kFloat; },
                 "float32");
    TORCH_CHECK_VALUE(draft_probs->size(0) == N && draft_probs->size(1) == V, "draft_probs: expected shape [N, V] = [",
                      N, ", ", V, "], got ", shape_of(*draft_probs));
  }
  check_opt_vec(temperature, "temperature", at::kFloat, R, "R");
  check_opt_vec(top_k, "top_k", at::kInt, R, "R");
  check_opt_vec(top_p, "top_p", at::kFloat, R, "R");
  check_opt_vec(seed, "seed", at::kLong, R, "R");
  check_opt_vec(offset, "offset", at::kLong, R, "R");
  check_opt_vec(uniforms, "uniforms", at::kFloat, N + R, "N + R");
  if (uniforms.has_value()) {
    TORCH_CHECK_VALUE(!seed.has_value() && !offset.has_value(), "uniforms: pass either uniforms or seed/offset, not both");
  } else {
    TORCH_CHECK_VALUE(seed.has_value(), "seed: the op needs explicit uniforms or a seed tensor (spdkernels."
                      "rejection_sample draws seeds from torch's default generator when given neither)");
  }
  Out3 out = int_outputs(R, md);  // (R == 0: the kernel still checks cu_num_draft == [N])
  const Tensor ids = dense(draft_token_ids), cu = dense(cu_num_draft);
  const OptTensor par = dense(parents), dp = dense(draft_probs), temp = dense(temperature), tk = dense(top_k),
                  tp = dense(top_p), u = dense(uniforms), sd = dense(seed), bon = dense(bonus_token_ids),
                  off = dense(offset);  // none: the kernel takes zeros
  run_checked([&] {
    spd::rejection_sample(addr(logits), float_code(logits), logits.stride(0), V, addr(ids), int_code(ids), addr(cu),
                          addr(par), addr(dp), addr(temp), addr(tk), addr(tp), addr(u), addr(sd), addr(off), R, N, md,
                          addr(std::get<0>(out)), addr(std::get<1>(out)), addr(std::get<2>(out)), addr(bon),
                          bon.has_value() ? int_code(*bon) : 0, target_is_probs ? 1 : 0);
  });
  return out;
}

// The fused adapter ops run right after a model's forward pass has flushed the CPU caches, where every dispatched
// tensor operation (at::empty, a view, a clone) costs ~10-30 us: they allocate what they return without a dispatch
// and keep their scratch arrays per thread (nothing here calls back into Python or into another op).
Tensor empty_i32(at::IntArrayRef size) { return Tensor(at::detail::empty_cpu(size, at::kInt)); }

template <typename T, int Slot = 0>  // (one array per (type, slot): the arrays of one call must not alias)
T* scratch(int64_t n) {
  static thread_local std::vector<T> v;
  if (static_cast<int64_t>(v.size()) < n) v.resize(static_cast<size_t>(n));
  return v.data();
}

// (before any coin is drawn: a refused call leaves the generator as it was)
void check_vocab(const char* tname, int64_t V) {
  TORCH_CHECK_VALUE(V >= 1, tname, ": expected a vocabulary of at least one token");
  TORCH_CHECK_VALUE(V <= INT32_MAX, tname, ": a vocabulary over 2^31 - 1 tokens (token ids are int32)");
}

// The rejection_sample kernel on chains (no parents) with explicit coins, for the fused adapter ops, whose callers
// have checked the shapes and dtypes (the kernel checks the token ids, cu_num_draft and bonus ids itself).
// `target` has unit-stride rows; the outputs: tokens [R, max_depth + 1] (returned), the emitted counts [R] into
// `num` when given (scratch otherwise).
Tensor chain_rejection(const char* tname, const Tensor& target, int64_t row_stride, int64_t V, uptr ids, int id_code,
                       const int32_t* cu, uptr draft_probs, const float* temperature, const float* coins, int64_t R, int64_t N,
                       int64_t md, uptr bonus, int bonus_code, bool target_is_probs, int32_t* num = nullptr) {
  check_vocab(tname, V);
  Tensor out = empty_i32({R, md + 1});
  int32_t* path = scratch<int32_t>(R * md + R);  // int32 slot 0: the callers keep their int32 arrays in slot 1
  if (num == nullptr) num = path + R * md;
  run_checked([&] {
    spd::rejection_sample(addr(target), float_code(target), row_stride, V, ids, id_code,
                          reinterpret_cast<uptr>(cu), 0, draft_probs, reinterpret_cast<uptr>(temperature), 0, 0,
                          reinterpret_cast<uptr>(coins), 0, 0, R, N, md, addr(out), reinterpret_cast<uptr>(num),
                          reinterpret_cast<uptr>(path), bonus, bonus_code, target_is_probs ? 1 : 0);
  });
  return out;
}

// The CPU tree_attention kernel (the private op's, and the body of the public op's CPU kernel below), with its own
// argument checks: q [T, Hq, D], caches
// [num_blocks, block_size, Hkv, D] read through their strides, fp32/fp16/bf16.
Tensor tree_attention_cpu(const Tensor& q, const Tensor& k_cache, const Tensor& v_cache, const Tensor& block_table,
                          const Tensor& kv_lens, const Tensor& cu_q_lens, const OptTensor& tree_mask, double scale) {
  const auto same = [&q](const Tensor& t) { return t.scalar_type() == q.scalar_type(); };
  check_tensor(q, "q", 3, [](const Tensor& t) { return float_code(t) >= 0; }, "float32, float16, bfloat16");
  check_tensor(k_cache, "k_cache", 4, same, "the dtype of q");
  check_tensor(v_cache, "v_cache", 4, same, "the dtype of q");
  TORCH_CHECK_VALUE(k_cache.sizes() == v_cache.sizes(), "v_cache: expected the shape of k_cache ", shape_of(k_cache),
                    ", got ", shape_of(v_cache));
  const int64_t T = q.size(0), Hq = q.size(1), D = q.size(2);
  const int64_t nb = k_cache.size(0), bs = k_cache.size(1), Hkv = k_cache.size(2);
  TORCH_CHECK_VALUE(k_cache.size(3) == D, "k_cache: head dim ", k_cache.size(3), " differs from q's ", D);
  TORCH_CHECK_VALUE(Hkv >= 1 && Hq % Hkv == 0, "k_cache: query heads (", Hq, ") must be a multiple of KV heads (",
                    Hkv, ")");
  TORCH_CHECK_VALUE(bs >= 1 && (bs & (bs - 1)) == 0, "k_cache: block size must be a power of two, got ", bs);
  check_tensor(cu_q_lens, "cu_q_lens", 1, [](const Tensor& t) { return t.scalar_type() == at::kInt; }, "int32");
  TORCH_CHECK_VALUE(cu_q_lens.size(0) >= 1, "cu_q_lens: expected shape [R + 1], got an empty tensor");
  const int64_t R = cu_q_lens.size(0) - 1;
  check_tensor(block_table, "block_table", 2, [](const Tensor& t) { return t.scalar_type() == at::kInt; }, "int32");
  TORCH_CHECK_VALUE(block_table.size(0) == R, "block_table: expected shape [R, max_blocks] with R = ", R, ", got ",
                    shape_of(block_table));
  check_vec(kv_lens, "kv_lens", at::kInt, R, "R");
  if (tree_mask.has_value()) {
    check_tensor(*tree_mask, "tree_mask", 2, [](const Tensor& t) { return t.scalar_type() == at::kInt; }, "int32");
    TORCH_CHECK_VALUE(tree_mask->size(0) == T && tree_mask->size(1) >= 1, "tree_mask: expected shape [T, W] with T = ",
                      T, " and W >= 1, got ", shape_of(*tree_mask));
  }
  const Tensor qd = q.stride(2) == 1 ? q : q.contiguous();
  const Tensor kd = k_cache.stride(3) == 1 ? k_cache : k_cache.contiguous();  // strided blocks/slots/heads: in place
  const Tensor vd = v_cache.stride(3) == 1 ? v_cache : v_cache.contiguous();
  const Tensor bt = dense(block_table), lens = dense(kv_lens), cu = dense(cu_q_lens);
  const OptTensor mask = dense(tree_mask);
  Tensor out = at::empty(q.sizes(), q.options());  // every row written (a query belongs to a request)
  run_checked([&] {  // (empty batches too: the kernel's layout check needs cu_q_lens[R] == T)
    spd::tree_attention(addr(qd), float_code(qd), addr(kd), addr(vd), addr(out), addr(bt), addr(lens), addr(cu),
                        addr(mask), R, T, Hq, Hkv, D, bs, nb, bt.size(1), mask.has_value() ? mask->size(1) : 0,
                        qd.stride(0), qd.stride(1), out.stride(0), out.stride(1), scale, kd.stride(0), kd.stride(1),
                        kd.stride(2), vd.stride(0), vd.stride(1), vd.stride(2));
  });
  return out;
}

// The public tree_attention's CPU kernel. fp32 / fp16 / bf16 run the kernel above with no Python on the way (the size
// hints max_q_len / max_kv_len / num_splits only shape the Triton launch: checked as the Python op checks them, then
// unused). float64 (the runtime's exactness tests) goes to the torch backend through the private op
// _tree_attention_torch, which spdkernels/ops/tree_attention.py defines before this module is loaded.
Tensor tree_attention_public_cpu(const Tensor& q, const Tensor& k_cache, const Tensor& v_cache,
                                 const Tensor& block_table, const Tensor& kv_lens, const Tensor& cu_q_lens,
                                 const OptTensor& tree_mask, std::optional<double> scale,
                                 std::optional<int64_t> max_q_len, std::optional<int64_t> max_kv_len,
                                 std::optional<int64_t> num_splits) {
  const auto hint = [](std::optional<int64_t> v, const char* arg) {
    TORCH_CHECK_VALUE(!v.has_value() || *v >= 0, arg, ": expected >= 0, got ", v.value_or(0));
  };
  hint(max_q_len, "max_q_len");
  hint(max_kv_len, "max_kv_len");
  TORCH_CHECK_VALUE(!num_splits.has_value() || *num_splits >= 1, "num_splits: expected >= 1, got ",
                    num_splits.value_or(0));
  const double s = scale.has_value() ? *scale : 1.0 / std::sqrt(static_cast<double>(q.dim() == 3 ? q.size(2) : 1));
  if (q.scalar_type() == at::kDouble) {
    static const auto torch_backend =
        c10::Dispatcher::singleton()
            .findSchemaOrThrow("spdkernels::_tree_attention_torch", "")
            .typed<Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                          const OptTensor&, double)>();
    return torch_backend.call(q, k_cache, v_cache, block_table, kv_lens, cu_q_lens, tree_mask, s);
  }
  return tree_attention_cpu(q, k_cache, v_cache, block_table, kv_lens, cu_q_lens, tree_mask, s);
}

// y = x @ weight^T (+ bias), fp32, for the few rows of a decoding step (x [M, K], weight [N, K] contiguous).
Tensor skinny_linear_cpu(const Tensor& x, const Tensor& weight, const OptTensor& bias) {
  const auto f32 = [](const Tensor& t) { return t.scalar_type() == at::kFloat; };
  check_tensor(x, "x", 2, f32, "float32");
  check_tensor(weight, "weight", 2, f32, "float32");
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  TORCH_CHECK_VALUE(weight.size(1) == K, "weight: expected [N, ", K, "], got ", shape_of(weight));
  check_opt_vec(bias, "bias", at::kFloat, N, "N");
  const Tensor xd = x.stride(1) == 1 ? x : x.contiguous(), wd = dense(weight);
  const OptTensor bd = dense(bias);
  Tensor y = at::empty({M, N}, x.options());
  if (M > 0 && N > 0) spd::skinny_linear_f32(addr(xd), xd.stride(0), addr(wd), addr(bd), addr(y), N, M, N, K);
  return y;
}

// RMSNorm of the rows of x [T, N] (fp32, unit-stride rows) times weight [N]: the runtime's per-layer norm.
Tensor rms_norm_cpu(const Tensor& x, const Tensor& weight, double eps) {
  const auto f32 = [](const Tensor& t) { return t.scalar_type() == at::kFloat; };
  check_tensor(x, "x", 2, f32, "float32");
  check_vec(weight, "weight", at::kFloat, x.size(1), "N");
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps >= 0, "eps: expected a finite value >= 0, got ", eps);
  const Tensor xd = x.stride(1) == 1 ? x : x.contiguous(), wd = dense(weight);
  Tensor y = at::empty({x.size(0), x.size(1)}, x.options());
  if (y.numel())
    spd::rms_norm_f32(xd.data_ptr<float>(), xd.stride(0), wd.data_ptr<float>(), y.data_ptr<float>(), x.size(0),
                      x.size(1), eps);
  return y;
}

// The rotary embedding (half-split layout) of x [T, H, D] (fp32; e.g. a view of the fused QKV output) with cos / sin
// [T, 1, D] (as the layer broadcasts them) or [T, D]: x * cos + cat(-x[..., D/2:], x[..., :D/2]) * sin, contiguous,
// equal to those torch ops bit for bit.
Tensor rotary_cpu(const Tensor& x, const Tensor& cos, const Tensor& sin) {
  const auto f32 = [](const Tensor& t) { return t.scalar_type() == at::kFloat; };
  check_tensor(x, "x", 3, f32, "float32");
  const int64_t T = x.size(0), H = x.size(1), D = x.size(2);
  TORCH_CHECK_VALUE(D % 2 == 0, "x: expected an even head dim, got ", D);
  check_tensor(cos, "cos", cos.dim() == 3 ? 3 : 2, f32, "float32");
  TORCH_CHECK_VALUE(cos.size(0) == T && cos.size(-1) == D && (cos.dim() == 2 || cos.size(1) == 1), "cos: expected shape [",
                    T, ", 1, ", D, "] or [", T, ", ", D, "], got ", shape_of(cos));
  check_tensor(sin, "sin", cos.dim(), f32, "float32");
  TORCH_CHECK_VALUE(sin.sizes() == cos.sizes(), "sin: expected the shape of cos ", shape_of(cos), ", got ", shape_of(sin));
  const Tensor cd = dense(cos.reshape({T, D})), sd = dense(sin.reshape({T, D}));
  const Tensor xd = x.stride(2) == 1 ? x : x.contiguous();
  Tensor y = at::empty({T, H, D}, x.options());
  if (y.numel())
    spd::rotary_f32(xd.data_ptr<float>(), xd.stride(0), xd.stride(1), cd.data_ptr<float>(), sd.data_ptr<float>(), D,
                    y.data_ptr<float>(), T, H, D);
  return y;
}

// A packed weight of K columns (csrc/linear.cpp, spdkernels/runtime/linear.py PackedWeight): format "f16" (weight
// float16 [N, K]), "q8_0" (weight int8 [N, K], scale float32 [N, K / 32]) or "q4_1" (weight uint8 [N, K / 2], byte
// i of a block of 16 holds weight i low and i + 16 high; scale and min float32 [N, K / 32]; the scales binary16
// values as in GGUF, which PackedWeight checks: with other scales the AVX paths round scale x nibble + min once and
// the baseline path twice). Checks shared by the product and the widening; returns the format code.
int check_packed(c10::string_view format, const Tensor& weight, const OptTensor& scale, const OptTensor& min,
                 int64_t K, const char* k_arg) {
  int fmt;
  at::ScalarType wdt;
  int64_t wcols = K;
  if (format == "f16") {
    fmt = spd::kWeightF16, wdt = at::kHalf;
  } else if (format == "q8_0") {
    fmt = spd::kWeightQ8_0, wdt = at::kChar;
  } else if (format == "q4_1") {
    fmt = spd::kWeightQ4_1, wdt = at::kByte, wcols = K / 2;
  } else {
    TORCH_CHECK_VALUE(false, "format: expected 'f16', 'q8_0' or 'q4_1', got '", std::string(format), "'");
  }
  check_tensor(weight, "weight", 2, [wdt](const Tensor& t) { return t.scalar_type() == wdt; }, c10::toString(wdt));
  const int64_t N = weight.size(0);
  const bool blocks = fmt != spd::kWeightF16;
  TORCH_CHECK_VALUE(!blocks || K % 32 == 0, k_arg, ": format '", std::string(format),
                    "' needs K a multiple of 32, got ", K);
  TORCH_CHECK_VALUE(weight.size(1) == wcols, "weight: expected [N, ", wcols, "] for K = ", K, ", got ",
                    shape_of(weight));
  const auto check_blocks = [&](const OptTensor& t, const char* arg, bool wanted) {
    if (!wanted) {
      TORCH_CHECK_VALUE(!t.has_value(), arg, ": format '", std::string(format), "' takes none");
      return;
    }
    TORCH_CHECK_VALUE(t.has_value(), arg, ": format '", std::string(format), "' needs one");
    check_tensor(*t, arg, 2, [](const Tensor& u) { return u.scalar_type() == at::kFloat; }, "float32");
    TORCH_CHECK_VALUE(t->size(0) == N && t->size(1) == K / 32, arg, ": expected [N, K / 32] = [", N, ", ", K / 32,
                      "], got ", shape_of(*t));
  };
  check_blocks(scale, "scale", blocks);
  check_blocks(min, "min", fmt == spd::kWeightQ4_1);
  return fmt;
}

// y = x @ weight^T (+ bias) with a packed weight: the fp32 kernel's product of the widened values.
Tensor skinny_linear_packed_cpu(const Tensor& x, c10::string_view format, const Tensor& weight, const OptTensor& scale,
                                const OptTensor& min, const OptTensor& bias) {
  check_tensor(x, "x", 2, [](const Tensor& t) { return t.scalar_type() == at::kFloat; }, "float32");
  const int64_t M = x.size(0), K = x.size(1);
  const int fmt = check_packed(format, weight, scale, min, K, "x");
  const int64_t N = weight.size(0);
  check_opt_vec(bias, "bias", at::kFloat, N, "N");
  const Tensor xd = x.stride(1) == 1 ? x : x.contiguous(), wd = dense(weight);
  const OptTensor sd = dense(scale), md = dense(min), bd = dense(bias);
  Tensor y = at::empty({M, N}, x.options());
  if (M > 0 && N > 0)
    spd::skinny_linear_packed(addr(xd), xd.stride(0), fmt, addr(wd), addr(sd), addr(md), addr(bd), addr(y), N, M, N, K);
  return y;
}

// The packed weight widened to fp32 [N, K] in one threaded pass: the values the product above multiplies by
// (PackedWeight.dequantize()'s, which costs several torch passes over the whole matrix).
Tensor widen_packed_cpu(c10::string_view format, const Tensor& weight, const OptTensor& scale, const OptTensor& min) {
  const int64_t K = weight.dim() == 2 ? weight.size(1) * (format == "q4_1" ? 2 : 1) : 0;
  const int fmt = check_packed(format, weight, scale, min, K, "weight");
  const int64_t N = weight.size(0);
  const Tensor wd = dense(weight);
  const OptTensor sd = dense(scale), md = dense(min);
  Tensor out = at::empty({N, K}, weight.options().dtype(at::kFloat));
  if (N > 0 && K > 0) spd::widen_packed(fmt, addr(wd), addr(sd), addr(md), addr(out), N, K);
  return out;
}

std::tuple<Tensor, double, double> target_weights_cpu(const Tensor& row, double temperature, int64_t top_k,
                                                      double top_p) {
  check_tensor(row, "row", 1, [](const Tensor& t) { return float_code(t) >= 0; }, "float32, float16, bfloat16");
  TORCH_CHECK_VALUE(row.size(0) >= 1, "row: expected at least one logit");
  TORCH_CHECK_VALUE(top_k >= 0 && top_p > 0 && top_p <= 1, "top_k / top_p: expected top_k >= 0, top_p in (0, 1]");
  TORCH_CHECK_VALUE(temperature > 0 && std::isfinite(temperature), "temperature: expected > 0, got ", temperature);
  const Tensor r = dense(row);
  Tensor out = at::empty({r.size(0)}, r.options().dtype(at::kFloat));
  const auto [mass, tau] = spd::target_weights_row(addr(r), float_code(r), r.size(0), static_cast<float>(temperature),
                                                   top_k, static_cast<float>(top_p), addr(out));
  return {out, mass, static_cast<double>(tau)};
}

// sgl-kernel's tree batch, checked as sgl-kernel checks it (int64 [bs, n] trees, int32 outputs written in place,
// which must therefore be contiguous: the adapter takes its generic path for any other output).
spd::SglTrees sgl_trees(const Tensor& predicts, const Tensor& accept_index, const Tensor& accept_token_num,
                        const Tensor& candidates, const Tensor& ri, const Tensor& nt, const Tensor& ns) {
  const auto i64 = [](const Tensor& t) { return t.scalar_type() == at::kLong; };
  const auto i32 = [](const Tensor& t) { return t.scalar_type() == at::kInt; };
  check_tensor(candidates, "candidates", 2, i64, "int64");
  const int64_t bs = candidates.size(0), n = candidates.size(1);
  TORCH_CHECK_VALUE(n >= 1, "candidates: expected num_draft_tokens >= 1 (node 0 is the root)");
  for (const auto& [t, name] : {std::pair<const Tensor&, const char*>{ri, "retrive_index"},
                                {nt, "retrive_next_token"}, {ns, "retrive_next_sibling"}}) {
    check_tensor(t, name, 2, i64, "int64");
    TORCH_CHECK_VALUE(t.size(0) == bs && t.size(1) == n, name, ": expected shape [bs, num_draft_tokens] = [", bs,
                      ", ", n, "], got ", shape_of(t));
  }
  check_tensor(predicts, "predicts", 1, i32, "int32");
  check_tensor(accept_index, "accept_index", 2, i32, "int32");
  TORCH_CHECK_VALUE(accept_index.size(0) == bs && accept_index.size(1) >= 1,
                    "accept_index: expected shape [bs, num_spec_step] = [", bs, ", >= 1], got ",
                    shape_of(accept_index));
  check_vec(accept_token_num, "accept_token_num", at::kInt, bs, "bs");
  for (const auto& [t, name] : {std::pair<const Tensor&, const char*>{predicts, "predicts"},
                                {accept_index, "accept_index"}, {accept_token_num, "accept_token_num"}})
    TORCH_CHECK_VALUE(t.is_contiguous(), name, ": expected a contiguous tensor (written in place)");
  for (const auto& [t, name] : {std::pair<const Tensor&, const char*>{candidates, "candidates"}, {ri, "retrive_index"},
                                {nt, "retrive_next_token"}, {ns, "retrive_next_sibling"}})
    TORCH_CHECK_VALUE(t.is_contiguous(), name, ": expected a contiguous tensor, got strides ", t.strides(),
                      " for shape ", shape_of(t));
  return spd::SglTrees{bs, n, accept_index.size(1), std::min(bs * n, predicts.size(0)),
                       candidates.const_data_ptr<int64_t>(), ri.const_data_ptr<int64_t>(),
                       nt.const_data_ptr<int64_t>(), ns.const_data_ptr<int64_t>(), predicts.data_ptr<int32_t>(),
                       accept_index.data_ptr<int32_t>(), accept_token_num.data_ptr<int32_t>()};
}

void sgl_verify_tree_greedy_cpu(const Tensor& predicts, const Tensor& accept_index, const Tensor& accept_token_num,
                                const Tensor& candidates, const Tensor& ri, const Tensor& nt, const Tensor& ns,
                                const OptTensor& target_predict, const OptTensor& target_logits) {
  const spd::SglTrees t = sgl_trees(predicts, accept_index, accept_token_num, candidates, ri, nt, ns);
  TORCH_CHECK_VALUE(target_predict.has_value() != target_logits.has_value(),
                    "target_predict: pass exactly one of target_predict (sgl-kernel) and target_logits");
  if (target_predict.has_value()) {
    check_tensor(*target_predict, "target_predict", 2, [](const Tensor& x) { return x.scalar_type() == at::kLong; },
                 "int64");
    TORCH_CHECK_VALUE(target_predict->size(0) == t.bs && target_predict->size(1) == t.n,
                      "target_predict: expected shape [bs, num_draft_tokens] = [", t.bs, ", ", t.n, "], got ",
                      shape_of(*target_predict));
    TORCH_CHECK_VALUE(target_predict->is_contiguous(), "target_predict: expected a contiguous tensor");
    const Tensor& tp = *target_predict;
    run_checked([&] { spd::sgl_verify_tree_greedy(t, tp.const_data_ptr<int64_t>(), 0, 0, 0, 0); });
    return;
  }
  const Tensor& lg = *target_logits;
  TORCH_CHECK_VALUE(lg.defined() && (lg.dim() == 2 || lg.dim() == 3) && float_code(lg) >= 0,
                    "target_logits: expected float32/bfloat16/float16 [bs * n, V] or [bs, n, V]");
  const int64_t V = lg.size(-1);
  TORCH_CHECK_VALUE(lg.device().is_cpu() && V >= 1 && lg.numel() == t.bs * t.n * V,
                    "target_logits: expected shape [bs * n, V] or [bs, n, V] with bs * n = ", t.bs * t.n, ", got ",
                    shape_of(lg));
  TORCH_CHECK_VALUE(V <= INT32_MAX, "target_logits: a vocabulary over 2^31 - 1 tokens (token ids are int32)");
  const Tensor rows = dense(lg).reshape({t.bs * t.n, V});
  run_checked([&] { spd::sgl_verify_tree_greedy(t, nullptr, addr(rows), float_code(rows), V, V); });
}

void sgl_tree_sampling_cpu(const Tensor& predicts, const Tensor& accept_index, const Tensor& accept_token_num,
                           const Tensor& candidates, const Tensor& ri, const Tensor& nt, const Tensor& ns,
                           const Tensor& uniform_samples, const Tensor& final_coins, const Tensor& target_probs,
                           const OptTensor& draft_probs, double threshold_single, double threshold_acc) {
  const spd::SglTrees t = sgl_trees(predicts, accept_index, accept_token_num, candidates, ri, nt, ns);
  const auto f32 = [](const Tensor& x) { return x.scalar_type() == at::kFloat; };
  check_tensor(uniform_samples, "uniform_samples", 2, f32, "float32");
  TORCH_CHECK_VALUE(uniform_samples.size(0) == t.bs && uniform_samples.size(1) == t.n,
                    "uniform_samples: expected shape [bs, num_draft_tokens] = [", t.bs, ", ", t.n, "], got ",
                    shape_of(uniform_samples));
  check_vec(final_coins, "uniform_samples_for_final_sampling", at::kFloat, t.bs, "bs");
  check_tensor(target_probs, "target_probs", 3, f32, "float32");
  TORCH_CHECK_VALUE(target_probs.size(0) == t.bs && target_probs.size(1) == t.n && target_probs.size(2) >= 1,
                    "target_probs: expected shape [bs, num_draft_tokens, vocab_size] = [", t.bs, ", ", t.n,
                    ", V], got ", shape_of(target_probs));
  const int64_t V = target_probs.size(2);
  if (draft_probs.has_value()) {
    check_tensor(*draft_probs, "draft_probs", 3, f32, "float32");
    TORCH_CHECK_VALUE(draft_probs->sizes() == target_probs.sizes(), "draft_probs: expected shape ",
                      shape_of(target_probs), ", got ", shape_of(*draft_probs));
    TORCH_CHECK_VALUE(draft_probs->is_contiguous(), "draft_probs: expected a contiguous tensor (written in place)");
  }
  TORCH_CHECK_VALUE(threshold_single >= 0 && threshold_single <= 1, "threshold_single: expected a value in [0, 1], got ",
                    threshold_single);
  TORCH_CHECK_VALUE(threshold_acc >= 0 && threshold_acc <= 1, "threshold_acc: expected a value in [0, 1], got ",
                    threshold_acc);
  for (const auto& [x, name] : {std::pair<const Tensor&, const char*>{uniform_samples, "uniform_samples"},
                                {final_coins, "uniform_samples_for_final_sampling"}, {target_probs, "target_probs"}})
    TORCH_CHECK_VALUE(x.is_contiguous(), name, ": expected a contiguous tensor");  // (as sgl-kernel requires)
  const Tensor &u = uniform_samples, &fc = final_coins, &tp = target_probs;
  run_checked([&] {
    spd::sgl_tree_sampling_target_only(t, u.const_data_ptr<float>(), fc.const_data_ptr<float>(),
                                       tp.const_data_ptr<float>(), V,
                                       draft_probs.has_value() ? draft_probs->data_ptr<float>() : nullptr,
                                       threshold_single, threshold_acc);
  });
}

// n fp32 uniforms in [0, 1), the values torch.rand(n, generator=gen) gives on CPU (torch's default generator without
// one), drawn as ATen's CPU uniform_ kernel draws them (one generator->random() per value, in order, under the
// generator's lock, through at::uniform_real_distribution; a value that rounds to 1 becomes 0), so the generator
// advances exactly as under torch.rand, without a tensor op's dispatch (~30-60 us right after a cache flush). The
// adapters' tests compare these coins' outcomes and the generator's state with torch.rand's on every call path.
void torch_rand_f32(const std::optional<at::Generator>& gen, float* out, int64_t n) {
  auto* impl = at::get_generator_or_default<at::CPUGeneratorImpl>(gen, at::detail::getDefaultCPUGenerator());
  std::lock_guard<std::mutex> lock(impl->mutex_);
  at::uniform_real_distribution<float> uniform(0.0f, 1.0f);
  for (int64_t i = 0; i < n; ++i) {
    const float v = static_cast<float>(uniform(impl));
    out[i] = v == 1.0f ? 0.0f : v;
  }
}

// FlashInfer's chain_speculative_sampling in its layout (spdkernels/adapters/flashinfer.py): draft_probs [B, n, V],
// draft_token_ids [B, n], target_probs [B, n + 1, V] (the op's own row layout, read in place). The coins are one
// draw of N + B + B n fp32 uniforms from `generator`, or from a CPU generator seeded with `seed`, or from torch's
// default generator (the values torch.rand gives the adapter's generic path): the op's N + B coins (clamped into
// (0, 1) as the adapter's open_unit_fp32 does), then the B x n coins of FlashInfer's independent recount. The counters given ([B], int32 or
// int64, contiguous) get += as in FlashInfer. Returns the output tokens [B, n + 1] (-1 padded) and this call's
// counts, int32 [B] each (accepted, emitted: the counters of a caller who passed none).
Out3 flashinfer_chain_cpu(const Tensor& draft_probs, const Tensor& draft_token_ids,
                          const Tensor& target_probs, std::optional<at::Generator> generator,
                          std::optional<int64_t> seed, const OptTensor& accepted_num, const OptTensor& emitted_num) {
  const auto f32 = [](const Tensor& t) { return t.scalar_type() == at::kFloat; };
  check_tensor(draft_probs, "draft_probs", 3, f32, "float32");
  const int64_t B = draft_probs.size(0), n = draft_probs.size(1), V = draft_probs.size(2), N = B * n;
  check_tensor(draft_token_ids, "draft_token_ids", 2, [](const Tensor& t) { return int_code(t) >= 0; },
               "int32, int64");
  TORCH_CHECK_VALUE(draft_token_ids.size(0) == B && draft_token_ids.size(1) == n,
                    "draft_token_ids: expected shape [batch_size, num_speculate_tokens] = [", B, ", ", n, "], got ",
                    shape_of(draft_token_ids));
  check_tensor(target_probs, "target_probs", 3, f32, "float32");
  TORCH_CHECK_VALUE(target_probs.size(0) == B && target_probs.size(1) == n + 1 && target_probs.size(2) == V,
                    "target_probs: expected shape [batch_size, num_speculate_tokens + 1, vocab_size] = [", B, ", ",
                    n + 1, ", ", V, "], got ", shape_of(target_probs));
  for (const auto& [t, name] : {std::pair<const OptTensor&, const char*>{accepted_num, "maybe_output_accepted_token_num"},
                                {emitted_num, "maybe_output_emitted_draft_token_num"}}) {
    if (!t.has_value()) continue;
    check_tensor(*t, name, 1, [](const Tensor& x) { return int_code(x) >= 0; }, "int32, int64");
    TORCH_CHECK_VALUE(t->size(0) == B, name, ": expected shape [batch_size] = [", B, "], got ", shape_of(*t));
    TORCH_CHECK_VALUE(t->is_contiguous(), name, ": expected a contiguous tensor (updated in place)");
  }
  TORCH_CHECK_VALUE(n < INT32_MAX, "draft_probs: expected fewer than 2^31 - 1 drafts per request, got ", n);
  check_vocab("target_probs", V);
  TORCH_CHECK_VALUE(!(generator.has_value() && seed.has_value()), "generator: pass a generator or a seed, not both");
  if (seed.has_value()) {
    TORCH_CHECK_VALUE(*seed >= 0, "seed: expected a non-negative 63-bit seed, got ", *seed);
    // = torch.Generator().manual_seed(seed): one generator per thread, reseeded (a fresh one costs ~50 us cold)
    static thread_local at::Generator seeded = at::detail::createCPUGenerator(0);
    seeded.set_current_seed(static_cast<uint64_t>(*seed));
    generator = seeded;
  }
  float* c = scratch<float>(N + B + N + N + B);
  torch_rand_f32(generator, c, N + B + N);  // = torch.rand(N + B + N, generator=generator)
  float* u = c + N + B + N;  // the op's coins, clamped; the recount's stay as drawn
  std::copy(c, c + N + B, u);
  spd::open_unit(u, N + B);
  int32_t* cup = scratch<int32_t, 1>(B + 1);
  for (int64_t r = 0; r <= B; ++r) cup[r] = static_cast<int32_t>(r * n);
  const Tensor ids = dense(draft_token_ids);
  const Tensor tp = dense(target_probs), dp = dense(draft_probs);
  Tensor acc_now = empty_i32({B}), emit_now = empty_i32({B});  // this call's counts, int32
  int32_t* acc_p = acc_now.data_ptr<int32_t>();
  int32_t* emit_p = emit_now.data_ptr<int32_t>();
  const Tensor out = chain_rejection("target_probs", tp, V, V, addr(ids), int_code(ids), cup, addr(dp), nullptr, u,
                                     B, N, n, 0, 0, true, emit_p);
  const int32_t* num = emit_p;  // the emitted counts + 1, overwritten by this call's emitted counts below
  const float* tpp = tp.const_data_ptr<float>();
  const float* dpp = dp.const_data_ptr<float>();
  const float* recount = c + N + B;
  const int tc = int_code(ids);
  const auto add = [](const OptTensor& t, int64_t b, int64_t v) {
    if (!t.has_value()) return;
    if (t->scalar_type() == at::kInt) {  // wraps on overflow, as torch's += does (no signed overflow)
      int32_t* c = t->data_ptr<int32_t>() + b;
      *c = static_cast<int32_t>(static_cast<uint32_t>(*c) + static_cast<uint32_t>(v));
    } else {
      int64_t* c = t->data_ptr<int64_t>() + b;
      *c = static_cast<int64_t>(static_cast<uint64_t>(*c) + static_cast<uint64_t>(v));
    }
  };
  for (int64_t b = 0; b < B; ++b) {
    const int64_t emitted = num[b] - 1;
    int64_t accepted = emitted;  // FlashInfer's count: the drafts from the first rejection on tested again
    for (int64_t i = emitted; i < n; ++i) {
      const int64_t t = spd::load_index(addr(ids), tc, b * n + i);
      const float p = tpp[(b * (n + 1) + i) * V + t], q = dpp[(b * n + i) * V + t];
      accepted += (1.0f - recount[b * n + i]) * q < p;
    }
    acc_p[b] = static_cast<int32_t>(accepted);
    emit_p[b] = static_cast<int32_t>(emitted);
    add(emitted_num, b, emitted);
    add(accepted_num, b, accepted);
  }
  return {out, acc_now, emit_now};
}

// vLLM's rejection_sample in its layout (spdkernels/adapters/vllm.py), for the calls without seeded requests:
// target [N, V] (logits, or probabilities with target_is_probs: vLLM's older target_probs) with one row per draft
// and no bonus rows (the op's bonus_token_ids layout, read in place), draft_token_ids [N], num_draft_tokens (host
// counts), cu_num_draft_tokens [B] (no leading zero; its values are checked against the counts in Python, with
// validation on), draft_probs [N, V] or none, bonus_token_ids [B] or [B, 1], temperature [B] (0 = greedy; read
// unless all_greedy or all_random). The coins are the generic path's: N + B fp32 from torch's default generator
// (none when all_greedy), clamped into (0, 1). Returns [B, max_spec_len + 1] int32, -1 padded; or an empty tensor,
// before any coin is drawn, for the calls the adapter's generic path serves: empty batches, padded drafts (id < 0)
// and drafts with q(t) == 0 in sampled requests (vLLM rejects those whatever the coin).
Tensor vllm_rejection_sample_cpu(const Tensor& target, const Tensor& draft_token_ids, c10::IntArrayRef num_draft_tokens,
                                 int64_t max_spec_len, const Tensor& cu_num_draft_tokens, const OptTensor& draft_probs,
                                 const Tensor& bonus_token_ids, const OptTensor& temperature, bool all_greedy,
                                 bool all_random, bool target_is_probs) {
  const char* tname = target_is_probs ? "target_probs" : "target_logits";
  const auto contiguous = [](const Tensor& t, const char* name) {
    TORCH_CHECK_VALUE(t.is_contiguous(), name, ": expected a contiguous tensor, got shape ", shape_of(t));
  };
  check_tensor(draft_token_ids, "draft_token_ids", 1, [](const Tensor& t) { return int_code(t) >= 0; }, "int32, int64");
  contiguous(draft_token_ids, "draft_token_ids");
  check_tensor(target, tname, 2, [](const Tensor& t) { return float_code(t) >= 0; }, "float32, float16, bfloat16");
  contiguous(target, tname);
  const int64_t N = draft_token_ids.size(0), V = target.size(1), B = static_cast<int64_t>(num_draft_tokens.size());
  TORCH_CHECK_VALUE(target.size(0) == N, tname, ": expected shape [num_tokens, vocab_size] (one row per draft token) = [",
                    N, ", ", V, "], got ", shape_of(target));
  int64_t total = 0, longest = 0;
  for (const int64_t k : num_draft_tokens) {
    TORCH_CHECK_VALUE(k >= 0, "num_draft_tokens: expected counts >= 0, got ", k);
    total += k;
    longest = std::max(longest, k);
  }
  TORCH_CHECK_VALUE(total == N, "num_draft_tokens: expected ", B, " counts >= 0 summing to num_tokens = ", N, ", got a sum of ",
                    total);
  check_tensor(cu_num_draft_tokens, "cu_num_draft_tokens", 1, [](const Tensor& t) { return int_code(t) >= 0; },
               "int32, int64");
  TORCH_CHECK_VALUE(cu_num_draft_tokens.size(0) == B, "cu_num_draft_tokens: expected shape [batch_size] (no leading zero) = [",
                    B, "], got ", shape_of(cu_num_draft_tokens));
  if (draft_probs.has_value()) {
    check_tensor(*draft_probs, "draft_probs", 2, [](const Tensor& t) { return t.scalar_type() == at::kFloat; }, "float32");
    contiguous(*draft_probs, "draft_probs");
    TORCH_CHECK_VALUE(draft_probs->size(0) == N && draft_probs->size(1) == V, "draft_probs: expected shape [num_tokens, "
                      "vocab_size] = [", N, ", ", V, "], got ", shape_of(*draft_probs));
  }
  TORCH_CHECK_VALUE(bonus_token_ids.defined() && int_code(bonus_token_ids) >= 0 && bonus_token_ids.numel() == B &&
                        (bonus_token_ids.dim() == 1 || bonus_token_ids.dim() == 2) && bonus_token_ids.device().is_cpu(),
                    "bonus_token_ids: expected an int32/int64 CPU tensor of shape [batch_size, 1] = [", B, ", 1], got ",
                    shape_of(bonus_token_ids));
  contiguous(bonus_token_ids, "bonus_token_ids");
  TORCH_CHECK_VALUE(max_spec_len >= longest && max_spec_len < INT32_MAX, "max_spec_len: expected an int >= "
                    "max(num_draft_tokens) = ", longest, ", got ", max_spec_len);
  const bool mixed = !all_greedy && !all_random;
  if (mixed) {
    TORCH_CHECK_VALUE(temperature.has_value(), "sampling_metadata: temperature is needed unless all_greedy or all_random");
    check_vec(*temperature, "temperature", at::kFloat, B, "batch_size");
  }
  const auto none = [] { return empty_i32({0}); };
  if (B == 0 || N == 0) return none();
  check_vocab(tname, V);
  // the drafts that vLLM rejects whatever the coin: the generic path serves those calls
  const uptr ids = addr(draft_token_ids);
  const int tc = int_code(draft_token_ids);
  const Tensor temp = mixed ? dense(*temperature) : Tensor();
  const float* tp = mixed ? temp.const_data_ptr<float>() : nullptr;
  const float* qp = draft_probs.has_value() ? draft_probs->const_data_ptr<float>() : nullptr;
  for (int64_t r = 0, i = 0; r < B; ++r) {
    const bool sampled = !all_greedy && (all_random || tp[r] != 0.0f);
    for (int64_t j = 0; j < num_draft_tokens[r]; ++j, ++i) {
      const int64_t t = spd::load_index(ids, tc, i);
      if (t < 0) return none();
      if (qp && sampled && t < V && !(qp[i * V + t] > 0.0f)) return none();  // (t >= V: the kernel names it)
    }
  }
  float* coins = scratch<float>(N + B + B);
  if (all_greedy) {
    std::fill(coins, coins + N + B, 0.5f);  // read by no one
  } else {
    torch_rand_f32(std::nullopt, coins, N + B);  // = torch.rand((N + B,)) of the generic path
    spd::open_unit(coins, N + B);
  }
  float* op_temp = nullptr;  // all_random: every request sampled at the temperature the logits already carry
  if (!all_random) {
    op_temp = coins + N + B;
    for (int64_t r = 0; r < B; ++r) op_temp[r] = all_greedy ? 0.0f : (tp[r] != 0.0f ? 1.0f : 0.0f);
  }
  int32_t* cu = scratch<int32_t, 1>(B + 1);
  cu[0] = 0;
  for (int64_t r = 0; r < B; ++r) cu[r + 1] = static_cast<int32_t>(cu[r] + num_draft_tokens[r]);
  return chain_rejection(tname, target, target.stride(0), V, ids, tc, cu, addr(draft_probs), op_temp, coins, B, N,
                         max_spec_len, addr(bonus_token_ids), int_code(bonus_token_ids), target_is_probs);
}

// Hugging Face transformers' greedy verification step (spdkernels/adapters/transformers.py, verify_step): rows
// [k + 1, V] (the target's processed logits after the prefix and after each of the k drafts), the drafts as host
// ints. Returns the tokens the step commits (int64 [a + 1]), the accepted drafts and then the argmax of the row after them:
// verify_greedy's kernel (its tie rule and index checks) on one chain, with no tensor made for the drafts or the
// outputs. Errors name verify_greedy's arguments, as the adapter's generic path does.
Tensor hf_verify_greedy_cpu(const Tensor& rows, c10::IntArrayRef drafts) {
  check_tensor(rows, "target_logits", 2, [](const Tensor& t) { return float_code(t) >= 0; }, "float32, float16, bfloat16");
  const int64_t k = static_cast<int64_t>(drafts.size()), V = rows.size(1);
  TORCH_CHECK_VALUE(rows.size(0) == k + 1, "target_logits: expected [k + 1, V] = [", k + 1, ", V] rows, got shape ",
                    shape_of(rows));
  TORCH_CHECK_VALUE(V >= 1, "target_logits: expected a vocabulary of at least one token");
  TORCH_CHECK_VALUE(V <= INT32_MAX, "target_logits: a vocabulary over 2^31 - 1 tokens (token ids are int32)");
  TORCH_CHECK_VALUE(k < INT32_MAX, "draft_token_ids: expected fewer than 2^31 - 1 drafts, got ", k);
  const Tensor r = rows.stride(1) == 1 ? rows : rows.contiguous();
  int32_t* cu = scratch<int32_t, 1>(2);
  cu[0] = 0;
  cu[1] = static_cast<int32_t>(k);
  int32_t* o = scratch<int32_t>(2 * k + 2);  // tokens [k + 1], then the emitted count, then the path [k]
  run_checked([&] {
    spd::verify_greedy(addr(r), float_code(r), r.stride(0), V, reinterpret_cast<uptr>(drafts.data()), spd::kI64,
                       reinterpret_cast<uptr>(cu), 0, 1, k, k, reinterpret_cast<uptr>(o),
                       reinterpret_cast<uptr>(o + k + 1), reinterpret_cast<uptr>(o + k + 2));
  });
  Tensor out = Tensor(at::detail::empty_cpu({o[k + 1]}, at::kLong));
  std::copy(o, o + o[k + 1], out.data_ptr<int64_t>());
  return out;
}

// The AutogradCPU kernel of the inference ops: an input that a backward or a forward-mode derivative would need is
// a ValueError naming it (grad mode on and requires_grad, or a forward-mode tangent: torch supports one level of
// forward AD, level 0); otherwise the op runs below autograd. Boxed: one function for every such op.
void inference_only(const c10::OperatorHandle& op, c10::DispatchKeySet ks, torch::jit::Stack* stack) {
  const auto& args = op.schema().arguments();
  const size_t first = stack->size() - args.size();
  const bool grad = at::GradMode::is_enabled();
  for (size_t i = 0; i < args.size(); ++i) {
    const c10::IValue& v = (*stack)[first + i];
    if (!v.isTensor()) continue;  // (an absent optional tensor is None; none of these ops takes a Tensor[])
    const at::Tensor& t = v.toTensor();
    if (!t.defined()) continue;
    const std::string& name = args[i].name();
    TORCH_CHECK_VALUE(!(grad && t.requires_grad()), name, ": requires grad, and ", op.schema().name(),
                      " is an inference op with no backward: call it under torch.no_grad() or "
                      "torch.inference_mode(), or pass ", name, ".detach()");
    TORCH_CHECK_VALUE(!t._fw_grad(0).defined(), name, ": carries a forward-mode AD tangent, and ", op.schema().name(),
                      " is an inference op with no forward derivative: pass the primal "
                      "(torch.autograd.forward_ad.unpack_dual(", name, ").primal)");
  }
  at::AutoDispatchBelowADInplaceOrView below;
  op.redispatchBoxed(ks & c10::after_autograd_keyset, stack);
}

int64_t isa_level_op() { return spd::isa_level(); }
void set_isa_cap_op(int64_t level) { spd::set_isa_cap(static_cast<int>(level)); }

}  // namespace

// The registrations run when Python imports the module (PyInit__C), not as static initialisers at dlopen: a
// registration torch refuses (a stale build whose kernels no longer match the schemas the Python package defines)
// is then an ImportError, which the package reports and falls back from, instead of an exception out of a static
// constructor (std::terminate). The Library objects live as long as the process, as TORCH_LIBRARY's do.
void register_kernels() {
  auto* frag = new torch::Library(torch::Library::FRAGMENT, "spdkernels", std::nullopt, __FILE__, __LINE__);
  frag->def("_cpu_tree_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_table, Tensor kv_lens, "
            "Tensor cu_q_lens, Tensor? tree_mask, float scale) -> Tensor");
  frag->def("_cpu_skinny_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  frag->def("_cpu_skinny_linear_packed(Tensor x, str format, Tensor weight, Tensor? scale, Tensor? min, Tensor? bias) "
            "-> Tensor");
  frag->def("_cpu_widen_packed(str format, Tensor weight, Tensor? scale, Tensor? min) -> Tensor");
  frag->def("_cpu_rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  frag->def("_cpu_rotary(Tensor x, Tensor cos, Tensor sin) -> Tensor");
  frag->def("_cpu_target_weights(Tensor row, float temperature, int top_k, float top_p) -> (Tensor, float, float)");
  frag->def("_cpu_sgl_verify_tree_greedy(Tensor(a!) predicts, Tensor(b!) accept_index, Tensor(c!) accept_token_num, "
            "Tensor candidates, Tensor retrive_index, Tensor retrive_next_token, Tensor retrive_next_sibling, "
            "Tensor? target_predict, Tensor? target_logits) -> ()");
  frag->def("_cpu_sgl_tree_sampling_target_only(Tensor(a!) predicts, Tensor(b!) accept_index, "
            "Tensor(c!) accept_token_num, Tensor candidates, Tensor retrive_index, Tensor retrive_next_token, "
            "Tensor retrive_next_sibling, Tensor uniform_samples, Tensor uniform_samples_for_final_sampling, "
            "Tensor target_probs, Tensor(d!)? draft_probs, float threshold_single, float threshold_acc) -> ()");
  frag->def("_cpu_flashinfer_chain_sampling(Tensor draft_probs, Tensor draft_token_ids, Tensor target_probs, "
            "Generator? generator, int? seed, Tensor(a!)? accepted_num, Tensor(b!)? emitted_num) -> (Tensor, Tensor, Tensor)");
  frag->def("_cpu_vllm_rejection_sample(Tensor target, Tensor draft_token_ids, int[] num_draft_tokens, int max_spec_len, "
            "Tensor cu_num_draft_tokens, Tensor? draft_probs, Tensor bonus_token_ids, Tensor? temperature, "
            "bool all_greedy, bool all_random, bool target_is_probs) -> Tensor");
  frag->def("_cpu_hf_verify_greedy(Tensor rows, int[] drafts) -> Tensor");
  frag->def("_cpu_isa_level() -> int", &isa_level_op);
  frag->def("_cpu_set_isa_cap(int level) -> ()", &set_isa_cap_op);
  auto* cpu = new torch::Library(torch::Library::IMPL, "spdkernels", c10::DispatchKey::CPU, __FILE__, __LINE__);
  cpu->impl("verify_greedy", &verify_greedy_cpu);
  cpu->impl("rejection_sample", &rejection_sample_cpu);
  cpu->impl("tree_attention", &tree_attention_public_cpu);
  cpu->impl("_cpu_tree_attention", &tree_attention_cpu);
  cpu->impl("_cpu_skinny_linear", &skinny_linear_cpu);
  cpu->impl("_cpu_skinny_linear_packed", &skinny_linear_packed_cpu);
  cpu->impl("_cpu_widen_packed", &widen_packed_cpu);
  cpu->impl("_cpu_rms_norm", &rms_norm_cpu);
  cpu->impl("_cpu_rotary", &rotary_cpu);
  cpu->impl("_cpu_target_weights", &target_weights_cpu);
  cpu->impl("_cpu_sgl_verify_tree_greedy", &sgl_verify_tree_greedy_cpu);
  cpu->impl("_cpu_sgl_tree_sampling_target_only", &sgl_tree_sampling_cpu);
  cpu->impl("_cpu_flashinfer_chain_sampling", &flashinfer_chain_cpu);
  cpu->impl("_cpu_vllm_rejection_sample", &vllm_rejection_sample_cpu);
  cpu->impl("_cpu_hf_verify_greedy", &hf_verify_greedy_cpu);
  auto* grad = new torch::Library(torch::Library::IMPL, "spdkernels", c10::DispatchKey::AutogradCPU, __FILE__,
                                  __LINE__);
  for (const char* name : {"tree_attention", "_cpu_tree_attention", "_cpu_skinny_linear", "_cpu_skinny_linear_packed",
                           "_cpu_widen_packed", "_cpu_rms_norm", "_cpu_rotary", "_cpu_target_weights"})
    grad->impl(name, torch::CppFunction::makeFromBoxedFunction<&inference_only>());
  // the public op's CUDA calls too (its Triton kernel is Python's): the check without a Python frame
  auto* grad_cuda = new torch::Library(torch::Library::IMPL, "spdkernels", c10::DispatchKey::AutogradCUDA, __FILE__,
                                       __LINE__);
  grad_cuda->impl("tree_attention", torch::CppFunction::makeFromBoxedFunction<&inference_only>());
}

// `import spdkernels._C` registers the kernels above; the module itself is empty.
extern "C" PyObject* PyInit__C(void) {
  try {
    register_kernels();
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_ImportError, (std::string("spdkernels._C: torch refused a kernel registration: ") +
                                        e.what()).c_str());
    return nullptr;
  }
  static PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C", "spdkernels CPU kernels, registered with torch's "
                            "dispatcher (torch.ops.spdkernels.*)", -1, nullptr, nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&def);
}
