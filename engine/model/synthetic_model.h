// Synthetic Mixtral-architecture checkpoints with deterministic random bf16 weights: the
// built-in demo model and the benchmark models. They are written as config.json +
// model.safetensors and load through the same path as any Hugging Face checkpoint.
#pragma once

#include <cstdint>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace moe {

struct SyntheticModelSpec {
  int32_t vocab_size = 32000;
  int32_t hidden_size = 1024;
  int32_t num_layers = 8;
  int32_t num_heads = 16;
  int32_t num_kv_heads = 4;
  int32_t num_experts = 8;
  int32_t top_k = 2;
  int32_t expert_intermediate_size = 2816;
  int32_t max_position_embeddings = 4096;
  bool f32_weights = false;  // bf16 by default
  int32_t bos_token_id = 1;  // -1 = none
  int32_t eos_token_id = 2;
  uint64_t seed = 1;
};

// Named shapes: "demo" (the built-in demo model, ~14M parameters) and "bench-mixtral" (hidden
// 1024, 8 layers, 16/4 heads, 8 experts top-2, expert FFN 2816, vocab 32000: 640M parameters).
absl::StatusOr<SyntheticModelSpec> SyntheticPreset(const std::string& name);

// Writes <dir>/config.json and <dir>/model.safetensors (creating dir).
absl::Status WriteSyntheticModel(const SyntheticModelSpec& spec, const std::string& dir);

}  // namespace moe
