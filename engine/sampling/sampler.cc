#include "engine/sampling/sampler.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "engine/common/argmax.h"

namespace moe {
namespace {

uint64_t Mix64(uint64_t x) {  // splitmix64
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
// Tokens ordered up front for a nucleus (top-p) cut without top-k.
constexpr int32_t kNucleusPrefix = 256;

// Orders token ids by value, largest first, ties to the lowest id: a total order, so sorting
// is reproducible.
struct ByValueDescending {
  const float* values;
  bool operator()(int32_t a, int32_t b) const {
    return values[a] > values[b] || (values[a] == values[b] && a < b);
  }
};

}  // namespace

double SamplingUniform(uint64_t seed, int64_t token_index) {
  const uint64_t bits = Mix64(Mix64(seed) ^ Mix64(static_cast<uint64_t>(token_index) + 1));
  return static_cast<double>(bits >> 11) * 0x1.0p-53;
}

void ComputeLogprobs(absl::Span<const float> values, int32_t token, int32_t n,
                     SamplerWorkspace& workspace, SampledToken& out) {
  const int32_t vocab = static_cast<int32_t>(values.size());
  float max_value = kNegInf;
  for (float v : values) max_value = std::max(max_value, v);
  double sum = 0.0;
  for (float v : values) sum += std::exp(static_cast<double>(v) - max_value);
  const double log_normaliser = max_value + std::log(sum);
  out.logprob = static_cast<float>(values[token] - log_normaliser);
  out.top_logprobs.clear();
  if (n <= 0) return;
  n = std::min(n, vocab);
  std::vector<int32_t>& ids = workspace.indices;
  ids.resize(vocab);
  for (int32_t i = 0; i < vocab; ++i) ids[i] = i;
  std::partial_sort(ids.begin(), ids.begin() + n, ids.end(), ByValueDescending{values.data()});
  out.top_logprobs.reserve(n);
  for (int32_t i = 0; i < n; ++i) {
    out.top_logprobs.push_back({ids[i], static_cast<float>(values[ids[i]] - log_normaliser)});
  }
}

RequestSampler::RequestSampler(const SamplingParams& params, uint64_t seed,
                               absl::Span<const int32_t> prompt,
                               std::vector<int32_t> min_tokens_suppressed)
    : params_(params), seed_(seed), min_tokens_suppressed_(std::move(min_tokens_suppressed)) {
  if (params_.repetition_penalty != 1.0f) prompt_tokens_.insert(prompt.begin(), prompt.end());
}

void RequestSampler::ApplyPenalties(std::vector<float>& logits) const {
  const int32_t vocab = static_cast<int32_t>(logits.size());
  if (params_.repetition_penalty != 1.0f) {
    auto penalise = [&](int32_t id) {
      if (id < 0 || id >= vocab) return;
      float& l = logits[id];
      l = l > 0.0f ? l / params_.repetition_penalty : l * params_.repetition_penalty;
    };
    for (int32_t id : prompt_tokens_) penalise(id);
    for (const auto& [id, count] : output_counts_) {
      if (!prompt_tokens_.contains(id)) penalise(id);
    }
  }
  if (params_.presence_penalty != 0.0f || params_.frequency_penalty != 0.0f) {
    for (const auto& [id, count] : output_counts_) {
      if (id < 0 || id >= vocab) continue;
      logits[id] -= params_.presence_penalty + params_.frequency_penalty * count;
    }
  }
}

int32_t RequestSampler::Draw(const std::vector<float>& logits, SamplerWorkspace& workspace) const {
  const int32_t vocab = static_cast<int32_t>(logits.size());
  float max_logit = kNegInf;
  for (float l : logits) max_logit = std::max(max_logit, l);
  if (max_logit == kNegInf) return ArgMax(logits);  // everything masked

  std::vector<int32_t>& candidates = workspace.indices;
  candidates.resize(vocab);
  for (int32_t i = 0; i < vocab; ++i) candidates[i] = i;
  const ByValueDescending order{logits.data()};
  // candidates[0, sorted) are in final order and each is >= every later candidate.
  int32_t num_candidates = vocab;
  int32_t sorted = 0;
  if (params_.top_k > 0 && params_.top_k < vocab) {
    num_candidates = params_.top_k;
    sorted = num_candidates;
  } else if (params_.top_p < 1.0f) {
    // The nucleus is usually among the few hundred most likely tokens: order those first and
    // the rest only if their mass falls short (a full sort of a large vocabulary is slow).
    sorted = std::min(vocab, kNucleusPrefix);
  }
  if (sorted > 0) {
    std::partial_sort(candidates.begin(), candidates.begin() + sorted, candidates.end(), order);
  }

  // Unnormalised softmax of logits / temperature over the candidates, in double.
  const double inv_temperature = 1.0 / params_.temperature;
  std::vector<double>& probs = workspace.probs;
  probs.resize(num_candidates);
  auto prob_of = [&](int32_t id) {
    return std::exp((static_cast<double>(logits[id]) - max_logit) * inv_temperature);
  };
  double total = 0.0;
  for (int32_t i = 0; i < num_candidates; ++i) {
    probs[i] = prob_of(candidates[i]);
    total += probs[i];
  }
  const double max_prob = 1.0;  // the most likely token: exp(0)

  if (params_.top_p < 1.0f) {  // keep the shortest most-likely prefix reaching top_p
    const double target = params_.top_p * total;
    double cumulative = 0.0;
    int32_t keep = num_candidates;
    for (int32_t i = 0; i < num_candidates; ++i) {
      if (i == sorted) {  // ran past the ordered prefix: order the rest too
        std::sort(candidates.begin() + sorted, candidates.begin() + num_candidates, order);
        for (int32_t j = sorted; j < num_candidates; ++j) probs[j] = prob_of(candidates[j]);
        sorted = num_candidates;
      }
      cumulative += probs[i];
      if (cumulative >= target) {
        keep = i + 1;
        break;
      }
    }
    num_candidates = keep;
    total = cumulative;
  }
  if (params_.min_p > 0.0f) {
    const double threshold = params_.min_p * max_prob;
    total = 0.0;
    for (int32_t i = 0; i < num_candidates; ++i) {
      if (probs[i] < threshold) probs[i] = 0.0;
      total += probs[i];
    }
  }
  const double u = SamplingUniform(seed_, num_generated_) * total;
  double cumulative = 0.0;
  int32_t last_positive = candidates[0];
  for (int32_t i = 0; i < num_candidates; ++i) {
    if (probs[i] <= 0.0) continue;
    cumulative += probs[i];
    last_positive = candidates[i];
    if (u < cumulative) return candidates[i];
  }
  return last_positive;  // rounding left u just past the end
}

SampledToken RequestSampler::Sample(absl::Span<const float> logits, SamplerWorkspace& workspace) {
  std::vector<float>& work = workspace.logits;
  work.assign(logits.begin(), logits.end());
  const int32_t vocab = static_cast<int32_t>(work.size());
  if (num_generated_ < params_.min_tokens) {
    for (int32_t id : min_tokens_suppressed_) {
      if (id >= 0 && id < vocab) work[id] = kNegInf;
    }
  }
  ApplyPenalties(work);
  for (const auto& [id, bias] : params_.logit_bias) {
    if (id >= 0 && id < vocab) work[id] += bias;
  }

  SampledToken result;
  result.token_id = params_.is_greedy() ? ArgMax(work) : Draw(work, workspace);
  if (params_.logprobs > 0) {
    ComputeLogprobs(logits, result.token_id, params_.logprobs, workspace, result);
  }
  Record(result.token_id);
  return result;
}

bool RequestSampler::OnlyNeedsArgmax() const {
  return params_.is_greedy() && params_.repetition_penalty == 1.0f &&
         params_.presence_penalty == 0.0f && params_.frequency_penalty == 0.0f &&
         params_.logprobs == 0 && params_.logit_bias.empty() &&
         (num_generated_ >= params_.min_tokens || min_tokens_suppressed_.empty());
}

SampledToken RequestSampler::AcceptArgmax(int32_t token) {
  Record(token);
  SampledToken result;
  result.token_id = token;
  return result;
}

void RequestSampler::Record(int32_t token) {
  ++output_counts_[token];
  ++num_generated_;
}

}  // namespace moe
