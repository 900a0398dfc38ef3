// Shared helpers of the CPU kernels: dtype codes, element loaders, a lane-wise argmax, the parallel loops.
//
// The kernels (verify_greedy.cpp, rejection_sample.cpp, tree_attention.cpp, linear.cpp) work on raw data
// pointers, sizes, strides and dtype codes; csrc/ops.cpp checks the tensors of each op call (TORCH_CHECK),
// allocates the outputs and hands the kernels their pointers. Beyond those checks the kernels make the always-on
// index checks below themselves (before any parallel region) and otherwise trust their arguments.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>

namespace spd {

// dtype codes of the kernels' arguments (csrc/ops.cpp maps torch dtypes to them).
enum FloatCode : int { kF32 = 0, kF16 = 1, kBF16 = 2 };
enum IntCode : int { kI32 = 0, kI64 = 1 };

template <typename T>
inline T* ptr(std::uintptr_t p) { return reinterpret_cast<T*>(p); }

inline int64_t load_index(std::uintptr_t base, int code, int64_t i) {
  return code == kI64 ? ptr<const int64_t>(base)[i] : static_cast<int64_t>(ptr<const int32_t>(base)[i]);
}

inline float bf16_to_f32(uint16_t h) {
  uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline float f16_to_f32(uint16_t h) {
  // IEEE binary16 -> binary32, exact for every input (normals, subnormals, inf, NaN).
  uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1Fu;
  uint32_t man = h & 0x3FFu;
  uint32_t bits;
  if (exp == 0x1F) {
    bits = sign | 0x7F800000u | (man << 13);
  } else if (exp != 0) {
    bits = sign | ((exp + 112u) << 23) | (man << 13);
  } else if (man == 0) {
    bits = sign;
  } else {  // subnormal: normalise
    int e = -1;
    do { ++e; man <<= 1; } while ((man & 0x400u) == 0);
    bits = sign | ((112u - e) << 23) | ((man & 0x3FFu) << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// Order-preserving integer key of a binary16 value (NaN excluded): comparing keys compares values.
// -0 (0x8000) maps to 0 like +0, so equal values tie (and ties go to the lowest id, as in torch.argmax).
inline int32_t f16_key(uint16_t h) {
  const int32_t v = static_cast<int32_t>(h & 0x7FFFu);
  return (h & 0x8000u) ? -v : v;
}

// ---- row argmax ------------------------------------------------------------------------------------
// Ties go to the lowest index. The main loop keeps kLanes running maxima with their indices in GCC
// vector registers (strict `>` so each lane keeps its first maximum): per 16 elements, two compares and
// four blends, no branch. One horizontal pass at the end takes the lowest index among the lanes that
// hold the maximum; the tail (< 16 elements, indices above every lane's) is scalar with strict `>`.
// bf16 is widened to fp32 by a shift; fp16 is compared through the integer key above (exact, and
// needs no F16C). Built for AVX2 and for baseline x86-64, picked at load time (target_clones), so the
// binary runs on any x86-64 without -march=native.
constexpr int kLanes = 16;
typedef float f8v __attribute__((vector_size(32)));
typedef int32_t i8v __attribute__((vector_size(32)));
typedef uint16_t u8h __attribute__((vector_size(16)));

// Unaligned 8-lane fp32 load / store.
__attribute__((always_inline)) inline f8v load_f8(const float* p) {
  f8v v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
__attribute__((always_inline)) inline void store_f8(float* p, f8v v) { std::memcpy(p, &v, sizeof v); }

// Pins a loaded vector in a register. Without it GCC folds the load into every multiply-add that uses the
// vector (one load per use) and register-tiled loops become load-bound. kPin only in code compiled for
// AVX, where a ymm register holds the whole vector (the baseline copies pass false).
template <bool kPin>
__attribute__((always_inline)) inline void pin(f8v& v) {
  if constexpr (kPin) asm("" : "+x"(v));
}

template <int kCode>
struct Row;
template <>
struct Row<kF32> {
  using key_t = float;
  using vec_t = f8v;
  static constexpr float lowest() { return -__builtin_inff(); }
  static float at(const void* r, int64_t i) { return static_cast<const float*>(r)[i]; }
  static f8v load8(const void* r, int64_t i) {
    f8v x;
    std::memcpy(&x, static_cast<const float*>(r) + i, sizeof x);
    return x;
  }
};
template <>
struct Row<kBF16> {
  using key_t = float;
  using vec_t = f8v;
  static constexpr float lowest() { return -__builtin_inff(); }
  static float at(const void* r, int64_t i) { return bf16_to_f32(static_cast<const uint16_t*>(r)[i]); }
  static f8v load8(const void* r, int64_t i) {
    u8h h;
    std::memcpy(&h, static_cast<const uint16_t*>(r) + i, sizeof h);
    i8v w = __builtin_convertvector(h, i8v) << 16;
    return __builtin_bit_cast(f8v, w);
  }
};
template <>
struct Row<kF16> {
  using key_t = int32_t;
  using vec_t = i8v;
  static constexpr int32_t lowest() { return -0x7C00; }  // key of -inf
  static int32_t at(const void* r, int64_t i) { return f16_key(static_cast<const uint16_t*>(r)[i]); }
  static i8v load8(const void* r, int64_t i) {
    u8h h;
    std::memcpy(&h, static_cast<const uint16_t*>(r) + i, sizeof h);
    const i8v w = __builtin_convertvector(h, i8v);
    const i8v v = w & 0x7FFF;
    return (w & 0x8000) ? -v : v;
  }
};

template <int kCode>
__attribute__((always_inline)) inline int32_t row_argmax_impl(const void* row, int64_t V) {
  using R = Row<kCode>;
  using K = typename R::key_t;
  using Vec = typename R::vec_t;
  const Vec lo = Vec{} + R::lowest();
  Vec b0 = lo, b1 = lo;
  const i8v lane = {0, 1, 2, 3, 4, 5, 6, 7};
  i8v i0 = lane, i1 = lane + 8;
  const int64_t Vmain = V - V % kLanes;
  for (int64_t i = 0; i < Vmain; i += kLanes) {
    const Vec x0 = R::load8(row, i), x1 = R::load8(row, i + 8);
    const i8v u0 = x0 > b0, u1 = x1 > b1;
    b0 = u0 ? x0 : b0;
    b1 = u1 ? x1 : b1;
    const i8v base = i8v{} + static_cast<int32_t>(i);
    i0 = u0 ? base + lane : i0;
    i1 = u1 ? base + lane + 8 : i1;
  }
  K best[kLanes];
  int32_t idx[kLanes];
  std::memcpy(best, &b0, sizeof b0);
  std::memcpy(best + 8, &b1, sizeof b1);
  std::memcpy(idx, &i0, sizeof i0);
  std::memcpy(idx + 8, &i1, sizeof i1);
  K m = R::lowest();
  int32_t arg = 0;  // an all -inf row gives 0, as torch.argmax does
  bool found = false;
  if (Vmain > 0) {
    for (int l = 0; l < kLanes; ++l) {
      if (!found || best[l] > m || (best[l] == m && idx[l] < arg)) { m = best[l]; arg = idx[l]; found = true; }
    }
  }
  for (int64_t i = Vmain; i < V; ++i) {
    const K x = R::at(row, i);
    if (!found || x > m) { m = x; arg = static_cast<int32_t>(i); found = true; }
  }
  return arg;
}

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define SPD_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define SPD_CLONES
#endif

// ---- instruction-set levels of the hand-dispatched kernels -----------------------------------------
// kIsaBase: baseline x86-64 (SSE2); kIsaV3: x86-64-v3 (AVX2 + FMA); kIsaV4: AVX-512 F/DQ/BW/VL on top of v3.
// isa_level() is the best level that this CPU has and this compiler can build, capped by the environment
// variable SPDKERNELS_CPU_ISA (baseline / avx2 / avx512, read once) and by set_isa_cap() (the tests run every
// path a machine has through it). Kernels that pick their path by isa_level() follow the cap on every call;
// functions cloned by SPD_V3_CLONES / SPD_CLONES are picked by the loader and follow the CPU only.
//
// SPD_V3 compiles one function for x86-64-v3, SPD_V4 for AVX-512 (FMA contraction: the build's
// -ffp-contract=fast, which only code compiled for an FMA target can use; baseline x86-64 has no FMA);
// SPD_V3_CLONES clones a function for x86-64-v3 and for baseline x86-64. kHaveV3 / kHaveV4: this compiler
// can build them.
enum IsaLevel : int { kIsaBase = 0, kIsaV3 = 1, kIsaV4 = 2 };

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define SPD_V3 __attribute__((target("arch=x86-64-v3")))
#define SPD_V4 __attribute__((target("arch=x86-64-v3,avx512f,avx512dq,avx512bw,avx512vl")))
#define SPD_V3_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#define SPD_HAVE_V4 1
constexpr bool kHaveV3 = true;
constexpr bool kHaveV4 = true;
inline int isa_of_cpu() {
  __builtin_cpu_init();
  if (!(__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))) return kIsaBase;
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl"))
    return kIsaV4;
  return kIsaV3;
}
#else
#define SPD_V3
#define SPD_V4
#define SPD_V3_CLONES
#define SPD_HAVE_V4 0
constexpr bool kHaveV3 = false;
constexpr bool kHaveV4 = false;
inline int isa_of_cpu() { return kIsaBase; }
#endif

// The level named by SPDKERNELS_CPU_ISA, or kIsaV4 (no cap) when it is unset or unknown.
inline int isa_cap_from_env() {
  const char* e = std::getenv("SPDKERNELS_CPU_ISA");
  if (e == nullptr) return kIsaV4;
  if (std::strcmp(e, "baseline") == 0) return kIsaBase;
  if (std::strcmp(e, "avx2") == 0) return kIsaV3;
  return kIsaV4;
}
inline std::atomic<int>& isa_cap() {
  static std::atomic<int> cap{isa_cap_from_env()};
  return cap;
}
inline int isa_level() {
  static const int cpu = isa_of_cpu();
  const int cap = isa_cap().load(std::memory_order_relaxed);
  return cpu < cap ? cpu : cap;
}
inline void set_isa_cap(int level) { isa_cap().store(level < kIsaBase ? kIsaBase : level, std::memory_order_relaxed); }
inline bool has_v3() { return isa_level() >= kIsaV3; }

SPD_CLONES inline int32_t row_argmax_f32(const void* row, int64_t V) { return row_argmax_impl<kF32>(row, V); }
SPD_CLONES inline int32_t row_argmax_bf16(const void* row, int64_t V) { return row_argmax_impl<kBF16>(row, V); }
SPD_CLONES inline int32_t row_argmax_f16(const void* row, int64_t V) { return row_argmax_impl<kF16>(row, V); }

inline int32_t row_argmax(const void* row, int64_t V, int code) {
  switch (code) {
    case kF32: return row_argmax_f32(row, V);
    case kBF16: return row_argmax_bf16(row, V);
    case kF16: return row_argmax_f16(row, V);
    default: throw std::invalid_argument("unsupported float dtype code");
  }
}

inline int element_size(int code) { return code == kF32 ? 4 : 2; }

// The open interval (0, 1) the sampler's coins live in, as fp32 (spdkernels/adapters/_common.py has the same two):
// a coin of kRejectCoin rejects every draft but one holding at least 1 - 2^-24 of its row.
constexpr float kAcceptCoin = 1.17549435e-38f;  // the smallest normal fp32
constexpr float kRejectCoin = 1.0f - 5.9604645e-08f;  // 1 - 2^-24

// Coins drawn in [0, 1) into (0, 1), in place (NaN stays NaN, as torch.clamp leaves it).
inline void open_unit(float* c, int64_t n) {
  for (int64_t i = 0; i < n; ++i) c[i] = std::min(std::max(c[i], kAcceptCoin), kRejectCoin);
}

// Always-on structural checks of a draft batch (docs/contract.md section 3), made before any kernel reads
// through these indices, with validation on or off: O(N + R) integer reads, nothing measurable next to
// reading N + R logit rows. A bad value throws std::invalid_argument naming the argument (Python sees a
// ValueError), never a read or write out of bounds. `parents` may be null (chains). `check_tokens` false:
// token ids are only compared (greedy verification), so one outside the vocabulary is simply never accepted.
inline void check_draft_batch(const int32_t* cu, int64_t R, int64_t N, const int32_t* parents,
                              std::uintptr_t draft_ids, int tok_code, int64_t V, bool check_tokens) {
  auto fail = [](const char* arg, const std::string& what) {
    throw std::invalid_argument(std::string(arg) + ": " + what + " (checked with validation off too)");
  };
  if (R < 0 || N < 0) fail("cu_num_draft", "negative batch size");
  if (cu[0] != 0) fail("cu_num_draft", "must start at 0, got " + std::to_string(cu[0]));
  for (int64_t r = 0; r < R; ++r)
    if (cu[r + 1] < cu[r])
      fail("cu_num_draft", "must be non-decreasing, entry " + std::to_string(r + 1) + " is " +
                               std::to_string(cu[r + 1]) + " after " + std::to_string(cu[r]));
  if (cu[R] != N)
    fail("cu_num_draft", "last entry must equal the number of draft tokens " + std::to_string(N) + ", got " +
                             std::to_string(cu[R]));
  for (int64_t i = 0; check_tokens && i < N; ++i) {
    const int64_t t = load_index(draft_ids, tok_code, i);
    if (t < 0 || t >= V)
      fail("draft_token_ids", "token " + std::to_string(t) + " at index " + std::to_string(i) +
                                  " is outside the vocabulary [0, " + std::to_string(V) + ")");
  }
  if (parents)
    for (int64_t r = 0; r < R; ++r)
      for (int64_t j = 0; j < cu[r + 1] - cu[r]; ++j) {
        const int32_t p = parents[cu[r] + j];
        if (p < -1 || p >= j)
          fail("parents", "node " + std::to_string(j) + " of request " + std::to_string(r) + " has parent " +
                              std::to_string(p) + ": expected -1 (the root) or an earlier node of its request");
      }
}

// ---- parallel loops, on torch's intra-op thread pool (at::parallel_for: torch.set_num_threads applies) ----
// at::parallel_for catches an exception thrown by a worker and rethrows it in the caller; the kernels make
// their checks before the loops anyway, so none is thrown inside one.

// f(i) for i in [0, n), in contiguous chunks; ranges shorter than `grain` run on the calling thread.
template <typename F>
inline void parallel_for_each(int64_t n, int64_t grain, const F& f) {
  at::parallel_for(0, n, grain, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) f(i);
  });
}

// Dynamic scheduling for items of different cost: one worker per thread pulls item indices from a shared
// counter. make_worker() runs once per worker and returns the function it calls for each item it takes (so
// per-worker scratch lives in that function's captures).
template <typename MakeWorker>
inline void parallel_dynamic(int64_t n, const MakeWorker& make_worker) {
  if (n <= 0) return;
  const int64_t workers = std::min<int64_t>(n, at::get_num_threads());
  std::atomic<int64_t> next{0};
  at::parallel_for(0, workers, 1, [&](int64_t b, int64_t e) {
    for (int64_t w = b; w < e; ++w) {
      auto item = make_worker();
      for (int64_t i = next.fetch_add(1, std::memory_order_relaxed); i < n;
           i = next.fetch_add(1, std::memory_order_relaxed))
        item(i);
    }
  });
}

}  // namespace spd
