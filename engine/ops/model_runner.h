// ModelRunner: a loaded model on one backend, with its KV cache, running packed batches.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "engine/model/model_config.h"
#include "engine/model/model_weights.h"
#include "engine/ops/batch.h"

namespace moe {

struct ModelRunnerOptions {
  std::string model_dir;          // config.json + *.safetensors
  std::string backend = "cpu";    // "cpu" (the CUDA backend registers "cuda")
  int64_t kv_cache_bytes = 64ll << 20;  // memory budget for the paged KV pool
  int32_t block_size = 16;        // tokens per KV block
  int32_t num_threads = 0;        // CPU worker threads; 0 = hardware concurrency
  // CPU backend only, opt-in, lower precision: bf16 activations with AVX512-BF16 dot
  // products (see BackendOptions::cpu_bf16_activations).
  bool cpu_bf16_activations = false;
};

class ModelRunner {
 public:
  virtual ~ModelRunner() = default;

  static absl::StatusOr<std::unique_ptr<ModelRunner>> Create(const ModelRunnerOptions& options);

  virtual const ModelConfig& config() const = 0;
  virtual int32_t block_size() const = 0;
  virtual int32_t num_blocks() const = 0;
  virtual const ParameterCounts& parameters() const = 0;
  // e.g. "cpu (CPU, 2 threads, SIMD AVX3)"
  virtual std::string backend_description() const = 0;

  // Writes K/V of every batch token at its slot, then computes logits for batch.logits_rows.
  // The batch must reference only blocks in [0, num_blocks()).
  virtual absl::StatusOr<ForwardOutput> Forward(const ForwardBatch& batch) = 0;
};

}  // namespace moe
