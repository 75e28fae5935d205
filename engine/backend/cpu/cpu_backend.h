// The CPU backend: the embedded default where no GPU is present, and the reference every
// CUDA kernel is checked against. Weights are read in place from the memory mapping (bf16 or
// f32; f16 checkpoints are widened to f32 once at load), activations and the KV cache are f32.
#pragma once

#include <memory>

#include "engine/backend/backend.h"

namespace moe {

std::unique_ptr<Backend> CreateCpuBackend(int32_t num_threads);

}  // namespace moe
