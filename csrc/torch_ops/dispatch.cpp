// spdkernels/_C_ops.so: the CPU kernels of the spdkernels ops registered with torch's dispatcher in C++.
//
// Why: the ops are defined in Python (spdkernels/_library.py) and their CompositeExplicitAutograd kernel is
// Python: checks, backend choice, output allocation, pointer marshalling. On a cold cache that costs more
// than a small kernel itself (R = 16, V = 32000 rejection sampling: ~0.14 ms of Python around a ~0.13 ms
// kernel on the Intel machine here). This library registers a CPU kernel for each op that runs the
// well-formed production call (validation off, cpp backend chosen) without Python: it checks the layout,
// allocates the outputs and calls the same kernels as spdkernels._C (through function pointers taken from
// _C, so both share one copy of the kernels and of their state, e.g. the instruction-set cap).
//
// Every other call goes back to Python unchanged through a twin op, spdkernels::_<op>_python, which has the
// same schema and the Python kernel: value validation on, another backend forced, an argument that is not
// a plain contiguous CPU tensor of the contract's dtype and shape (so every error is raised by the Python
// checks, with the same message), or an unset kernel pointer. Python switches the fast path per op with
// spd_ops_set_fast() whenever the backend or the validation setting changes (spdkernels/_cpp.py).
//
// This is the only part of the package that links libtorch; it is built only when the build can see a
// torch install (setup.py) and is loaded only by the torch version it was built against.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <atomic>
#include <cstdint>
#include <cstring>
#include <optional>
#include <stdexcept>
#include <tuple>
#include <vector>

namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;
using Out3 = std::tuple<Tensor, Tensor, Tensor>;
using uptr = std::uintptr_t;

// The _C entry points (csrc/rejection_sample.cpp, csrc/verify_greedy.cpp), set by spd_ops_set_entry().
using RejectionSampleFn = void (*)(uptr, int, int64_t, int64_t, uptr, int, uptr, uptr, uptr, uptr, uptr, uptr,
                                   uptr, uptr, uptr, int64_t, int64_t, int64_t, uptr, uptr, uptr, uptr, int, int,
                                   int);
using VerifyGreedyFn = void (*)(uptr, int, int64_t, int64_t, uptr, int, uptr, uptr, int64_t, int64_t, int64_t, uptr,
                                uptr, uptr, int);

std::atomic<RejectionSampleFn> g_rejection_sample{nullptr};
std::atomic<VerifyGreedyFn> g_verify_greedy{nullptr};
std::atomic<bool> g_fast_rejection_sample{false};
std::atomic<bool> g_fast_verify_greedy{false};
// calls run here / sent to Python, per op (tests check which path a call took)
std::atomic<int64_t> g_calls[2][2] = {};
enum OpId { kRejectionSample = 0, kVerifyGreedy = 1 };

void count(OpId op, bool fast) { g_calls[op][fast ? 1 : 0].fetch_add(1, std::memory_order_relaxed); }

int op_id(const char* op) {
  if (std::strcmp(op, "rejection_sample") == 0) return kRejectionSample;
  if (std::strcmp(op, "verify_greedy") == 0) return kVerifyGreedy;
  return -1;
}

std::atomic<bool>* fast_flag(const char* op) {
  switch (op_id(op)) {
    case kRejectionSample: return &g_fast_rejection_sample;
    case kVerifyGreedy: return &g_fast_verify_greedy;
    default: return nullptr;
  }
}

// dtype codes of csrc/common.h; -1: not a dtype the kernels take.
int float_code(const Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return 0;
    case at::kHalf: return 1;
    case at::kBFloat16: return 2;
    default: return -1;
  }
}

int int_code(const Tensor& t) {
  switch (t.scalar_type()) {
    case at::kInt: return 0;
    case at::kLong: return 1;
    default: return -1;
  }
}

bool plain(const Tensor& t, int64_t ndim) {
  return t.defined() && t.dim() == ndim && t.device().is_cpu() && t.layout() == at::kStrided && t.is_contiguous();
}

bool vec_of(const Tensor& t, at::ScalarType dt, int64_t n) {
  return plain(t, 1) && t.scalar_type() == dt && t.size(0) == n;
}

bool opt_vec_of(const OptTensor& t, at::ScalarType dt, int64_t n) { return !t.has_value() || vec_of(*t, dt, n); }

uptr addr(const OptTensor& t) { return t.has_value() ? reinterpret_cast<uptr>(t->data_ptr()) : 0; }

uptr addr(const Tensor& t) { return reinterpret_cast<uptr>(t.data_ptr()); }

// The draft batch of docs/contract.md section 3 (logits rows = N + R, tokens, cu_num_draft, parents), in the layout the
// kernels take (logit rows may be strided). Sets R, N; false: leave the call to Python.
bool draft_batch_ok(const Tensor& logits, const Tensor& ids, const Tensor& cu, const OptTensor& parents,
                    const c10::SymInt& max_depth, int64_t& R, int64_t& N, int64_t& md, bool bonus_rows = false) {
  if (!logits.defined() || logits.dim() != 2 || !logits.device().is_cpu() || logits.layout() != at::kStrided ||
      float_code(logits) < 0 || logits.stride(1) != 1 || logits.size(1) < 1)
    return false;
  if (!plain(ids, 1) || int_code(ids) < 0 || !plain(cu, 1) || cu.scalar_type() != at::kInt || cu.size(0) < 1)
    return false;
  const auto m = max_depth.maybe_as_int();
  if (!m.has_value() || *m < 0) return false;
  R = cu.size(0) - 1;
  N = ids.size(0);
  md = *m;
  return logits.size(0) == (bonus_rows ? N : N + R) && opt_vec_of(parents, at::kInt, N);
}

Out3 int_outputs(int64_t R, int64_t md) {
  const auto o = at::TensorOptions().dtype(at::kInt);
  return {at::empty({R, md + 1}, o), at::empty({R}, o), at::empty({R, md}, o)};
}

template <typename... Args>
Out3 call_python(const char* name, Args&&... args) {
  // the twin op with the Python kernel; looked up on each fallback (the slow path, not worth a cache that
  // would have to follow the library's lifetime)
  auto op = c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Out3(std::decay_t<Args>...)>();
  return op.call(std::forward<Args>(args)...);
}

Out3 rejection_sample_cpu(const Tensor& logits, const Tensor& ids, const Tensor& cu, const OptTensor& parents,
                          const OptTensor& draft_probs, const OptTensor& temperature, const OptTensor& top_k,
                          const OptTensor& top_p, const OptTensor& uniforms, const OptTensor& seed,
                          const OptTensor& offset, c10::SymInt max_depth, const OptTensor& bonus_token_ids,
                          bool target_is_probs) {
  const RejectionSampleFn fn = g_rejection_sample.load(std::memory_order_acquire);
  int64_t R = 0, N = 0, md = 0;
  bool fast = fn && g_fast_rejection_sample.load(std::memory_order_acquire) &&
              draft_batch_ok(logits, ids, cu, parents, max_depth, R, N, md, bonus_token_ids.has_value()) &&
              (!bonus_token_ids.has_value() || (!parents.has_value() && plain(*bonus_token_ids, 1) &&
                                                int_code(*bonus_token_ids) >= 0 && bonus_token_ids->size(0) == R));
  if (fast) {
    const int64_t V = logits.size(1);
    fast = (!draft_probs.has_value() || (plain(*draft_probs, 2) && draft_probs->scalar_type() == at::kFloat &&
                                         draft_probs->size(0) == N && draft_probs->size(1) == V)) &&
           opt_vec_of(temperature, at::kFloat, R) && opt_vec_of(top_k, at::kInt, R) &&
           opt_vec_of(top_p, at::kFloat, R) && opt_vec_of(seed, at::kLong, R) && opt_vec_of(offset, at::kLong, R) &&
           opt_vec_of(uniforms, at::kFloat, N + R) &&
           // the coins: explicit uniforms, or a seed (and optionally an offset), never both
           (uniforms.has_value() ? !seed.has_value() && !offset.has_value() : seed.has_value()) &&
           // top-k / top-p are refused with probability rows (by the Python checks)
           (!target_is_probs || (!top_k.has_value() && !top_p.has_value()));
  }
  count(kRejectionSample, fast);
  if (!fast)
    return call_python("spdkernels::_rejection_sample_python", logits, ids, cu, parents, draft_probs, temperature,
                       top_k, top_p, uniforms, seed, offset, std::move(max_depth), bonus_token_ids,
                       target_is_probs);
  Out3 out = int_outputs(R, md);
  if (R > 0) {
    std::vector<int64_t> zeros;  // offset defaults to zeros
    uptr off = addr(offset);
    if (seed.has_value() && !offset.has_value()) {
      zeros.assign(static_cast<size_t>(R), 0);
      off = reinterpret_cast<uptr>(zeros.data());
    }
    try {  // the kernels' always-on index checks throw std::invalid_argument: a ValueError in Python
      fn(addr(logits), float_code(logits), logits.stride(0), logits.size(1), addr(ids), int_code(ids), addr(cu),
         addr(parents), addr(draft_probs), addr(temperature), addr(top_k), addr(top_p), addr(uniforms), addr(seed),
         off, R, N, md, addr(std::get<0>(out)), addr(std::get<1>(out)), addr(std::get<2>(out)),
         addr(bonus_token_ids), bonus_token_ids.has_value() ? int_code(*bonus_token_ids) : 0,
         target_is_probs ? 1 : 0, at::get_num_threads());
    } catch (const std::invalid_argument& e) {
      TORCH_CHECK_VALUE(false, e.what());
    }
  }
  return out;
}

Out3 verify_greedy_cpu(const Tensor& logits, const Tensor& ids, const Tensor& cu, const OptTensor& parents,
                       c10::SymInt max_depth) {
  const VerifyGreedyFn fn = g_verify_greedy.load(std::memory_order_acquire);
  int64_t R = 0, N = 0, md = 0;
  const bool fast = fn && g_fast_verify_greedy.load(std::memory_order_acquire) &&
                    draft_batch_ok(logits, ids, cu, parents, max_depth, R, N, md);
  count(kVerifyGreedy, fast);
  if (!fast)
    return call_python("spdkernels::_verify_greedy_python", logits, ids, cu, parents, std::move(max_depth));
  Out3 out = int_outputs(R, md);
  if (R > 0) {
    try {
      fn(addr(logits), float_code(logits), logits.stride(0), logits.size(1), addr(ids), int_code(ids), addr(cu),
         addr(parents), R, N, md, addr(std::get<0>(out)), addr(std::get<1>(out)), addr(std::get<2>(out)),
         at::get_num_threads());
    } catch (const std::invalid_argument& e) {
      TORCH_CHECK_VALUE(false, e.what());
    }
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(spdkernels, CPU, m) {
  m.impl("rejection_sample", &rejection_sample_cpu);
  m.impl("verify_greedy", &verify_greedy_cpu);
}

// ---- the C interface Python drives through ctypes (spdkernels/_cpp.py) -------------------------------------

extern "C" {

// Bumped whenever the functions below or the kernel signatures change; Python refuses any other value.
int spd_ops_abi_version() { return 3; }

// The _C entry point of `op` (its address from spdkernels._C.entry_points()). 0 on success, -1: unknown op.
int spd_ops_set_entry(const char* op, uptr fn) {
  switch (op_id(op)) {
    case kRejectionSample:
      g_rejection_sample.store(reinterpret_cast<RejectionSampleFn>(fn), std::memory_order_release);
      return 0;
    case kVerifyGreedy:
      g_verify_greedy.store(reinterpret_cast<VerifyGreedyFn>(fn), std::memory_order_release);
      return 0;
    default:
      return -1;
  }
}

// Whether `op`'s CPU kernel runs well-formed calls itself (1) or sends every call to Python (0). -1: unknown op.
int spd_ops_set_fast(const char* op, int on) {
  std::atomic<bool>* f = fast_flag(op);
  if (!f) return -1;
  f->store(on != 0, std::memory_order_release);
  return 0;
}

int spd_ops_get_fast(const char* op) {
  std::atomic<bool>* f = fast_flag(op);
  return f ? (f->load() ? 1 : 0) : -1;
}

// How many calls of `op` ran in C++ (fast = 1) or went to Python (fast = 0) since the library was loaded.
int64_t spd_ops_calls(const char* op, int fast) {
  const int id = op_id(op);
  return id < 0 ? -1 : g_calls[id][fast ? 1 : 0].load(std::memory_order_relaxed);
}

}  // extern "C"
