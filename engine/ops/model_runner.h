// ModelRunner: a loaded model on one backend, with its KV cache, running packed batches.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>

#include "absl/status/statusor.h"
#include "engine/model/dtype.h"
#include "engine/model/model_config.h"
#include "engine/model/model_weights.h"
#include "engine/ops/batch.h"

namespace moe {

struct ModelRunnerOptions {
  std::string model_dir;                // config.json + *.safetensors
  std::string backend = "cpu";          // "cpu" (the CUDA backend registers "cuda")
  int64_t kv_cache_bytes = 64ll << 20;  // memory budget for the paged KV pool
  // What the KV cache stores: kF32 (exact) or kBF16 (twice the tokens in the same budget and
  // half the bytes attention reads). See KvCacheShape::dtype.
  DType kv_cache_dtype = DType::kF32;
  int32_t block_size = 16;  // tokens per KV block
  int32_t num_threads = 0;  // CPU worker threads; 0 = hardware concurrency
  // CPU backend only, opt-in, lower precision: bf16 activations with AVX512-BF16 dot
  // products (see BackendOptions::cpu_bf16_activations).
  bool cpu_bf16_activations = false;
};

// "f32" or "bf16" (the --kv_cache_dtype values) -> DType.
absl::StatusOr<DType> ParseKvCacheDType(std::string_view name);
// The inverse: "f32" or "bf16".
std::string_view KvCacheDTypeName(DType dtype);

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
  // The backend's execution_summary() (e.g. CUDA graph replays); empty if it has none.
  virtual std::string backend_execution_summary() const { return {}; }

  // Writes K/V of every batch token at its slot, then computes logits for batch.logits_rows.
  // The batch must reference only blocks in [0, num_blocks()).
  virtual absl::StatusOr<ForwardOutput> Forward(const ForwardBatch& batch) = 0;
};

}  // namespace moe
