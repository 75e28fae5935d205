#include "engine/model/model_config.h"

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "engine/common/status_macros.h"
#include "nlohmann/json.hpp"

namespace moe {
namespace {

using Json = nlohmann::json;

constexpr absl::string_view kSupportedArchitectures =
    "MixtralForCausalLM, Qwen2MoeForCausalLM, Qwen3MoeForCausalLM, OlmoeForCausalLM";

// Typed access to config.json fields; the first problem found is kept and reported.
class FieldReader {
 public:
  FieldReader(const Json& json, absl::string_view source) : json_(json), source_(source) {}

  bool Has(absl::string_view name) const {
    const auto it = json_.find(std::string(name));
    return it != json_.end() && !it->is_null();
  }

  int32_t Int(absl::string_view name, std::optional<int32_t> fallback = std::nullopt) {
    const auto it = json_.find(std::string(name));
    if (it == json_.end() || it->is_null()) {
      if (!fallback) Fail(absl::StrCat("missing required integer field '", name, "'"));
      return fallback.value_or(0);
    }
    if (!it->is_number_integer() || it->get<int64_t>() < 0 ||
        it->get<int64_t>() > (int64_t{1} << 30)) {
      Fail(absl::StrCat("field '", name, "' must be a non-negative integer"));
      return 0;
    }
    return static_cast<int32_t>(it->get<int64_t>());
  }

  double Number(absl::string_view name, double fallback) {
    const auto it = json_.find(std::string(name));
    if (it == json_.end() || it->is_null()) return fallback;
    if (!it->is_number()) {
      Fail(absl::StrCat("field '", name, "' must be a number"));
      return fallback;
    }
    return it->get<double>();
  }

  bool Bool(absl::string_view name, bool fallback) {
    const auto it = json_.find(std::string(name));
    if (it == json_.end() || it->is_null()) return fallback;
    if (!it->is_boolean()) {
      Fail(absl::StrCat("field '", name, "' must be true or false"));
      return fallback;
    }
    return it->get<bool>();
  }

  // An integer or a list of integers (eos_token_id), or an empty list when absent.
  std::vector<int32_t> IntList(absl::string_view name) {
    std::vector<int32_t> values;
    const auto it = json_.find(std::string(name));
    if (it == json_.end() || it->is_null()) return values;
    if (it->is_number_integer()) {
      values.push_back(static_cast<int32_t>(it->get<int64_t>()));
      return values;
    }
    if (!it->is_array()) {
      Fail(absl::StrCat("field '", name, "' must be an integer or a list of integers"));
      return values;
    }
    for (const Json& value : *it) {
      if (!value.is_number_integer()) {
        Fail(absl::StrCat("field '", name, "' must contain only integers"));
        return {};
      }
      values.push_back(static_cast<int32_t>(value.get<int64_t>()));
    }
    return values;
  }

  void Fail(std::string message) {
    if (status_.ok()) status_ = absl::InvalidArgumentError(absl::StrCat(source_, ": ", message));
  }
  const absl::Status& status() const { return status_; }

 private:
  const Json& json_;
  absl::string_view source_;
  absl::Status status_;
};

absl::StatusOr<Architecture> ParseArchitecture(const Json& json, absl::string_view source,
                                               std::string* name) {
  const auto it = json.find("architectures");
  if (it == json.end() || !it->is_array() || it->size() != 1 || !(*it)[0].is_string()) {
    return absl::InvalidArgumentError(absl::StrCat(
        source, ": 'architectures' must list exactly one of: ", kSupportedArchitectures));
  }
  *name = (*it)[0].get<std::string>();
  if (*name == "MixtralForCausalLM") return Architecture::kMixtral;
  if (*name == "Qwen2MoeForCausalLM") return Architecture::kQwen2Moe;
  if (*name == "Qwen3MoeForCausalLM") return Architecture::kQwen3Moe;
  if (*name == "OlmoeForCausalLM") return Architecture::kOlmoe;
  return absl::InvalidArgumentError(
      absl::StrCat(source, ": architecture '", *name,
                   "' is not supported; supported: ", kSupportedArchitectures));
}

// Settings we do not implement are refused rather than silently ignored.
void RefuseUnsupported(const Json& json, const ModelConfig& config, FieldReader& reader) {
  if (const auto it = json.find("rope_scaling"); it != json.end() && !it->is_null()) {
    std::string type = "unknown";
    if (it->is_object()) {
      for (const char* key : {"rope_type", "type"}) {
        if (it->contains(key) && (*it)[key].is_string()) type = (*it)[key].get<std::string>();
      }
    }
    if (type != "default") {
      reader.Fail(absl::StrCat("rope_scaling type '", type,
                               "' is not supported; supported: none (plain RoPE with rope_theta)"));
    }
  }
  if (const auto it = json.find("hidden_act"); it != json.end() && it->is_string()) {
    if (it->get<std::string>() != "silu") {
      reader.Fail(absl::StrCat("hidden_act '", it->get<std::string>(),
                               "' is not supported; supported: silu"));
    }
  }
  if (const auto it = json.find("partial_rotary_factor");
      it != json.end() && !(it->is_number() && it->get<double>() == 1.0)) {
    reader.Fail("partial_rotary_factor other than 1 is not supported; supported: 1 (full RoPE)");
  }
  if (const auto it = json.find("quantization_config"); it != json.end() && !it->is_null()) {
    reader.Fail("quantization_config is not supported; supported: unquantized bf16, f16, f32");
  }
  if (config.architecture != Architecture::kMixtral && reader.Bool("use_sliding_window", false)) {
    reader.Fail("use_sliding_window=true is not supported for this architecture; supported: false");
  }
}

}  // namespace

int32_t ModelConfig::num_moe_layers() const {
  return static_cast<int32_t>(std::count(layer_is_moe.begin(), layer_is_moe.end(), true));
}

absl::string_view ArchitectureName(Architecture architecture) {
  switch (architecture) {
    case Architecture::kMixtral:
      return "MixtralForCausalLM";
    case Architecture::kQwen2Moe:
      return "Qwen2MoeForCausalLM";
    case Architecture::kQwen3Moe:
      return "Qwen3MoeForCausalLM";
    case Architecture::kOlmoe:
      return "OlmoeForCausalLM";
  }
  return "?";
}

absl::StatusOr<ModelConfig> ParseModelConfig(absl::string_view json_text,
                                             absl::string_view source) {
  const Json json = Json::parse(json_text, nullptr, /*allow_exceptions=*/false);
  if (json.is_discarded() || !json.is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(source, ": not a JSON object"));
  }
  ModelConfig config;
  ASSIGN_OR_RETURN(config.architecture, ParseArchitecture(json, source, &config.architecture_name));
  FieldReader reader(json, source);

  config.vocab_size = reader.Int("vocab_size");
  config.hidden_size = reader.Int("hidden_size");
  config.num_layers = reader.Int("num_hidden_layers");
  config.num_heads = reader.Int("num_attention_heads");
  config.num_kv_heads = reader.Int("num_key_value_heads", config.num_heads);
  config.max_position_embeddings = reader.Int("max_position_embeddings", 4096);
  // Defaults as transformers 4.57 fills them in when a field is absent.
  const bool is_mixtral = config.architecture == Architecture::kMixtral;
  const bool is_qwen = config.architecture == Architecture::kQwen2Moe ||
                       config.architecture == Architecture::kQwen3Moe;
  config.rms_norm_eps = static_cast<float>(reader.Number("rms_norm_eps", is_qwen ? 1e-6 : 1e-5));
  config.rope_theta = reader.Number("rope_theta", is_mixtral ? 1e6 : 1e4);
  config.tie_word_embeddings = reader.Bool("tie_word_embeddings", false);
  if (config.num_heads > 0) {
    // Qwen2-MoE and OLMoE always use hidden / heads; Mixtral and Qwen3-MoE honour head_dim.
    const int32_t derived = config.hidden_size / config.num_heads;
    config.head_dim = (is_mixtral || config.architecture == Architecture::kQwen3Moe)
                          ? reader.Int("head_dim", derived)
                          : derived;
  }
  const std::vector<int32_t> bos = reader.IntList("bos_token_id");
  config.bos_token_id = bos.empty() ? -1 : bos.front();
  config.eos_token_ids = reader.IntList("eos_token_id");

  std::vector<int32_t> mlp_only_layers;
  int32_t decoder_sparse_step = 1;
  switch (config.architecture) {
    case Architecture::kMixtral:
      config.num_experts = reader.Int("num_local_experts");
      config.top_k = reader.Int("num_experts_per_tok");
      config.moe_intermediate_size = reader.Int("intermediate_size");
      config.norm_topk_prob = true;  // Mixtral always renormalises its top-k weights
      config.sliding_window = reader.Int("sliding_window", 0);
      break;
    case Architecture::kOlmoe:
      config.num_experts = reader.Int("num_experts");
      config.top_k = reader.Int("num_experts_per_tok");
      config.moe_intermediate_size = reader.Int("intermediate_size");
      config.norm_topk_prob = reader.Bool("norm_topk_prob", false);
      config.qkv_bias = config.o_bias = reader.Bool("attention_bias", false);
      config.qk_norm = QkNorm::kWholeProjection;
      config.clip_qkv = static_cast<float>(reader.Number("clip_qkv", 0.0));
      break;
    case Architecture::kQwen2Moe:
    case Architecture::kQwen3Moe:
      config.num_experts = reader.Int("num_experts");
      config.top_k = reader.Int("num_experts_per_tok");
      config.moe_intermediate_size = reader.Int("moe_intermediate_size");
      config.intermediate_size = reader.Int("intermediate_size", 0);
      config.norm_topk_prob = reader.Bool("norm_topk_prob", false);
      decoder_sparse_step = reader.Int("decoder_sparse_step", 1);
      if (decoder_sparse_step < 1) reader.Fail("decoder_sparse_step must be at least 1");
      mlp_only_layers = reader.IntList("mlp_only_layers");
      if (config.architecture == Architecture::kQwen2Moe) {
        config.qkv_bias = reader.Bool("qkv_bias", true);  // Qwen2 always has q/k/v biases
        config.shared_expert_intermediate_size = reader.Int("shared_expert_intermediate_size", 0);
      } else {
        config.qkv_bias = config.o_bias = reader.Bool("attention_bias", false);
        config.qk_norm = QkNorm::kPerHead;
      }
      break;
  }
  RefuseUnsupported(json, config, reader);
  RETURN_IF_ERROR(reader.status());

  // Which layers are MoE. Qwen: layer i is MoE iff i not in mlp_only_layers and
  // (i + 1) % decoder_sparse_step == 0; Mixtral and OLMoE: every layer.
  config.layer_is_moe.assign(config.num_layers, true);
  if (config.architecture == Architecture::kQwen2Moe ||
      config.architecture == Architecture::kQwen3Moe) {
    for (int32_t layer = 0; layer < config.num_layers; ++layer) {
      const bool mlp_only =
          std::find(mlp_only_layers.begin(), mlp_only_layers.end(), layer) != mlp_only_layers.end();
      config.layer_is_moe[layer] =
          !mlp_only && config.num_experts > 0 && (layer + 1) % decoder_sparse_step == 0;
    }
  }

  // Consistency.
  auto invalid = [&](std::string message) {
    return absl::InvalidArgumentError(absl::StrCat(source, ": ", message));
  };
  if (config.vocab_size <= 0 || config.hidden_size <= 0 || config.num_layers <= 0 ||
      config.num_heads <= 0 || config.head_dim <= 0) {
    return invalid(
        "vocab_size, hidden_size, num_hidden_layers, num_attention_heads and head_dim "
        "must be positive");
  }
  if (config.num_kv_heads <= 0 || config.num_heads % config.num_kv_heads != 0) {
    return invalid(absl::StrCat("num_attention_heads (", config.num_heads,
                                ") must be a multiple of num_key_value_heads (",
                                config.num_kv_heads, ")"));
  }
  if (config.head_dim % 2 != 0) return invalid("head_dim must be even for RoPE");
  // Each size is at most 2^30 (Int above), but the decoder multiplies heads x head_dim in
  // int32 (q_dim, kv_dim): refuse products that overflow (found by fuzz/model_config_fuzzer).
  constexpr int64_t kMaxDimension = int64_t{1} << 30;
  if (int64_t{config.num_heads} * config.head_dim > kMaxDimension) {
    return invalid(absl::StrCat("num_attention_heads x head_dim (", config.num_heads, " x ",
                                config.head_dim, ") is larger than ", kMaxDimension));
  }
  // Qwen's num_experts 0 (or every layer in mlp_only_layers) makes a dense model in
  // transformers; moe-serve serves Mixture-of-Experts models, and its MoE statistics, metrics
  // and tests assume at least one routed layer (found by fuzz/model_config_fuzzer).
  if (config.num_moe_layers() == 0) {
    return invalid(absl::StrCat("no layer has routed experts (num_experts ", config.num_experts,
                                ", ", config.num_layers,
                                " layers); moe-serve serves Mixture-of-Experts models"));
  }
  if (config.num_experts <= 0 || config.top_k <= 0 || config.top_k > config.num_experts) {
    return invalid(absl::StrCat("num_experts_per_tok (", config.top_k,
                                ") must be in [1, number of experts (", config.num_experts, ")]"));
  }
  if (config.moe_intermediate_size <= 0) return invalid("expert intermediate size must be > 0");
  if (config.num_moe_layers() < config.num_layers && config.intermediate_size <= 0) {
    return invalid("dense layers need intermediate_size > 0");
  }
  if (config.rope_theta <= 0) return invalid("rope_theta must be positive");
  return config;
}

absl::StatusOr<ModelConfig> LoadModelConfig(const std::string& model_dir) {
  const std::string path = (std::filesystem::path(model_dir) / "config.json").string();
  std::ifstream in(path);
  if (!in)
    return absl::NotFoundError(absl::StrCat(path, ": cannot open (is --model a model directory?)"));
  std::ostringstream text;
  text << in.rdbuf();
  return ParseModelConfig(text.str(), path);
}

}  // namespace moe
