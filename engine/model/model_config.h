// ModelConfig: the decoder description read from a Hugging Face config.json.
// Mixtral, Qwen2-MoE, Qwen3-MoE and OLMoE are one decoder with different traits; the traits
// are data here, not a class hierarchy (see shared DESIGN.md section 3).
#pragma once

#include <cstdint>
#include <string>
#include "absl/strings/string_view.h"
#include <vector>

#include "absl/status/statusor.h"

namespace moe {

enum class Architecture { kMixtral, kQwen2Moe, kQwen3Moe, kOlmoe };

// How q and k are normalised before RoPE.
enum class QkNorm {
  kNone,
  kPerHead,          // Qwen3-MoE: RMSNorm over each head's head_dim, weights [head_dim]
  kWholeProjection,  // OLMoE: RMSNorm over the whole q / k projection, weights [heads*head_dim]
};

struct ModelConfig {
  Architecture architecture = Architecture::kMixtral;
  std::string architecture_name;  // e.g. "MixtralForCausalLM"

  int32_t vocab_size = 0;
  int32_t hidden_size = 0;
  int32_t num_layers = 0;
  int32_t num_heads = 0;
  int32_t num_kv_heads = 0;
  int32_t head_dim = 0;
  int32_t max_position_embeddings = 0;
  float rms_norm_eps = 1e-6f;
  double rope_theta = 10000.0;
  int32_t sliding_window = 0;  // 0 = full attention; else attend to the last N positions
  bool tie_word_embeddings = false;

  // Attention traits.
  bool qkv_bias = false;  // biases on q/k/v projections
  bool o_bias = false;    // bias on the output projection
  QkNorm qk_norm = QkNorm::kNone;
  float clip_qkv = 0.0f;  // OLMoE: clamp q/k/v to [-clip, clip] when > 0

  // MoE traits.
  int32_t num_experts = 0;
  int32_t top_k = 0;
  int32_t moe_intermediate_size = 0;  // per routed expert
  int32_t intermediate_size = 0;      // dense MLP layers (when any)
  bool norm_topk_prob = false;        // renormalise the top-k routing weights to sum to 1
  int32_t shared_expert_intermediate_size = 0;  // 0 = no shared expert
  std::vector<bool> layer_is_moe;               // [num_layers]

  int32_t bos_token_id = -1;
  std::vector<int32_t> eos_token_ids;

  int32_t num_moe_layers() const;
  int32_t q_dim() const { return num_heads * head_dim; }
  int32_t kv_dim() const { return num_kv_heads * head_dim; }
};

absl::string_view ArchitectureName(Architecture architecture);

// Parses config.json text. Unknown architectures and unsupported settings are refused with a
// message naming what is supported. `source` names the file in messages.
absl::StatusOr<ModelConfig> ParseModelConfig(absl::string_view json_text, absl::string_view source);

// Reads <dir>/config.json.
absl::StatusOr<ModelConfig> LoadModelConfig(const std::string& model_dir);

}  // namespace moe
