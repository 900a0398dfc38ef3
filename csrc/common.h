// Shared helpers of the CPU backend: dtype codes, element loaders, a lane-wise argmax, OpenMP glue.
//
// The extension is plain pybind11 over raw pointers (no libtorch): Python passes data_ptr()s, sizes,
// strides and dtype codes, and allocates every output. All checks of the op contract happen in Python
// before the call; the functions here trust their arguments.
#pragma once

#include <cstdint>
#include <cstring>
#include <stdexcept>

#ifdef SPD_HAVE_OPENMP
#include <omp.h>
#endif

namespace spd {

// Must match spdkernels/_cpp.py.
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

// Order-preserving integer key of a binary16 value (NaN excluded): comparing keys compares values, with
// -0 mapped onto +0 so that equal values tie (and ties go to the lowest id, as in torch.argmax).
inline int32_t f16_key(uint16_t h) {
  if (h == 0x8000u) h = 0;
  int32_t v = static_cast<int32_t>(h & 0x7FFFu);
  return (h & 0x8000u) ? -v : v;
}

// Loaders give a value whose `>` and `==` order is the float order of the element.
struct LoadF32 {
  using key_t = float;
  static constexpr float lowest() { return -__builtin_inff(); }
  static float at(const void* row, int64_t i) { return static_cast<const float*>(row)[i]; }
};
struct LoadBF16 {
  using key_t = float;
  static constexpr float lowest() { return -__builtin_inff(); }
  static float at(const void* row, int64_t i) { return bf16_to_f32(static_cast<const uint16_t*>(row)[i]); }
};
struct LoadF16Key {
  using key_t = int32_t;
  static constexpr int32_t lowest() { return -0x7C00; }  // key of -inf
  static int32_t at(const void* row, int64_t i) { return f16_key(static_cast<const uint16_t*>(row)[i]); }
};

// Argmax of one row, ties to the lowest index. Kept lane-wise (kLanes running maxima with their
// indices, strict `>` so each lane keeps its first maximum) so that GCC vectorises the loop into
// compares and blends; one horizontal pass at the end picks the lowest index among the lanes that hold
// the maximum. 16 lanes = four SSE / two AVX registers of floats.
constexpr int kLanes = 16;

template <typename L>
inline int32_t row_argmax(const void* row, int64_t V) {
  using K = typename L::key_t;
  K best[kLanes];
  int32_t idx[kLanes];
  for (int l = 0; l < kLanes; ++l) { best[l] = L::lowest(); idx[l] = l; }
  const int64_t Vmain = V - V % kLanes;
  for (int64_t i = 0; i < Vmain; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      const K x = L::at(row, i + l);
      const bool up = x > best[l];
      best[l] = up ? x : best[l];
      idx[l] = up ? static_cast<int32_t>(i + l) : idx[l];
    }
  }
  K m = L::lowest();
  int32_t arg = V > 0 ? 0 : -1;
  bool found = false;
  for (int l = 0; l < kLanes; ++l) {
    if (idx[l] >= V) continue;
    if (!found || best[l] > m || (best[l] == m && idx[l] < arg)) { m = best[l]; arg = idx[l]; found = true; }
  }
  for (int64_t i = Vmain; i < V; ++i) {  // tail: indices above every lane's, strict > keeps ties low
    const K x = L::at(row, i);
    if (!found || x > m) { m = x; arg = static_cast<int32_t>(i); found = true; }
  }
  // Rows that are all -inf keep index 0 (lane 0's initial index), as torch.argmax does.
  return arg;
}

inline int32_t row_argmax(const void* row, int64_t V, int code) {
  switch (code) {
    case kF32: return row_argmax<LoadF32>(row, V);
    case kBF16: return row_argmax<LoadBF16>(row, V);
    case kF16: return row_argmax<LoadF16Key>(row, V);
    default: throw std::invalid_argument("unsupported float dtype code");
  }
}

inline int element_size(int code) { return code == kF32 ? 4 : 2; }

}  // namespace spd
