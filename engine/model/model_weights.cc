#include "engine/model/model_weights.h"

#include <set>

#include "absl/strings/str_cat.h"
#include "engine/common/status_macros.h"

namespace moe {
namespace {

// Hugging Face tensor names of one architecture's layers.
struct TensorNaming {
  std::string moe_block;  // "block_sparse_moe" (Mixtral) or "mlp"
  std::string expert_gate, expert_up, expert_down;
};

TensorNaming NamingFor(Architecture architecture) {
  if (architecture == Architecture::kMixtral) return {"block_sparse_moe", "w1", "w3", "w2"};
  return {"mlp", "gate_proj", "up_proj", "down_proj"};
}

class Binder {
 public:
  explicit Binder(const TensorStore& store) : store_(store) {}

  absl::StatusOr<const TensorView*> Weight(const std::string& name, std::vector<int64_t> shape) {
    ASSIGN_OR_RETURN(const TensorView* view, store_.GetWeight(name, shape));
    if (bound_.insert(view).second) parameters_ += view->num_elements();
    return view;
  }

  absl::StatusOr<MlpWeights> Mlp(const std::string& prefix, const TensorNaming& naming,
                                 int64_t ffn, int64_t hidden) {
    MlpWeights mlp;
    ASSIGN_OR_RETURN(mlp.gate, Weight(prefix + naming.expert_gate + ".weight", {ffn, hidden}));
    ASSIGN_OR_RETURN(mlp.up, Weight(prefix + naming.expert_up + ".weight", {ffn, hidden}));
    ASSIGN_OR_RETURN(mlp.down, Weight(prefix + naming.expert_down + ".weight", {hidden, ffn}));
    return mlp;
  }

  // Parameters bound since the last call.
  int64_t TakeParameters() { return std::exchange(parameters_, 0); }

 private:
  const TensorStore& store_;
  std::set<const TensorView*> bound_;
  int64_t parameters_ = 0;
};

}  // namespace

absl::StatusOr<ModelWeights> BindModelWeights(const ModelConfig& config, const TensorStore& store) {
  const TensorNaming naming = NamingFor(config.architecture);
  const int64_t hidden = config.hidden_size;
  const int64_t q_dim = config.q_dim();
  const int64_t kv_dim = config.kv_dim();
  ModelWeights weights;
  ParameterCounts& counts = weights.parameters;
  Binder binder(store);

  ASSIGN_OR_RETURN(weights.embed_tokens,
                   binder.Weight("model.embed_tokens.weight", {config.vocab_size, hidden}));
  ASSIGN_OR_RETURN(weights.final_norm, binder.Weight("model.norm.weight", {hidden}));
  if (config.tie_word_embeddings) {
    weights.lm_head = weights.embed_tokens;
  } else {
    ASSIGN_OR_RETURN(weights.lm_head, binder.Weight("lm_head.weight", {config.vocab_size, hidden}));
  }
  int64_t global_parameters = binder.TakeParameters();

  for (int32_t index = 0; index < config.num_layers; ++index) {
    const std::string prefix = absl::StrCat("model.layers.", index, ".");
    const std::string attn = prefix + "self_attn.";
    LayerWeights layer;
    ASSIGN_OR_RETURN(layer.input_norm, binder.Weight(prefix + "input_layernorm.weight", {hidden}));
    ASSIGN_OR_RETURN(layer.post_attention_norm,
                     binder.Weight(prefix + "post_attention_layernorm.weight", {hidden}));
    ASSIGN_OR_RETURN(layer.q, binder.Weight(attn + "q_proj.weight", {q_dim, hidden}));
    ASSIGN_OR_RETURN(layer.k, binder.Weight(attn + "k_proj.weight", {kv_dim, hidden}));
    ASSIGN_OR_RETURN(layer.v, binder.Weight(attn + "v_proj.weight", {kv_dim, hidden}));
    ASSIGN_OR_RETURN(layer.o, binder.Weight(attn + "o_proj.weight", {hidden, q_dim}));
    if (config.qkv_bias) {
      ASSIGN_OR_RETURN(layer.q_bias, binder.Weight(attn + "q_proj.bias", {q_dim}));
      ASSIGN_OR_RETURN(layer.k_bias, binder.Weight(attn + "k_proj.bias", {kv_dim}));
      ASSIGN_OR_RETURN(layer.v_bias, binder.Weight(attn + "v_proj.bias", {kv_dim}));
    }
    if (config.o_bias) {
      ASSIGN_OR_RETURN(layer.o_bias, binder.Weight(attn + "o_proj.bias", {hidden}));
    }
    if (config.qk_norm == QkNorm::kPerHead) {
      ASSIGN_OR_RETURN(layer.q_norm, binder.Weight(attn + "q_norm.weight", {config.head_dim}));
      ASSIGN_OR_RETURN(layer.k_norm, binder.Weight(attn + "k_norm.weight", {config.head_dim}));
    } else if (config.qk_norm == QkNorm::kWholeProjection) {
      ASSIGN_OR_RETURN(layer.q_norm, binder.Weight(attn + "q_norm.weight", {q_dim}));
      ASSIGN_OR_RETURN(layer.k_norm, binder.Weight(attn + "k_norm.weight", {kv_dim}));
    }
    int64_t layer_non_expert = binder.TakeParameters();
    int64_t layer_routed = 0;
    int64_t layer_shared = 0;

    layer.is_moe = config.layer_is_moe[index];
    if (layer.is_moe) {
      const std::string moe = prefix + naming.moe_block + ".";
      ASSIGN_OR_RETURN(layer.router,
                       binder.Weight(moe + "gate.weight", {config.num_experts, hidden}));
      layer_non_expert += binder.TakeParameters();
      for (int32_t expert = 0; expert < config.num_experts; ++expert) {
        ASSIGN_OR_RETURN(MlpWeights mlp,
                         binder.Mlp(absl::StrCat(moe, "experts.", expert, "."), naming,
                                    config.moe_intermediate_size, hidden));
        layer.experts.push_back(mlp);
      }
      layer_routed = binder.TakeParameters();
      if (config.shared_expert_intermediate_size > 0) {
        ASSIGN_OR_RETURN(layer.shared_expert,
                         binder.Mlp(moe + "shared_expert.", naming,
                                    config.shared_expert_intermediate_size, hidden));
        ASSIGN_OR_RETURN(layer.shared_expert_gate,
                         binder.Weight(moe + "shared_expert_gate.weight", {1, hidden}));
        layer_shared = binder.TakeParameters();
      }
    } else {
      ASSIGN_OR_RETURN(layer.dense_mlp, binder.Mlp(prefix + "mlp.", naming,
                                                   config.intermediate_size, hidden));
      layer_non_expert += binder.TakeParameters();
    }
    const int64_t per_expert = layer.is_moe ? layer_routed / config.num_experts : 0;
    counts.params_per_routed_expert = std::max(counts.params_per_routed_expert, per_expert);
    counts.layer_total.push_back(layer_non_expert + layer_routed + layer_shared);
    counts.layer_active.push_back(layer_non_expert + layer_shared + per_expert * config.top_k);
    counts.routed_expert += layer_routed;
    counts.shared_expert += layer_shared;
    weights.layers.push_back(std::move(layer));
  }
  counts.total = global_parameters;
  counts.active_per_token = global_parameters;
  for (size_t i = 0; i < counts.layer_total.size(); ++i) {
    counts.total += counts.layer_total[i];
    counts.active_per_token += counts.layer_active[i];
  }
  counts.non_expert = counts.total - counts.routed_expert - counts.shared_expert;
  return weights;
}

}  // namespace moe
