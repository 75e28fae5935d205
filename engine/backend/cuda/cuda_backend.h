// The CUDA backend: every op of the forward pass on one NVIDIA GPU (sm_80 / sm_90), weights in
// device memory (bf16 as stored; f16 widened to f32; 1-D tensors in f32), activations and the
// paged KV pool in float32, one stream per backend.
//
// Matrix products (all with float32 accumulation):
//  - few rows (<= gemv_max_rows; decode): a weight-streaming kernel, float32 arithmetic on
//    bf16-widened weights; agrees with the CPU backend to float32 rounding (~1e-6 relative);
//  - many rows, bf16 weights: cuBLASLt bf16 x bf16 -> f32 on the tensor cores (lt_gemm.h: a
//    plan per shape, the bias in the epilogue), with the float32 activations split as
//    x = hi + lo (two bf16 GEMMs); |x - hi - lo| <= 2^-17 |x|, so the product's error is
//    <= 2^-17 sum_k |x_k w_k| plus float32 accumulation (~1e-5 relative). `bf16_activations`
//    drops lo (one GEMM; ~2^-9 relative per product, ~4e-3);
//  - many rows, f32 weights: cublasSgemm (no TF32).
// MoE experts: counting sort of the routing on the device; per touched expert either the
// streaming kernel (few rows per expert) or a grouped WMMA bf16 GEMM with the same hi/lo split,
// SwiGLU fused into the gate/up pass, then a weighted un-permute.
//
// Host synchronisation: Route() only enqueues the copy of its statistics into pinned memory;
// probability_mass and router_z_sum are accumulated on the host at the next Synchronize()
// (the decoder calls it once per step, before copying the routing and logits), so the span and
// pointer passed to Route() must stay valid until then.
//
// CUDA graphs: in a decode-only step of at most graph_max_tokens tokens, the ops queue their
// launches (with the values they were built from) until Synchronize(), which replays the
// graph captured from an earlier step of equal launches, captures one if such a step was seen
// once before, or runs them one by one (step_graphs.h). A decode step is then one graph launch
// instead of ~15 kernel launches per layer. Attention's split of the key range follows the
// longest context rounded up (to a power of two, then to multiples of 2048), so a step's
// launches stay the same over many tokens (and graph and eager runs give the same bits). Embed()
// and GatherRows() validate ids on the host from the step's batch; an out-of-range expert id from
// the router is reported by the next Synchronize().
#pragma once

#include <cstdint>
#include <memory>

#include "absl/status/statusor.h"
#include "engine/backend/backend.h"

namespace moe::cuda {

struct CudaBackendOptions {
  int32_t device = 0;
  // Dense products with at most this many rows use the weight-streaming kernel.
  int32_t gemv_max_rows = 16;
  // MoE experts use the streaming kernel while assignments / touched experts <= this.
  int32_t moe_gemv_max_rows = 16;
  // Round activations to bf16 once for tensor-core GEMMs (faster, ~4e-3 relative error).
  bool bf16_activations = false;
  // Decode-only steps of at most this many tokens run as CUDA graphs; 0 = never.
  int32_t graph_max_tokens = 64;
  // Graphs kept, one per distinct step (batch size, context range, buffers; two per batch size
  // as two metadata areas take turns); the least recently used is dropped beyond this.
  int32_t graph_cache_size = 256;
  // Said in device_description(): the backend was picked by --backend=auto.
  bool selected_by_auto = false;
};

// Options from the environment: MOE_CUDA_DEVICE, MOE_CUDA_GEMV_MAX_ROWS,
// MOE_CUDA_MOE_GEMV_MAX_ROWS, MOE_CUDA_BF16_ACTIVATIONS=1, MOE_CUDA_GRAPH_MAX_TOKENS (0: no
// CUDA graphs), MOE_CUDA_GRAPH_CACHE_SIZE.
CudaBackendOptions CudaBackendOptionsFromEnv();

// Fails with FailedPrecondition when no GPU is visible (no driver, or no device).
absl::StatusOr<std::unique_ptr<Backend>> CreateCudaBackend(const CudaBackendOptions& options);

}  // namespace moe::cuda
