// The CPU backend: the embedded default where no GPU is present, and the reference every
// CUDA kernel is checked against. Matmul weights are repacked once at load into the kernels'
// layout (cpu::PackedMatrix: bf16 or f32, f16 widened to f32), so the backend holds a copy of
// them (resident memory about the size of the checkpoint's matrices; the mapping's pages are
// then only page cache). Activations and the KV cache are f32.
#pragma once

#include <memory>

#include "engine/backend/backend.h"

namespace moe {

struct CpuBackendOptions {
  int32_t num_threads = 0;  // 0 = all hardware threads
  // Opt-in, lower precision: activations are rounded to bf16 before every matmul with bf16
  // weights (not the router) and multiplied with AVX512-BF16 dot products (fp32
  // accumulation), about 2x the FMA throughput of the exact path. Ignored where the CPU lacks
  // AVX512-BF16. Logits then differ from the exact path by ~7e-3 relative (bound 2e-2, in
  // tests/backend/cpu_kernels_test.cc); a token's result still never depends on its batch.
  bool bf16_activations = false;
};

std::unique_ptr<Backend> CreateCpuBackend(const CpuBackendOptions& options);

}  // namespace moe
