// libFuzzer target: arbitrary bytes as a chat template through ChatTemplate::Parse, and an
// accepted template rendered with a fixed conversation (system, user, assistant with tool
// calls, tool result, a user turn with unicode), tools, special tokens and small limits.
// Checks: no crash, leak or UB; refusals carry a message; rendering stays within the limits
// (the output size limit holds and rendering terminates).
#include <cstddef>
#include <cstdint>
#include <string_view>

#include "engine/tokenizer/chat_template.h"
#include "fuzz/fuzz_util.h"
#include "nlohmann/json.hpp"

namespace {

const nlohmann::ordered_json& Context() {
  static const nlohmann::ordered_json context = nlohmann::ordered_json::parse(R"json({
    "messages": [
      {"role": "system", "content": "Be brief."},
      {"role": "user", "content": "What is the weather in Paris?"},
      {"role": "assistant", "content": "<think>\nplan\n</think>\n\nChecking.",
       "tool_calls": [{"type": "function",
                       "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
      {"role": "tool", "content": "{\"temp\": 21.5}"},
      {"role": "user", "content": "  Merci! caf\u00e9 \u4f60\u597d \ud83d\ude00\n"}
    ],
    "tools": [{"type": "function", "function": {"name": "get_weather", "description": "Weather",
               "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}],
    "documents": null,
    "add_generation_prompt": true,
    "enable_thinking": false,
    "bos_token": "<s>",
    "eos_token": "</s>"
  })json");
  return context;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using moe::fuzz::Check;
  const std::string_view source(reinterpret_cast<const char*>(data), size);
  auto parsed = moe::ChatTemplate::Parse(source);
  if (!parsed.ok()) {
    Check(!parsed.status().message().empty(), "parse refusals carry a message");
    return 0;
  }
  moe::ChatTemplateLimits limits;
  limits.max_output_bytes = 1 << 16;
  limits.max_steps = 200'000;
  limits.max_depth = 64;
  auto rendered = parsed->Render(Context(), limits);
  if (!rendered.ok()) {
    Check(!rendered.status().message().empty(), "render refusals carry a message");
    Check(rendered.status().code() == absl::StatusCode::kInvalidArgument,
          "render errors are InvalidArgument");
    return 0;
  }
  Check(rendered->size() <= limits.max_output_bytes, "output within max_output_bytes");
  return 0;
}
