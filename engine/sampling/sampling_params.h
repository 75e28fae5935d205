// Per-request sampling and stop parameters.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"

namespace moe {

struct SamplingParams {
  // 0 means greedy (argmax, ties to the lowest token id); otherwise logits are divided by it.
  float temperature = 1.0f;
  int32_t top_k = 0;   // keep the k most likely tokens; 0 = all
  float top_p = 1.0f;  // keep the smallest most-likely set whose probability >= top_p
  float min_p = 0.0f;  // drop tokens with probability < min_p * max probability
  // Repetition penalty (HF/CTRL style) over prompt and generated tokens: a logit l of such a
  // token becomes l / penalty if l > 0, else l * penalty. 1 = off.
  float repetition_penalty = 1.0f;
  // OpenAI-style penalties over generated tokens only: l -= presence * [count > 0] +
  // frequency * count. 0 = off.
  float presence_penalty = 0.0f;
  float frequency_penalty = 0.0f;
  // Same seed, same prompt, same model: same tokens, whatever else shares the batch. Unset:
  // the engine picks one at Submit.
  std::optional<uint64_t> seed;

  int32_t max_tokens = 16;              // generated tokens at most (the length stop)
  int32_t min_tokens = 0;               // stop tokens / EOS are masked out before this many tokens
  bool ignore_eos = false;              // keep generating past EOS (it is still emitted as a token)
  std::vector<int32_t> stop_token_ids;  // besides EOS; the stop token is part of the output
  // Stop strings, matched on the detokenized text across token boundaries; the text from the
  // match on is excluded from the output.
  std::vector<std::string> stop_strings;

  // Log-probabilities: 0 = none; n > 0 = the chosen token's and the n most likely tokens'.
  int32_t logprobs = 0;

  // OpenAI-style logit bias: (token id, bias in [-100, 100]) added to that token's logit after
  // the penalties, before temperature (-100 all but bans a token, +100 all but forces it).
  // Log-probabilities stay those of the model's own distribution.
  std::vector<std::pair<int32_t, float>> logit_bias;

  bool is_greedy() const { return temperature <= 0.0f; }

  // Checks ranges against the model's vocabulary; messages name the field and the bound.
  absl::Status Validate(int32_t vocab_size) const;
};

// Bounds checked by Validate().
inline constexpr int32_t kMaxLogprobs = 20;
inline constexpr int32_t kMaxStopStrings = 16;
inline constexpr int32_t kMaxStopStringBytes = 256;
inline constexpr int32_t kMaxLogitBias = 1024;  // entries
inline constexpr float kMaxLogitBiasValue = 100.0f;

}  // namespace moe
