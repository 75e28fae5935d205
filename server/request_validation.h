// Checks a Generate request field by field and turns it into the engine's GenerateRequest.
// Every refusal is INVALID_ARGUMENT (FAILED_PRECONDITION for text without a tokenizer) with a
// message that names the field (as in the proto), the value and what is allowed.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "engine/engine.h"
#include "engine/tokenizer/tokenizer.h"
#include "moe/serving/v1/inference.pb.h"

namespace moe::server {

struct RequestLimits {
  int32_t vocab_size = 0;
  int32_t context_length = 0;     // prompt + max_tokens at most
  int32_t max_prompt_tokens = 0;  // <= context_length - 1
  // Bytes of a text prompt at most, checked before it is encoded (0 = no limit; the server
  // sets max_prompt_tokens x kMaxPromptBytesPerToken).
  int64_t max_prompt_text_bytes = 0;
};

inline constexpr int32_t kDefaultMaxTokens = 16;
inline constexpr int32_t kMaxRequestIdBytes = 128;
inline constexpr int32_t kMaxPriority = 1000;
inline constexpr int32_t kMaxStopTokenIds = 1024;
// GenerateRequest.n at most: each completion is an engine request of its own, so this bounds
// the queue slots and KV blocks one call can take.
inline constexpr int32_t kMaxCompletions = 16;
// Text longer than max_prompt_tokens x this many bytes cannot fit the prompt budget with any
// real vocabulary; refusing it before encoding bounds the CPU a request can cost.
inline constexpr int64_t kMaxPromptBytesPerToken = 64;
// Chat prompts: messages, role length, template variables (count, JSON bytes, nesting).
inline constexpr int32_t kMaxChatMessages = 4096;
inline constexpr size_t kMaxChatRoleBytes = 64;
inline constexpr int32_t kMaxChatTemplateVariables = 32;
inline constexpr size_t kMaxChatTemplateVariableBytes = 64 << 10;
inline constexpr int kMaxJsonNesting = 32;

// A chat prompt as the model sees it.
struct EncodedChat {
  std::string text;  // what the chat template rendered
  std::vector<int32_t> token_ids;
};

// Renders `chat` with the model's chat template and encodes it as transformers'
// apply_chat_template(tokenize=True) does. FAILED_PRECONDITION without a tokenizer or a usable
// template; INVALID_ARGUMENT for bad messages or variables, the template's own refusals
// (raise_exception) and prompts the tokenizer cannot encode, each message starting "chat".
absl::StatusOr<EncodedChat> EncodeChatPrompt(const serving::v1::ChatPrompt& chat,
                                             const Tokenizer* tokenizer,
                                             const RequestLimits& limits);

// INVALID_ARGUMENT (naming `field`) when the tokenizer's `ids` are empty or outside the vocab.
absl::Status CheckTokenizerIds(const std::vector<int32_t>& ids, int32_t vocab,
                               absl::string_view field);

// A string field of a request, by field numbers from the top (e.g. {6, 5} = stop.stop_strings).
struct StringField {
  std::vector<int> path;
  const char* name;
  bool repeated;
};

// The string fields of GenerateRequest / TokenizeRequest whose UTF-8 the parser checks.
extern const std::vector<StringField> kGenerateRequestStringFields;
extern const std::vector<StringField> kTokenizeRequestStringFields;

// Why `bytes` did not parse as `message_name`: INVALID_ARGUMENT naming the first of
// `string_fields` that holds invalid UTF-8, else a generic INVALID_ARGUMENT.
absl::Status ExplainParseFailure(const std::string& bytes,
                                 absl::Span<const StringField> string_fields,
                                 const std::string& message_name);

// The whole server-side path of a Generate call's bytes: parse (as the service does), then
// BuildEngineRequest. `parsed` (optional) receives the parsed message. Used by the fuzzer.
absl::StatusOr<GenerateRequest> ParseGenerateRequest(
    const std::string& bytes, const Tokenizer* tokenizer, const RequestLimits& limits,
    serving::v1::GenerateRequest* parsed = nullptr);

// `tokenizer` may be null (token-id prompts only). Checks `n` too, but returns one engine
// request: the caller makes the n copies (and their seeds).
absl::StatusOr<GenerateRequest> BuildEngineRequest(const serving::v1::GenerateRequest& request,
                                                   const Tokenizer* tokenizer,
                                                   const RequestLimits& limits);

// Checks request_id (<= 128 printable ASCII bytes).
absl::Status ValidateRequestId(const std::string& request_id);

// Offset of the first byte that is not part of valid UTF-8, or -1.
int64_t FindInvalidUtf8(const std::string& text);

}  // namespace moe::server
