// libFuzzer target: the bytes of a Generate call through the server's own parsing and
// validation (moe::server::ParseGenerateRequest: protobuf parse, the UTF-8 diagnosis of a
// failed parse, BuildEngineRequest with the demo tokenizer, Qwen3's chat template for chat
// prompts, and limits like the server's).
// Checks: no crash; every refusal is INVALID_ARGUMENT or FAILED_PRECONDITION with a message;
// an accepted request has a prompt of 1..max_prompt_tokens ids inside the vocabulary, room for
// its max_tokens in the context, sampling parameters the engine's own Validate accepts, and n
// within [0, kMaxCompletions].
#include <cstddef>
#include <cstdint>
#include <fstream>
#include <iterator>
#include <memory>
#include <string>

#include "engine/sampling/sampling_params.h"
#include "engine/tokenizer/tokenizer.h"
#include "fuzz/fuzz_util.h"
#include "nlohmann/json.hpp"
#include "server/request_validation.h"

namespace {

std::string ReadSourceFile(const std::string& path) {
  std::ifstream in(std::string(MOE_SOURCE_DIR) + "/" + path, std::ios::binary);
  return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

// The fixture tokenizer with Qwen3-MoE's chat template (the most involved of the published
// templates: namespaces, reversed slices, string methods, tools) for chat prompts.
const moe::Tokenizer& DemoTokenizer() {
  static const moe::Tokenizer* tokenizer = [] {
    nlohmann::json config =
        nlohmann::json::parse(ReadSourceFile("tests/fixtures/tokenizers/gpt2_bytelevel/"
                                             "tokenizer_config.json"));
    config["chat_template"] = ReadSourceFile("tests/fixtures/chat_templates/qwen3_moe.jinja");
    auto loaded = moe::Tokenizer::FromJson(
        ReadSourceFile("tests/fixtures/tokenizers/gpt2_bytelevel/tokenizer.json"), config.dump());
    moe::fuzz::Check(loaded.ok(), "fixture tokenizer loads");
    moe::fuzz::Check((*loaded)->chat_template_status().ok(), "the chat template parses");
    return loaded->release();
  }();
  return *tokenizer;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using moe::fuzz::Check;
  const moe::Tokenizer& tokenizer = DemoTokenizer();
  moe::server::RequestLimits limits;
  limits.vocab_size = tokenizer.vocab_size() + 8;  // a model vocabulary may be larger
  limits.context_length = 64;
  limits.max_prompt_tokens = 48;
  limits.max_prompt_text_bytes = limits.max_prompt_tokens * moe::server::kMaxPromptBytesPerToken;
  const std::string bytes(reinterpret_cast<const char*>(data), size);
  // Every other input without a tokenizer (token-id prompts only).
  const bool with_tokenizer = size == 0 || data[size - 1] % 2 == 0;
  moe::serving::v1::GenerateRequest parsed;
  absl::StatusOr<moe::GenerateRequest> request = moe::server::ParseGenerateRequest(
      bytes, with_tokenizer ? &tokenizer : nullptr, limits, &parsed);
  if (!request.ok()) {
    const absl::StatusCode code = request.status().code();
    Check(
        code == absl::StatusCode::kInvalidArgument || code == absl::StatusCode::kFailedPrecondition,
        "refusals are INVALID_ARGUMENT or FAILED_PRECONDITION");
    Check(!request.status().message().empty(), "refusals carry a message");
    return 0;
  }
  const int32_t prompt = static_cast<int32_t>(request->prompt_token_ids.size());
  Check(prompt >= 1 && prompt <= limits.max_prompt_tokens, "1 <= prompt <= max_prompt_tokens");
  for (int32_t id : request->prompt_token_ids) {
    Check(id >= 0 && id < limits.vocab_size, "prompt ids inside the vocabulary");
  }
  const moe::SamplingParams& sampling = request->sampling;
  Check(sampling.max_tokens >= 1 && prompt + sampling.max_tokens <= limits.context_length,
        "prompt + max_tokens fits the context");
  Check(sampling.Validate(limits.vocab_size).ok(), "the engine accepts the sampling parameters");
  Check(parsed.n() >= 0 && parsed.n() <= moe::server::kMaxCompletions, "0 <= n <= 16");
  return 0;
}
