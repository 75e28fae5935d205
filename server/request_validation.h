// Checks a Generate request field by field and turns it into the engine's GenerateRequest.
// Every refusal is INVALID_ARGUMENT (FAILED_PRECONDITION for text without a tokenizer) with a
// message that names the field (as in the proto), the value and what is allowed.
#pragma once

#include <cstdint>
#include <string>

#include "absl/status/statusor.h"
#include "engine/engine.h"
#include "engine/tokenizer/tokenizer.h"
#include "moe/serving/v1/inference.pb.h"

namespace moe::server {

struct RequestLimits {
  int32_t vocab_size = 0;
  int32_t context_length = 0;     // prompt + max_tokens at most
  int32_t max_prompt_tokens = 0;  // <= context_length - 1
};

inline constexpr int32_t kDefaultMaxTokens = 16;
inline constexpr int32_t kMaxRequestIdBytes = 128;
inline constexpr int32_t kMaxPriority = 1000;

// `tokenizer` may be null (token-id prompts only).
absl::StatusOr<GenerateRequest> BuildEngineRequest(const serving::v1::GenerateRequest& request,
                                                   const Tokenizer* tokenizer,
                                                   const RequestLimits& limits);

// Checks request_id (<= 128 printable ASCII bytes).
absl::Status ValidateRequestId(const std::string& request_id);

// Offset of the first byte that is not part of valid UTF-8, or -1.
int64_t FindInvalidUtf8(const std::string& text);

}  // namespace moe::server
