// config.json parsing per architecture, refusals, and parameter accounting checked against an
// independent count over the checkpoint's tensors.
#include <map>

#include "absl/strings/match.h"
#include "engine/model/loaded_model.h"
#include "engine/model/model_config.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace moe {
namespace {

using testing::HasSubstr;

std::string FixtureDir(const std::string& name) {
  return std::string(MOE_SOURCE_DIR) + "/tests/fixtures/models/" + name;
}

TEST(ModelConfigTest, FixtureTraits) {
  auto mixtral = LoadModelConfig(FixtureDir("mixtral"));
  ASSERT_TRUE(mixtral.ok()) << mixtral.status();
  EXPECT_EQ(mixtral->architecture, Architecture::kMixtral);
  EXPECT_TRUE(mixtral->norm_topk_prob);
  EXPECT_EQ(mixtral->num_moe_layers(), mixtral->num_layers);
  EXPECT_EQ(mixtral->head_dim, mixtral->hidden_size / mixtral->num_heads);

  auto qwen2 = LoadModelConfig(FixtureDir("qwen2_moe"));
  ASSERT_TRUE(qwen2.ok()) << qwen2.status();
  EXPECT_TRUE(qwen2->qkv_bias);
  EXPECT_GT(qwen2->shared_expert_intermediate_size, 0);
  EXPECT_LT(qwen2->num_moe_layers(), qwen2->num_layers);  // dense layers in between
  EXPECT_TRUE(qwen2->tie_word_embeddings);

  auto qwen3 = LoadModelConfig(FixtureDir("qwen3_moe"));
  ASSERT_TRUE(qwen3.ok()) << qwen3.status();
  EXPECT_EQ(qwen3->qk_norm, QkNorm::kPerHead);
  EXPECT_NE(qwen3->head_dim, qwen3->hidden_size / qwen3->num_heads);
  EXPECT_TRUE(qwen3->norm_topk_prob);

  auto olmoe = LoadModelConfig(FixtureDir("olmoe"));
  ASSERT_TRUE(olmoe.ok()) << olmoe.status();
  EXPECT_EQ(olmoe->qk_norm, QkNorm::kWholeProjection);
  EXPECT_FALSE(olmoe->norm_topk_prob);
}

TEST(ModelConfigTest, QwenSparseStepAndMlpOnlyLayers) {
  auto config = ParseModelConfig(R"({"architectures":["Qwen2MoeForCausalLM"],"vocab_size":10,
      "hidden_size":8,"num_hidden_layers":6,"num_attention_heads":2,"num_experts":4,
      "num_experts_per_tok":2,"moe_intermediate_size":4,"intermediate_size":16,
      "decoder_sparse_step":2,"mlp_only_layers":[3]})",
                                 "test");
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_THAT(config->layer_is_moe, testing::ElementsAre(false, true, false, false, false, true));
}

TEST(ModelConfigTest, RefusesUnsupported) {
  const std::map<std::string, std::string> cases = {
      {R"({"architectures":["LlamaForCausalLM"]})", "'LlamaForCausalLM' is not supported; supported: MixtralForCausalLM"},
      {R"({"architectures":["MixtralForCausalLM"],"vocab_size":10,"hidden_size":8,
          "num_hidden_layers":1,"num_attention_heads":2,"num_local_experts":4,
          "num_experts_per_tok":2,"intermediate_size":4,
          "rope_scaling":{"rope_type":"yarn","factor":4}})", "rope_scaling type 'yarn'"},
      {R"({"architectures":["MixtralForCausalLM"],"vocab_size":10,"hidden_size":8,
          "num_hidden_layers":1,"num_attention_heads":2,"num_local_experts":4,
          "num_experts_per_tok":2,"intermediate_size":4,"hidden_act":"gelu"})", "hidden_act 'gelu'"},
      {R"({"architectures":["MixtralForCausalLM"],"vocab_size":10,"hidden_size":8,
          "num_hidden_layers":1,"num_attention_heads":2,"num_local_experts":4,
          "num_experts_per_tok":5,"intermediate_size":4})", "num_experts_per_tok (5)"},
      {R"({"architectures":["MixtralForCausalLM"],"vocab_size":10,"hidden_size":8,
          "num_hidden_layers":1,"num_attention_heads":3,"num_key_value_heads":2,
          "num_local_experts":4,"num_experts_per_tok":2,"intermediate_size":4})", "multiple of num_key_value_heads"},
      {R"({"architectures":["MixtralForCausalLM"],"hidden_size":8})", "missing required integer field 'vocab_size'"},
      {R"({"architectures":["MixtralForCausalLM"],"vocab_size":"ten"})", "'vocab_size' must be a non-negative integer"},
      {R"({"architectures":["Qwen3MoeForCausalLM"],"vocab_size":10,"hidden_size":8,
          "num_hidden_layers":1,"num_attention_heads":2,"num_experts":4,
          "num_experts_per_tok":2,"moe_intermediate_size":4,"use_sliding_window":true})", "use_sliding_window"},
      {R"([1,2])", "not a JSON object"},
      // fuzz/model_config_fuzzer: Qwen's num_experts 0 is a dense model (was accepted with
      // top_k 2 of 0 experts).
      {R"({"architectures":["Qwen3MoeForCausalLM"],"vocab_size":10,"hidden_size":8,
          "num_hidden_layers":2,"num_attention_heads":2,"num_experts":0,
          "num_experts_per_tok":2,"moe_intermediate_size":4,"intermediate_size":4})",
       "no layer has routed experts (num_experts 0, 2 layers)"},
      {R"({"architectures":["Qwen2MoeForCausalLM"],"vocab_size":10,"hidden_size":8,
          "num_hidden_layers":2,"num_attention_heads":2,"num_experts":4,"mlp_only_layers":[0,1],
          "num_experts_per_tok":2,"moe_intermediate_size":4,"intermediate_size":4})",
       "no layer has routed experts (num_experts 4, 2 layers)"},
      {R"({"architectures":["MixtralForCausalLM"],"vocab_size":10,"hidden_size":8,
          "num_hidden_layers":1,"num_attention_heads":2,"num_local_experts":0,
          "num_experts_per_tok":2,"intermediate_size":4})",
       "num_experts_per_tok (2) must be in [1, number of experts (0)]"},
      // fuzz/model_config_fuzzer: q_dim() = 65536 * 65536 overflowed int32.
      {R"({"architectures":["MixtralForCausalLM"],"vocab_size":10,"hidden_size":8,
          "num_hidden_layers":1,"num_attention_heads":65536,"num_key_value_heads":65536,
          "head_dim":65536,"num_local_experts":4,"num_experts_per_tok":2,
          "intermediate_size":4})", "num_attention_heads x head_dim (65536 x 65536)"},
  };
  for (const auto& [json, message] : cases) {
    auto config = ParseModelConfig(json, "config.json");
    ASSERT_FALSE(config.ok()) << json;
    EXPECT_THAT(config.status().message(), HasSubstr(message)) << json;
    EXPECT_THAT(config.status().message(), HasSubstr("config.json")) << json;
  }
}

TEST(ModelConfigTest, MissingDirectory) {
  auto config = LoadModelConfig("/nonexistent/model");
  ASSERT_FALSE(config.ok());
  EXPECT_THAT(config.status().message(), HasSubstr("/nonexistent/model/config.json"));
}

// Parameter gauges equal a count made here from tensor names alone.
class ParameterCountTest : public testing::TestWithParam<std::string> {};

TEST_P(ParameterCountTest, MatchesIndependentCount) {
  auto model = LoadModel(FixtureDir(GetParam()));
  ASSERT_TRUE(model.ok()) << model.status();
  const ModelConfig& config = (*model)->config;
  int64_t total = 0, routed = 0, shared = 0;
  std::map<int, int64_t> routed_per_layer;
  for (const auto& [name, view] : (*model)->tensors.tensors()) {
    total += view->num_elements();
    if (absl::StrContains(name, ".experts.")) {
      routed += view->num_elements();
      routed_per_layer[std::stoi(name.substr(std::string("model.layers.").size()))] +=
          view->num_elements();
    } else if (absl::StrContains(name, "shared_expert")) {
      shared += view->num_elements();
    }
  }
  int64_t active = total - routed;
  for (const auto& [layer, count] : routed_per_layer) {
    active += count / config.num_experts * config.top_k;
  }
  const ParameterCounts& counts = (*model)->weights.parameters;
  EXPECT_EQ(counts.total, total);
  EXPECT_EQ(counts.routed_expert, routed);
  EXPECT_EQ(counts.shared_expert, shared);
  EXPECT_EQ(counts.non_expert, total - routed - shared);
  EXPECT_EQ(counts.active_per_token, active);
  EXPECT_LT(counts.active_per_token, counts.total);
  EXPECT_EQ(static_cast<int>(routed_per_layer.size()), config.num_moe_layers());
}

INSTANTIATE_TEST_SUITE_P(AllArchitectures, ParameterCountTest,
                         testing::Values("mixtral", "qwen2_moe", "qwen3_moe", "olmoe"));

}  // namespace
}  // namespace moe
