// Vectorised exp for the CPU kernels (softmax weights): shared by rejection_sample and tree_attention.
#pragma once

#include <cstdint>

namespace spd {

// w <- exp((xs - m) / T) for V elements (xs <= m; -inf gives 0); returns the sum in double. w may be xs.
// AVX-512 or x86-64-v3 / baseline clones, picked per call by isa_level() (the weights are the same bits on
// AVX-512 and x86-64-v3).
double exp_weights(const float* xs, int64_t V, float m, float T, float* w);

}  // namespace spd
