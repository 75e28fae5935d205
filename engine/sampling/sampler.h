// Per-request token sampling from one row of logits.
//
// Determinism: the only randomness is one uniform number per generated token, drawn
// counter-style from (seed, index of the token being generated). A request's tokens therefore
// depend only on its logits, its parameters and its seed -- never on the other sequences of
// the batch, nor on whether it was preempted and recomputed.
//
// Order of operations on a logits row [vocab]:
//   1. min_tokens: EOS and stop token ids get -inf while fewer than min_tokens are generated;
//   2. repetition penalty (prompt + generated tokens), presence / frequency (generated only),
//      then logit_bias;
//   3. greedy: argmax (ties to the lowest id); otherwise divide by temperature, keep top-k,
//      then top-p (nucleus, over the top-k set), then min-p, renormalise and draw.
// Log-probabilities describe the model's own distribution: log_softmax of the raw logits,
// before penalties, masking and temperature.
#pragma once

#include <cstdint>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/types/span.h"
#include "engine/sampling/sampling_params.h"

namespace moe {

struct TokenLogprob {
  int32_t token_id = 0;
  float logprob = 0.0f;
};

struct SampledToken {
  int32_t token_id = 0;
  float logprob = 0.0f;                    // set when params.logprobs > 0
  std::vector<TokenLogprob> top_logprobs;  // [params.logprobs], most likely first
};

// Scratch memory reused across rows and requests (owned by the engine thread).
struct SamplerWorkspace {
  std::vector<float> logits;     // [vocab]
  std::vector<int32_t> indices;  // [vocab]
  std::vector<double> probs;     // [candidates]
};

// The uniform number in [0, 1) used to draw token number `token_index` (0-based) of a request.
double SamplingUniform(uint64_t seed, int64_t token_index);

class RequestSampler {
 public:
  // `prompt` feeds the repetition penalty; `min_tokens_suppressed` are the ids masked while
  // fewer than params.min_tokens tokens are generated (EOS and the stop token ids).
  RequestSampler(const SamplingParams& params, uint64_t seed, absl::Span<const int32_t> prompt,
                 std::vector<int32_t> min_tokens_suppressed);

  // Samples the next token from `logits` [vocab] and records it as generated.
  SampledToken Sample(absl::Span<const float> logits, SamplerWorkspace& workspace);

  // Whether the next Sample would return the argmax of the raw logits and read nothing else
  // of them: greedy, no penalty or logit bias, no log-probabilities, nothing masked for
  // min_tokens.
  bool OnlyNeedsArgmax() const;
  // Records `token`, the argmax of the raw logits computed elsewhere, as the sampled token
  // (what Sample would have returned when OnlyNeedsArgmax()).
  SampledToken AcceptArgmax(int32_t token);

  int32_t num_generated() const { return num_generated_; }
  uint64_t seed() const { return seed_; }

 private:
  void ApplyPenalties(std::vector<float>& logits) const;
  void Record(int32_t token);
  int32_t Draw(const std::vector<float>& logits, SamplerWorkspace& workspace) const;

  const SamplingParams params_;
  const uint64_t seed_;
  const std::vector<int32_t> min_tokens_suppressed_;
  absl::flat_hash_set<int32_t> prompt_tokens_;           // for the repetition penalty
  absl::flat_hash_map<int32_t, int32_t> output_counts_;  // generated token -> count
  int32_t num_generated_ = 0;
};

// log_softmax(values)[token] and the `n` largest entries (ties to the lowest id).
void ComputeLogprobs(absl::Span<const float> values, int32_t token, int32_t n,
                     SamplerWorkspace& workspace, SampledToken& out);

}  // namespace moe
