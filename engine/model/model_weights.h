// ModelWeights: the checkpoint's tensors bound to the decoder's structure, every shape and
// dtype checked against the config, plus the parameter accounting derived from them.
#pragma once

#include <cstdint>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/model/model_config.h"
#include "engine/model/safetensors.h"

namespace moe {

// A SwiGLU feed-forward block: down(silu(gate(x)) * up(x)).
struct MlpWeights {
  const TensorView* gate = nullptr;  // [ffn, hidden]
  const TensorView* up = nullptr;    // [ffn, hidden]
  const TensorView* down = nullptr;  // [hidden, ffn]
};

struct LayerWeights {
  const TensorView* input_norm = nullptr;           // [hidden]
  const TensorView* post_attention_norm = nullptr;  // [hidden]
  const TensorView* q = nullptr;                    // [heads*head_dim, hidden]
  const TensorView* k = nullptr;                    // [kv_heads*head_dim, hidden]
  const TensorView* v = nullptr;                    // [kv_heads*head_dim, hidden]
  const TensorView* o = nullptr;                    // [hidden, heads*head_dim]
  const TensorView* q_bias = nullptr;               // [heads*head_dim] when qkv_bias
  const TensorView* k_bias = nullptr;               // [kv_heads*head_dim]
  const TensorView* v_bias = nullptr;               // [kv_heads*head_dim]
  const TensorView* o_bias = nullptr;               // [hidden] when o_bias
  const TensorView* q_norm = nullptr;  // [head_dim] (per head) or [heads*head_dim] (whole)
  const TensorView* k_norm = nullptr;  // [head_dim] or [kv_heads*head_dim]

  bool is_moe = false;
  const TensorView* router = nullptr;             // [experts, hidden]
  std::vector<MlpWeights> experts;                // [experts] of ffn = moe_intermediate_size
  MlpWeights shared_expert;                       // ffn = shared_expert_intermediate_size
  const TensorView* shared_expert_gate = nullptr;  // [1, hidden]
  MlpWeights dense_mlp;                           // non-MoE layers: ffn = intermediate_size
};

// Parameter counts from the bound tensors (elements, not bytes).
struct ParameterCounts {
  int64_t total = 0;
  int64_t routed_expert = 0;     // all routed experts of all layers
  int64_t shared_expert = 0;     // shared experts and their gates
  int64_t non_expert = 0;        // total - routed_expert - shared_expert
  int64_t active_per_token = 0;  // non_expert + shared + top_k routed experts per MoE layer
  int64_t params_per_routed_expert = 0;  // one expert of one layer
  std::vector<int64_t> layer_total;      // [num_layers]
  std::vector<int64_t> layer_active;     // [num_layers]
};

struct ModelWeights {
  const TensorView* embed_tokens = nullptr;  // [vocab, hidden]
  const TensorView* final_norm = nullptr;    // [hidden]
  const TensorView* lm_head = nullptr;       // [vocab, hidden] (embed_tokens when tied)
  std::vector<LayerWeights> layers;
  ParameterCounts parameters;
};

// Binds and checks every tensor the config calls for. Errors name the file and tensor.
absl::StatusOr<ModelWeights> BindModelWeights(const ModelConfig& config, const TensorStore& store);

}  // namespace moe
