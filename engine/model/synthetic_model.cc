#include "engine/model/synthetic_model.h"

#include <cmath>
#include <filesystem>
#include <fstream>

#include "absl/strings/str_cat.h"
#include "engine/common/status_macros.h"
#include "engine/model/safetensors_writer.h"
#include "nlohmann/json.hpp"

namespace moe {
namespace {

// splitmix64: a fast, portable generator, so a seed gives the same weights everywhere.
class Random {
 public:
  explicit Random(uint64_t seed) : state_(seed) {}
  uint64_t Next() {
    uint64_t z = (state_ += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
  }
  // Uniform in [-1, 1).
  float Symmetric() { return static_cast<float>(static_cast<double>(Next() >> 11) * 0x1.0p-52 - 1.0); }

 private:
  uint64_t state_;
};

struct SyntheticTensor {
  TensorSpec spec;
  float center;  // values are center + scale * uniform[-1, 1)
  float scale;
};

std::string ConfigJson(const SyntheticModelSpec& spec) {
  nlohmann::ordered_json config = {
      {"architectures", {"MixtralForCausalLM"}},
      {"model_type", "mixtral"},
      {"vocab_size", spec.vocab_size},
      {"hidden_size", spec.hidden_size},
      {"intermediate_size", spec.expert_intermediate_size},
      {"num_hidden_layers", spec.num_layers},
      {"num_attention_heads", spec.num_heads},
      {"num_key_value_heads", spec.num_kv_heads},
      {"num_local_experts", spec.num_experts},
      {"num_experts_per_tok", spec.top_k},
      {"max_position_embeddings", spec.max_position_embeddings},
      {"rms_norm_eps", 1e-5},
      {"rope_theta", 1000000.0},
      {"hidden_act", "silu"},
      {"tie_word_embeddings", false},
      {"bos_token_id", spec.bos_token_id >= 0 ? nlohmann::ordered_json(spec.bos_token_id)
                                               : nlohmann::ordered_json(nullptr)},
      {"eos_token_id", spec.eos_token_id},
      {"torch_dtype", spec.f32_weights ? "float32" : "bfloat16"},
      {"moe_serve_synthetic", {{"seed", spec.seed}}},
  };
  return config.dump(2);
}

std::vector<SyntheticTensor> TensorsOf(const SyntheticModelSpec& spec) {
  const DType dtype = spec.f32_weights ? DType::kF32 : DType::kBF16;
  const int64_t hidden = spec.hidden_size;
  const int64_t head_dim = hidden / spec.num_heads;
  const int64_t q_dim = head_dim * spec.num_heads;
  const int64_t kv_dim = head_dim * spec.num_kv_heads;
  const int64_t ffn = spec.expert_intermediate_size;
  std::vector<SyntheticTensor> tensors;
  // Linear layers get uniform weights with variance 1 / fan_in, norms are close to 1.
  auto linear = [&](std::string name, int64_t out, int64_t in) {
    tensors.push_back({{std::move(name), dtype, {out, in}}, 0.0f,
                       static_cast<float>(std::sqrt(3.0 / static_cast<double>(in)))});
  };
  auto norm = [&](std::string name, int64_t size) {
    tensors.push_back({{std::move(name), dtype, {size}}, 1.0f, 0.1f});
  };
  tensors.push_back({{"model.embed_tokens.weight", dtype, {spec.vocab_size, hidden}}, 0.0f, 1.0f});
  for (int32_t layer = 0; layer < spec.num_layers; ++layer) {
    const std::string prefix = absl::StrCat("model.layers.", layer, ".");
    norm(prefix + "input_layernorm.weight", hidden);
    norm(prefix + "post_attention_layernorm.weight", hidden);
    linear(prefix + "self_attn.q_proj.weight", q_dim, hidden);
    linear(prefix + "self_attn.k_proj.weight", kv_dim, hidden);
    linear(prefix + "self_attn.v_proj.weight", kv_dim, hidden);
    linear(prefix + "self_attn.o_proj.weight", hidden, q_dim);
    linear(prefix + "block_sparse_moe.gate.weight", spec.num_experts, hidden);
    for (int32_t expert = 0; expert < spec.num_experts; ++expert) {
      const std::string e = absl::StrCat(prefix, "block_sparse_moe.experts.", expert, ".");
      linear(e + "w1.weight", ffn, hidden);
      linear(e + "w2.weight", hidden, ffn);
      linear(e + "w3.weight", ffn, hidden);
    }
  }
  norm("model.norm.weight", hidden);
  linear("lm_head.weight", spec.vocab_size, hidden);
  return tensors;
}

}  // namespace

absl::StatusOr<SyntheticModelSpec> SyntheticPreset(const std::string& name) {
  SyntheticModelSpec spec;  // defaults are bench-mixtral
  if (name == "bench-mixtral") return spec;
  if (name == "demo") {
    spec.vocab_size = 2048;
    spec.hidden_size = 256;
    spec.num_layers = 4;
    spec.num_heads = 8;
    spec.num_kv_heads = 2;
    spec.num_experts = 8;
    spec.top_k = 2;
    spec.expert_intermediate_size = 512;
    return spec;
  }
  return absl::InvalidArgumentError(
      absl::StrCat("unknown synthetic model preset '", name, "'; supported: demo, bench-mixtral"));
}

absl::Status WriteSyntheticModel(const SyntheticModelSpec& spec, const std::string& dir) {
  if (spec.num_heads <= 0 || spec.hidden_size % spec.num_heads != 0 || spec.num_kv_heads <= 0 ||
      spec.num_heads % spec.num_kv_heads != 0 || spec.top_k <= 0 || spec.top_k > spec.num_experts) {
    return absl::InvalidArgumentError("synthetic model: inconsistent head or expert counts");
  }
  std::error_code error;
  std::filesystem::create_directories(dir, error);
  if (error) return absl::PermissionDeniedError(absl::StrCat(dir, ": ", error.message()));
  {
    std::ofstream config(std::filesystem::path(dir) / "config.json", std::ios::trunc);
    config << ConfigJson(spec) << "\n";
    if (!config) return absl::DataLossError(absl::StrCat(dir, "/config.json: write failed"));
  }
  const std::vector<SyntheticTensor> tensors = TensorsOf(spec);
  std::vector<TensorSpec> specs;
  for (const SyntheticTensor& tensor : tensors) specs.push_back(tensor.spec);
  ASSIGN_OR_RETURN(
      SafetensorsStreamWriter writer,
      SafetensorsStreamWriter::Create((std::filesystem::path(dir) / "model.safetensors").string(),
                                      specs));
  Random random(spec.seed);
  std::vector<uint8_t> bytes;
  for (const SyntheticTensor& tensor : tensors) {
    bytes.resize(tensor.spec.num_bytes());
    const int64_t elements = tensor.spec.num_bytes() / DTypeSize(tensor.spec.dtype);
    for (int64_t i = 0; i < elements; ++i) {
      const float value = tensor.center + tensor.scale * random.Symmetric();
      if (tensor.spec.dtype == DType::kBF16) {
        const uint16_t bits = FloatToBf16(value);
        std::memcpy(bytes.data() + 2 * i, &bits, 2);
      } else {
        std::memcpy(bytes.data() + 4 * i, &value, 4);
      }
    }
    RETURN_IF_ERROR(writer.Append(bytes));
  }
  return writer.Finish();
}

}  // namespace moe
