#include "engine/sampling/sampler.h"

#include <cmath>
#include <map>
#include <string>
#include <vector>

#include "engine/common/argmax.h"
#include "gtest/gtest.h"

namespace moe {
namespace {

// Logits whose softmax (at temperature 1) is exactly `probs`.
std::vector<float> LogitsFor(const std::vector<double>& probs) {
  std::vector<float> logits;
  for (double p : probs) logits.push_back(p > 0 ? static_cast<float>(std::log(p)) : -1e30f);
  return logits;
}

SamplingParams Greedy() {
  SamplingParams p;
  p.temperature = 0.0f;
  return p;
}

// Token counts of `draws` first tokens, one sampler per seed.
std::map<int32_t, int> Histogram(const SamplingParams& params, const std::vector<float>& logits,
                                 int draws) {
  SamplerWorkspace ws;
  std::map<int32_t, int> counts;
  for (int seed = 0; seed < draws; ++seed) {
    RequestSampler sampler(params, seed, {}, {});
    ++counts[sampler.Sample(logits, ws).token_id];
  }
  return counts;
}

TEST(SamplerTest, UniformIsInRangeAndDependsOnSeedAndIndex) {
  for (int i = 0; i < 1000; ++i) {
    const double u = SamplingUniform(42, i);
    EXPECT_GE(u, 0.0);
    EXPECT_LT(u, 1.0);
  }
  EXPECT_EQ(SamplingUniform(1, 5), SamplingUniform(1, 5));
  EXPECT_NE(SamplingUniform(1, 5), SamplingUniform(2, 5));
  EXPECT_NE(SamplingUniform(1, 5), SamplingUniform(1, 6));
}

TEST(SamplerTest, GreedyTakesArgmaxWithTiesToLowestId) {
  SamplerWorkspace ws;
  RequestSampler sampler(Greedy(), 0, {}, {});
  EXPECT_EQ(sampler.Sample(std::vector<float>{0.1f, 3.0f, -1.0f, 3.0f}, ws).token_id, 1);
  EXPECT_EQ(sampler.num_generated(), 1);
}

TEST(SamplerTest, SameSeedSameTokensDifferentSeedDifferentTokens) {
  SamplingParams params;
  params.temperature = 1.0f;
  std::vector<float> logits(50);
  for (int i = 0; i < 50; ++i) logits[i] = 0.05f * i;
  SamplerWorkspace ws;
  auto run = [&](uint64_t seed) {
    RequestSampler sampler(params, seed, {}, {});
    std::vector<int32_t> tokens;
    for (int i = 0; i < 32; ++i) tokens.push_back(sampler.Sample(logits, ws).token_id);
    return tokens;
  };
  EXPECT_EQ(run(123), run(123));
  EXPECT_NE(run(123), run(124));
}

TEST(SamplerTest, TemperatureOneFollowsTheDistribution) {
  SamplingParams params;
  const std::vector<double> probs = {0.5, 0.25, 0.125, 0.125};
  const int draws = 8000;
  std::map<int32_t, int> counts = Histogram(params, LogitsFor(probs), draws);
  for (int t = 0; t < 4; ++t) {
    // Binomial standard deviation at n = 8000 is at most ~45 draws; allow ~5 sigma.
    EXPECT_NEAR(counts[t], probs[t] * draws, 230) << "token " << t;
  }
}

TEST(SamplerTest, LowTemperatureSharpensHighFlattens) {
  const std::vector<float> logits = LogitsFor({0.6, 0.4});
  SamplingParams cold;
  cold.temperature = 0.05f;
  EXPECT_EQ(Histogram(cold, logits, 500)[1], 0);  // (0.4/0.6)^20 ~ 3e-4
  SamplingParams hot;
  hot.temperature = 100.0f;
  EXPECT_NEAR(Histogram(hot, logits, 4000)[1], 2000, 250);
}

TEST(SamplerTest, TopKKeepsOnlyTheKMostLikely) {
  SamplingParams params;
  params.top_k = 2;
  std::map<int32_t, int> counts = Histogram(params, LogitsFor({0.1, 0.4, 0.2, 0.3}), 2000);
  EXPECT_EQ(counts.count(0), 0u);
  EXPECT_EQ(counts.count(2), 0u);
  EXPECT_NEAR(counts[1], 2000 * 4 / 7, 200);
  params.top_k = 1;
  EXPECT_EQ(Histogram(params, LogitsFor({0.1, 0.4, 0.2, 0.3}), 200)[1], 200);
}

TEST(SamplerTest, TopPKeepsTheSmallestNucleus) {
  SamplingParams params;
  params.top_p = 0.75f;  // 0.5 + 0.3 reaches it: tokens 0 and 2 are out
  std::map<int32_t, int> counts = Histogram(params, LogitsFor({0.05, 0.3, 0.15, 0.5}), 2000);
  EXPECT_EQ(counts.count(0), 0u);
  EXPECT_EQ(counts.count(2), 0u);
  EXPECT_NEAR(counts[3], 2000 * 0.5 / 0.8, 200);
  params.top_p = 0.01f;  // only the most likely
  EXPECT_EQ(Histogram(params, LogitsFor({0.05, 0.3, 0.15, 0.5}), 200)[3], 200);
}

TEST(SamplerTest, TopPOverALargeVocabularyBeyondTheOrderedPrefix) {
  // Flat over 5000 tokens: the nucleus of 0.5 is 2500 tokens, far past the first few hundred
  // the sampler orders up front; ties order by id, so only ids < 2500 may come out.
  SamplingParams params;
  params.top_p = 0.5f;
  std::vector<float> flat(5000, 0.0f);
  std::map<int32_t, int> counts = Histogram(params, flat, 1000);
  EXPECT_LT(counts.rbegin()->first, 2500);
  EXPECT_GT(counts.rbegin()->first, 1500);  // and the whole nucleus is used
  // Peaked: the nucleus lies within the ordered prefix.
  std::vector<float> peaked(5000, 0.0f);
  peaked[4321] = 20.0f;
  peaked[17] = 19.0f;
  params.top_p = 0.9f;
  counts = Histogram(params, peaked, 500);
  EXPECT_EQ(counts.size(), 2u);
  EXPECT_GT(counts[4321], counts[17]);
}

TEST(SamplerTest, MinPDropsUnlikelyTokens) {
  SamplingParams params;
  params.min_p = 0.5f;  // threshold 0.25: only 0.5 and 0.3 survive
  std::map<int32_t, int> counts = Histogram(params, LogitsFor({0.5, 0.3, 0.15, 0.05}), 2000);
  EXPECT_EQ(counts.count(2), 0u);
  EXPECT_EQ(counts.count(3), 0u);
  EXPECT_GT(counts[1], 0);
}

TEST(SamplerTest, RepetitionPenaltyCoversPromptAndOutput) {
  SamplingParams params = Greedy();
  params.repetition_penalty = 4.0f;
  SamplerWorkspace ws;
  const std::vector<float> logits = {2.0f, 1.0f, 0.9f, -1.0f};
  {
    RequestSampler sampler(params, 0, /*prompt=*/{0}, {});
    EXPECT_EQ(sampler.Sample(logits, ws).token_id, 1);  // 2.0 / 4 < 1.0
    EXPECT_EQ(sampler.Sample(logits, ws).token_id, 2);  // 1 was generated: 0.25 < 0.9
  }
  RequestSampler unpenalised(Greedy(), 0, {0}, {});
  EXPECT_EQ(unpenalised.Sample(logits, ws).token_id, 0);
}

TEST(SamplerTest, PresenceAndFrequencyPenaliseGeneratedTokensOnly) {
  SamplerWorkspace ws;
  const std::vector<float> logits = {1.0f, 0.9f, 0.0f};
  SamplingParams presence = Greedy();
  presence.presence_penalty = 0.5f;
  RequestSampler p(presence, 0, /*prompt=*/{1}, {});  // the prompt is not penalised
  EXPECT_EQ(p.Sample(logits, ws).token_id, 0);
  EXPECT_EQ(p.Sample(logits, ws).token_id, 1);  // 1.0 - 0.5 < 0.9
  EXPECT_EQ(p.Sample(logits, ws).token_id, 0);  // both present now: 0.5 > 0.4

  SamplingParams frequency = Greedy();
  frequency.frequency_penalty = 0.06f;
  RequestSampler f(frequency, 0, {}, {});
  // Token 0 wins until it was generated twice: 1.0 - 2 * 0.06 < 0.9.
  EXPECT_EQ(f.Sample(logits, ws).token_id, 0);
  EXPECT_EQ(f.Sample(logits, ws).token_id, 0);
  EXPECT_EQ(f.Sample(logits, ws).token_id, 1);
}

TEST(SamplerTest, MinTokensMasksStopTokensUntilReached) {
  SamplingParams params = Greedy();
  params.min_tokens = 2;
  SamplerWorkspace ws;
  const std::vector<float> logits = {0.0f, 5.0f, 1.0f};  // token 1 is EOS, most likely
  RequestSampler sampler(params, 0, {}, /*min_tokens_suppressed=*/{1});
  EXPECT_EQ(sampler.Sample(logits, ws).token_id, 2);
  EXPECT_EQ(sampler.Sample(logits, ws).token_id, 2);
  EXPECT_EQ(sampler.Sample(logits, ws).token_id, 1);
}

// OnlyNeedsArgmax holds exactly when Sample would return the raw logits' argmax and read nothing
// else; AcceptArgmax then records the token as Sample would have.
TEST(SamplerTest, ArgmaxOnlyWhenGreedyWithNothingElseReadFromTheLogits) {
  EXPECT_TRUE(RequestSampler(Greedy(), 0, {}, {}).OnlyNeedsArgmax());
  SamplingParams sampled;
  sampled.temperature = 0.7f;
  EXPECT_FALSE(RequestSampler(sampled, 0, {}, {}).OnlyNeedsArgmax());
  for (auto change : std::vector<void (*)(SamplingParams&)>{
           [](SamplingParams& p) { p.repetition_penalty = 1.1f; },
           [](SamplingParams& p) { p.presence_penalty = 0.5f; },
           [](SamplingParams& p) { p.frequency_penalty = 0.5f; },
           [](SamplingParams& p) { p.logprobs = 1; }}) {
    SamplingParams params = Greedy();
    change(params);
    EXPECT_FALSE(RequestSampler(params, 0, {}, {}).OnlyNeedsArgmax());
  }

  // min_tokens masks EOS until reached: the argmax of the raw logits is not the answer before.
  SamplingParams params = Greedy();
  params.min_tokens = 1;
  const std::vector<float> logits = {0.0f, 5.0f, 1.0f};  // token 1 is EOS
  RequestSampler masked(params, 0, {}, /*min_tokens_suppressed=*/{1});
  RequestSampler accepted(params, 0, {}, /*min_tokens_suppressed=*/{1});
  SamplerWorkspace ws;
  EXPECT_FALSE(accepted.OnlyNeedsArgmax());
  EXPECT_EQ(masked.Sample(logits, ws).token_id, 2);
  EXPECT_EQ(accepted.Sample(logits, ws).token_id, 2);
  EXPECT_TRUE(accepted.OnlyNeedsArgmax());
  EXPECT_EQ(accepted.AcceptArgmax(ArgMax(logits)).token_id, masked.Sample(logits, ws).token_id);
  EXPECT_EQ(accepted.num_generated(), masked.num_generated());
  // Without stop ids to mask, min_tokens changes nothing.
  EXPECT_TRUE(RequestSampler(params, 0, {}, {}).OnlyNeedsArgmax());
}

TEST(SamplerTest, LogitBiasShiftsTheChoiceButNotTheLogprobs) {
  SamplerWorkspace ws;
  const std::vector<float> logits = {0.0f, 3.0f, 2.5f, -1.0f};
  SamplingParams banned = Greedy();
  banned.logit_bias = {{1, -100.0f}};
  banned.logprobs = 1;
  RequestSampler a(banned, 0, {}, {});
  EXPECT_FALSE(a.OnlyNeedsArgmax());
  const SampledToken first = a.Sample(logits, ws);
  EXPECT_EQ(first.token_id, 2);
  // The log-probability is the model's: token 2's under the unbiased logits.
  double total = 0;
  for (float l : logits) total += std::exp(l);
  EXPECT_NEAR(first.logprob, 2.5 - std::log(total), 1e-5);
  ASSERT_EQ(first.top_logprobs.size(), 1u);
  EXPECT_EQ(first.top_logprobs[0].token_id, 1);

  SamplingParams forced;  // sampled at temperature 1: +100 leaves nothing else a chance
  forced.logit_bias = {{3, 100.0f}};
  for (int seed = 0; seed < 20; ++seed) {
    RequestSampler b(forced, seed, {}, {});
    EXPECT_EQ(b.Sample(logits, ws).token_id, 3) << "seed " << seed;
  }

  SamplingParams bad = Greedy();
  bad.logit_bias = {{4, 1.0f}};
  EXPECT_NE(bad.Validate(4).message().find("logit_bias: token 4"), std::string::npos);
  bad.logit_bias = {{0, 150.0f}};
  EXPECT_NE(bad.Validate(4).message().find("[-100, 100]"), std::string::npos);
}

TEST(SamplerTest, LogprobsAreTheModelsLogSoftmax) {
  SamplingParams params = Greedy();
  params.logprobs = 2;
  params.repetition_penalty = 3.0f;  // changes the choice, not the reported distribution
  SamplerWorkspace ws;
  const std::vector<double> probs = {0.1, 0.6, 0.3};
  RequestSampler sampler(params, 0, {1}, {});
  SampledToken t = sampler.Sample(LogitsFor(probs), ws);
  EXPECT_EQ(t.token_id, 2);  // penalised: log(0.6) * 3 < log(0.3)
  EXPECT_NEAR(t.logprob, std::log(0.3), 1e-5);
  ASSERT_EQ(t.top_logprobs.size(), 2u);
  EXPECT_EQ(t.top_logprobs[0].token_id, 1);
  EXPECT_NEAR(t.top_logprobs[0].logprob, std::log(0.6), 1e-5);
  EXPECT_EQ(t.top_logprobs[1].token_id, 2);
  EXPECT_NEAR(t.top_logprobs[1].logprob, std::log(0.3), 1e-5);

  SamplingParams none = Greedy();
  RequestSampler plain(none, 0, {}, {});
  EXPECT_TRUE(plain.Sample(LogitsFor(probs), ws).top_logprobs.empty());
}

TEST(SamplingParamsTest, ValidateNamesTheBadField) {
  auto error_of = [](auto mutate) {
    SamplingParams p;
    mutate(p);
    return std::string(p.Validate(/*vocab_size=*/100).message());
  };
  EXPECT_TRUE(SamplingParams().Validate(100).ok());
  EXPECT_NE(error_of([](SamplingParams& p) { p.temperature = -1; }).find("temperature"),
            std::string::npos);
  EXPECT_NE(error_of([](SamplingParams& p) { p.top_k = -2; }).find("top_k"), std::string::npos);
  EXPECT_NE(error_of([](SamplingParams& p) { p.top_p = 0; }).find("top_p"), std::string::npos);
  EXPECT_NE(error_of([](SamplingParams& p) { p.min_p = 1.5f; }).find("min_p"), std::string::npos);
  EXPECT_NE(
      error_of([](SamplingParams& p) { p.repetition_penalty = 0; }).find("repetition_penalty"),
      std::string::npos);
  EXPECT_NE(error_of([](SamplingParams& p) { p.presence_penalty = 3; }).find("presence_penalty"),
            std::string::npos);
  EXPECT_NE(error_of([](SamplingParams& p) { p.frequency_penalty = -3; }).find("frequency_penalty"),
            std::string::npos);
  EXPECT_NE(error_of([](SamplingParams& p) { p.max_tokens = 0; }).find("max_tokens"),
            std::string::npos);
  EXPECT_NE(error_of([](SamplingParams& p) { p.min_tokens = 20; }).find("min_tokens"),
            std::string::npos);
  EXPECT_NE(error_of([](SamplingParams& p) { p.stop_token_ids = {100}; }).find("stop_token_ids"),
            std::string::npos);
  EXPECT_NE(error_of([](SamplingParams& p) { p.stop_strings = {""}; }).find("stop strings"),
            std::string::npos);
  EXPECT_NE(error_of([](SamplingParams& p) { p.logprobs = 21; }).find("logprobs"),
            std::string::npos);
}

}  // namespace
}  // namespace moe
