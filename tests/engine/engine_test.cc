// End-to-end engine tests on real tiny checkpoints (tests/fixtures/models): batch invariance,
// preemption, prefix caching, cancellation, deadlines, stop conditions, refusals, and a
// randomized soak that checks the KV invariants after every step.
#include "engine/engine.h"

#include <algorithm>
#include <atomic>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "absl/synchronization/notification.h"
#include "gtest/gtest.h"
#include "tests/engine/engine_test_util.h"
#include "tests/testing/reference_data.h"

namespace moe {
namespace {

using ::moe::testing::Collector;
using ::moe::testing::OptionsFor;

int32_t VocabOf(const std::string& model) {
  absl::StatusOr<ModelConfig> config = LoadModelConfig(testing::ModelDir(model));
  return config.ok() ? config->vocab_size : 0;
}

std::vector<int32_t> RandomPrompt(std::mt19937_64& rng, int32_t length, int32_t vocab) {
  std::vector<int32_t> prompt;
  for (int32_t i = 0; i < length; ++i)
    prompt.push_back(3 + static_cast<int32_t>(rng() % (vocab - 3)));
  return prompt;
}

// Sixteen requests of mixed prompt and output lengths.
std::vector<GenerateRequest> MixedRequests(int32_t vocab, bool sampled, uint64_t seed) {
  std::mt19937_64 rng(seed);
  const int32_t lengths[] = {3, 7, 16, 17, 33, 50, 64, 90};
  std::vector<GenerateRequest> requests;
  for (int i = 0; i < 16; ++i) {
    GenerateRequest r;
    r.prompt_token_ids = RandomPrompt(rng, lengths[i % 8] + static_cast<int32_t>(rng() % 5), vocab);
    r.sampling.max_tokens = 6 + static_cast<int32_t>(rng() % 20);
    r.sampling.ignore_eos = i % 2 == 0;
    if (sampled) {
      r.sampling.temperature = 0.9f;
      r.sampling.top_p = 0.95f;
      r.sampling.top_k = i % 3 == 0 ? 20 : 0;
      r.sampling.seed = 1000 + i;
    } else {
      r.sampling.temperature = 0.0f;
    }
    requests.push_back(std::move(r));
  }
  return requests;
}

std::unique_ptr<Engine> MakeEngine(EngineOptions options) {
  absl::StatusOr<std::unique_ptr<Engine>> engine = Engine::Create(std::move(options));
  EXPECT_TRUE(engine.ok()) << engine.status();
  return engine.ok() ? std::move(engine).value() : nullptr;
}

void ExpectAllBlocksFree(const Engine& engine) {
  const EngineStats stats = engine.Stats();
  EXPECT_EQ(stats.kv_used_blocks, 0);
  EXPECT_EQ(stats.kv_free_blocks, stats.kv_total_blocks);
  EXPECT_EQ(stats.num_running, 0);
  EXPECT_EQ(stats.num_waiting, 0);
}

// Each request on its own, one after the other.
std::vector<std::vector<int32_t>> RunAlone(EngineOptions options,
                                           const std::vector<GenerateRequest>& requests) {
  options.scheduler.enable_prefix_caching = false;
  Collector collector;  // outlives the engine, which may call sinks until it is destroyed
  std::unique_ptr<Engine> engine = MakeEngine(std::move(options));
  if (!engine) return {};
  std::vector<std::vector<int32_t>> outputs;
  for (size_t i = 0; i < requests.size(); ++i) {
    EXPECT_TRUE(engine->Submit(requests[i], collector.Sink(i)).ok());
    engine->WaitUntilIdle();
    Collector::Result r = collector.Get(i);
    EXPECT_EQ(r.num_final_events, 1);
    outputs.push_back(r.tokens);
  }
  ExpectAllBlocksFree(*engine);
  return outputs;
}

struct ConcurrentRun {
  std::vector<std::vector<int32_t>> outputs;
  std::vector<Collector::Result> results;
  EngineStats stats;
  int max_running = 0;
  bool mixed_prefill_and_decode = false;
};

// All requests through one engine; request i arrives when the engine reaches step
// arrival_steps[i] (or as soon as the engine runs dry before that).
ConcurrentRun RunConcurrently(EngineOptions options, const std::vector<GenerateRequest>& requests,
                              const std::vector<int>& arrival_steps) {
  ConcurrentRun run;
  Collector collector;
  std::atomic<Engine*> engine_ptr{nullptr};
  absl::Mutex mu;
  std::vector<bool> submitted(requests.size(), false);
  auto submit = [&](size_t i) {
    // Called with `mu` held.
    if (submitted[i]) return;
    submitted[i] = true;
    absl::StatusOr<int64_t> id = engine_ptr.load()->Submit(requests[i], collector.Sink(i));
    EXPECT_TRUE(id.ok()) << id.status();
  };
  std::atomic<int> max_running{0};
  std::atomic<bool> mixed{false};
  options.step_observer = [&](const EngineStepInfo& info) {
    EXPECT_TRUE(info.invariants.ok()) << info.invariants;
    EXPECT_EQ(info.kv_free_blocks + info.kv_used_blocks, info.kv_total_blocks);
    max_running = std::max(max_running.load(), info.num_running);
    absl::MutexLock lock(&mu);
    for (size_t i = 0; i < requests.size(); ++i) {
      if (arrival_steps[i] == info.step) submit(i);
    }
  };
  std::unique_ptr<Engine> engine = MakeEngine(std::move(options));
  if (!engine) return run;
  engine_ptr = engine.get();
  {
    absl::MutexLock lock(&mu);
    for (size_t i = 0; i < requests.size(); ++i) {
      if (arrival_steps[i] == 0) submit(i);
    }
  }
  while (true) {
    engine->WaitUntilIdle();
    absl::MutexLock lock(&mu);
    // The engine ran dry before the next arrival step: the earliest pending one arrives now.
    size_t first = requests.size();
    for (size_t i = 0; i < requests.size(); ++i) {
      if (!submitted[i] && (first == requests.size() || arrival_steps[i] < arrival_steps[first])) {
        first = i;
      }
    }
    if (first == requests.size()) break;
    submit(first);
  }
  engine->WaitUntilIdle();
  for (size_t i = 0; i < requests.size(); ++i) {
    Collector::Result r = collector.Get(i);
    EXPECT_EQ(r.num_final_events, 1) << i;
    EXPECT_FALSE(r.events_after_final) << i;
    run.outputs.push_back(r.tokens);
    run.results.push_back(std::move(r));
  }
  run.stats = engine->Stats();
  run.max_running = max_running;
  ExpectAllBlocksFree(*engine);
  return run;
}

std::vector<int> RandomArrivals(size_t n, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<int> steps;
  for (size_t i = 0; i < n; ++i) steps.push_back(i < 4 ? 0 : static_cast<int>(rng() % 40));
  return steps;
}

class EngineModelTest : public ::testing::TestWithParam<std::string> {};

TEST_P(EngineModelTest, GreedyOutputsOfConcurrentRequestsEqualEachRunAlone) {
  const std::string model = GetParam();
  const std::vector<GenerateRequest> requests = MixedRequests(VocabOf(model), false, 1);
  EngineOptions options = OptionsFor(model, /*num_blocks=*/256);
  options.scheduler.max_num_seqs = 8;
  options.scheduler.max_num_batched_tokens = 48;  // forces chunked prefill next to decodes
  options.scheduler.enable_prefix_caching = false;
  const std::vector<std::vector<int32_t>> alone = RunAlone(options, requests);
  ConcurrentRun together = RunConcurrently(options, requests, RandomArrivals(16, 2));
  ASSERT_EQ(alone.size(), requests.size());
  ASSERT_EQ(together.outputs.size(), requests.size());
  for (size_t i = 0; i < requests.size(); ++i) {
    EXPECT_EQ(together.outputs[i], alone[i]) << "request " << i;
    EXPECT_FALSE(alone[i].empty());
  }
  EXPECT_GT(together.max_running, 1);
  EXPECT_EQ(together.stats.preemptions, 0);
}

TEST_P(EngineModelTest, SeededSamplingOfConcurrentRequestsEqualsEachRunAlone) {
  const std::string model = GetParam();
  const std::vector<GenerateRequest> requests = MixedRequests(VocabOf(model), true, 3);
  EngineOptions options = OptionsFor(model, 256);
  options.scheduler.max_num_seqs = 16;
  options.scheduler.max_num_batched_tokens = 64;
  const std::vector<std::vector<int32_t>> alone = RunAlone(options, requests);
  ConcurrentRun together = RunConcurrently(options, requests, RandomArrivals(16, 4));
  for (size_t i = 0; i < requests.size(); ++i) {
    EXPECT_EQ(together.outputs[i], alone[i]) << "request " << i;
  }
  // Different seeds give different samples (the seed is actually used).
  std::vector<GenerateRequest> reseeded = requests;
  for (GenerateRequest& r : reseeded) *r.sampling.seed += 77;
  const std::vector<std::vector<int32_t>> other = RunAlone(options, reseeded);
  int differing = 0;
  for (size_t i = 0; i < requests.size(); ++i) differing += other[i] != alone[i];
  EXPECT_GT(differing, 8);
}

INSTANTIATE_TEST_SUITE_P(Models, EngineModelTest, ::testing::Values("mixtral", "qwen3_moe"));

TEST(EngineTest, TinyKvPoolForcesPreemptionAndChangesNoOutput) {
  const std::vector<GenerateRequest> requests = MixedRequests(VocabOf("mixtral"), false, 5);
  EngineOptions roomy = OptionsFor("mixtral", 256);
  const std::vector<std::vector<int32_t>> alone = RunAlone(roomy, requests);
  // 8 blocks of 16 tokens: the largest request (94 + 25 tokens) fits alone, not with others.
  EngineOptions tiny = OptionsFor("mixtral", /*num_blocks=*/8);
  tiny.scheduler.max_num_seqs = 8;
  tiny.scheduler.max_num_batched_tokens = 64;
  tiny.scheduler.enable_prefix_caching = false;
  ConcurrentRun run = RunConcurrently(tiny, requests, std::vector<int>(16, 0));
  EXPECT_GT(run.stats.preemptions, 0);
  EXPECT_GT(run.stats.recomputed_tokens, 0);
  for (size_t i = 0; i < requests.size(); ++i) EXPECT_EQ(run.outputs[i], alone[i]) << i;
  // With prefix caching on, recomputation may reuse cached blocks; outputs stay the same.
  tiny.scheduler.enable_prefix_caching = true;
  ConcurrentRun cached = RunConcurrently(tiny, requests, std::vector<int>(16, 0));
  EXPECT_GT(cached.stats.preemptions, 0);
  for (size_t i = 0; i < requests.size(); ++i) EXPECT_EQ(cached.outputs[i], alone[i]) << i;
  // Prompt log-probabilities through preemption: each prompt position reported exactly once,
  // in order, whatever was recomputed.
  std::vector<GenerateRequest> scored = requests;
  for (GenerateRequest& r : scored) r.prompt_logprobs = true;
  ConcurrentRun with_scores = RunConcurrently(tiny, scored, std::vector<int>(16, 0));
  EXPECT_GT(with_scores.stats.preemptions, 0);
  for (size_t i = 0; i < scored.size(); ++i) {
    EXPECT_EQ(with_scores.outputs[i], alone[i]) << i;
    const std::vector<PromptTokenLogprob>& got = with_scores.results[i].prompt_logprobs;
    ASSERT_EQ(got.size(), scored[i].prompt_token_ids.size() - 1) << i;
    for (size_t p = 0; p < got.size(); ++p) {
      EXPECT_EQ(got[p].position, static_cast<int32_t>(p + 1)) << i;
      EXPECT_EQ(got[p].token_id, scored[i].prompt_token_ids[p + 1]) << i;
    }
  }
}

TEST(EngineTest, PrefixCacheHitsSkipPrefillWorkAndChangeNoOutput) {
  std::mt19937_64 rng(9);
  const int32_t vocab = VocabOf("mixtral");
  const std::vector<int32_t> system_prompt = RandomPrompt(rng, 64, vocab);  // 4 full blocks
  std::vector<GenerateRequest> requests;
  for (int i = 0; i < 6; ++i) {
    GenerateRequest r;
    r.prompt_token_ids = system_prompt;
    std::vector<int32_t> question = RandomPrompt(rng, 5 + i, vocab);
    r.prompt_token_ids.insert(r.prompt_token_ids.end(), question.begin(), question.end());
    r.sampling.temperature = 0.0f;
    r.sampling.max_tokens = 8;
    r.sampling.ignore_eos = true;
    requests.push_back(std::move(r));
  }
  // The shared prompt alone, twice: block-aligned, so its last block is recomputed (its last
  // token's logits are needed) and 48 of 64 tokens hit.
  for (int i = 0; i < 2; ++i) {
    GenerateRequest r = requests[0];
    r.prompt_token_ids = system_prompt;
    requests.push_back(std::move(r));
  }
  EngineOptions options = OptionsFor("mixtral", 128);
  const std::vector<std::vector<int32_t>> uncached = RunAlone(options, requests);

  options.scheduler.enable_prefix_caching = true;
  Collector collector;
  std::unique_ptr<Engine> engine = MakeEngine(options);
  ASSERT_NE(engine, nullptr);
  int64_t prompt_tokens = 0;
  for (size_t i = 0; i < requests.size(); ++i) {
    prompt_tokens += requests[i].prompt_token_ids.size();
    ASSERT_TRUE(engine->Submit(requests[i], collector.Sink(i)).ok());
    engine->WaitUntilIdle();  // one after the other: every later one hits
  }
  const EngineStats stats = engine->Stats();
  EXPECT_EQ(stats.prefix_cache_hit_tokens, 5 * 64 + 2 * 48);
  EXPECT_EQ(stats.prompt_tokens_computed, prompt_tokens - 5 * 64 - 2 * 48);
  for (size_t i = 0; i < requests.size(); ++i) {
    Collector::Result r = collector.Get(i);
    EXPECT_EQ(r.tokens, uncached[i]) << i;
    EXPECT_EQ(r.final_event.num_cached_prompt_tokens, i == 0 ? 0 : i < 6 ? 64 : 48) << i;
  }
  EXPECT_EQ(stats.kv_used_blocks, 0);
  EXPECT_GT(stats.kv_cached_free_blocks, 0);  // the prefix cache still holds them, as free
  EXPECT_EQ(stats.kv_free_blocks, stats.kv_total_blocks);
}

// Prompt log-probabilities are log_softmax of transformers' logits at each prompt position (the
// fixture's), each reported once and in order, with the prompt computed in chunks of 5 tokens
// and computed even though the prefix cache holds it; the generated tokens do not change.
TEST(EngineTest, PromptLogprobsMatchTransformersThroughChunksAndACachedPrompt) {
  testing_util::ReferenceData reference("mixtral");
  const std::vector<int32_t> prompt = reference.Ints("prompt.2");
  const std::vector<float> logits = reference.Floats("logits.2");  // [prompt, vocab]
  const int32_t vocab = VocabOf("mixtral");
  ASSERT_GT(prompt.size(), 10u);
  ASSERT_EQ(logits.size(), prompt.size() * vocab);
  EngineOptions options = OptionsFor("mixtral", 64, /*block_size=*/4);
  options.scheduler.enable_prefix_caching = true;
  options.scheduler.max_num_seqs = 4;
  options.scheduler.max_num_batched_tokens = 5;
  Collector collector;
  std::unique_ptr<Engine> engine = MakeEngine(options);
  ASSERT_NE(engine, nullptr);
  GenerateRequest plain;
  plain.prompt_token_ids = prompt;
  plain.sampling.temperature = 0.0f;
  plain.sampling.max_tokens = 3;
  plain.sampling.ignore_eos = true;
  ASSERT_TRUE(engine->Submit(plain, collector.Sink(0)).ok());
  engine->WaitUntilIdle();
  GenerateRequest scored = plain;
  scored.prompt_logprobs = true;
  ASSERT_TRUE(engine->Submit(scored, collector.Sink(1)).ok());
  engine->WaitUntilIdle();

  const Collector::Result first = collector.Get(0), second = collector.Get(1);
  EXPECT_TRUE(first.prompt_logprobs.empty());
  EXPECT_EQ(second.tokens, first.tokens);
  EXPECT_EQ(second.final_event.num_cached_prompt_tokens, 0);
  ASSERT_EQ(second.prompt_logprobs.size(), prompt.size() - 1);
  for (size_t i = 0; i + 1 < prompt.size(); ++i) {
    const PromptTokenLogprob& got = second.prompt_logprobs[i];
    EXPECT_EQ(got.position, static_cast<int32_t>(i + 1));
    EXPECT_EQ(got.token_id, prompt[i + 1]);
    const float* row = logits.data() + i * vocab;
    double max_logit = row[0], sum = 0;
    for (int32_t v = 0; v < vocab; ++v) max_logit = std::max<double>(max_logit, row[v]);
    for (int32_t v = 0; v < vocab; ++v) sum += std::exp(row[v] - max_logit);
    const double expected = row[prompt[i + 1]] - max_logit - std::log(sum);
    EXPECT_NEAR(got.logprob, expected, 1e-4) << "position " << i + 1;
  }
}

TEST(EngineTest, CancellationMidPrefillAndMidDecodeFreesAllBlocks) {
  EngineOptions options = OptionsFor("mixtral", 64);
  options.scheduler.max_num_batched_tokens = 16;  // a 200-token prompt takes 13 steps
  options.scheduler.max_num_seqs = 4;
  std::atomic<Engine*> engine_ptr{nullptr};
  std::atomic<int64_t> prefill_id{-1}, decode_id{-1};
  std::mt19937_64 rng(3);
  // The engine thread waits after step 1 until both requests are submitted, so the step
  // numbers below mean the same thing however the threads are scheduled.
  absl::Notification submitted;
  options.step_observer = [&](const EngineStepInfo& info) {
    EXPECT_TRUE(info.invariants.ok()) << info.invariants;
    if (info.step == 1) submitted.WaitForNotification();
    if (info.step == 3) engine_ptr.load()->Cancel(prefill_id);  // still prefilling
    if (info.step == 6) engine_ptr.load()->Cancel(decode_id);   // decoding by now
  };
  Collector collector;
  std::unique_ptr<Engine> engine = MakeEngine(options);
  ASSERT_NE(engine, nullptr);
  engine_ptr = engine.get();
  GenerateRequest long_prompt;
  long_prompt.prompt_token_ids = RandomPrompt(rng, 200, VocabOf("mixtral"));
  long_prompt.sampling.max_tokens = 50;
  GenerateRequest short_prompt;
  short_prompt.prompt_token_ids = RandomPrompt(rng, 4, VocabOf("mixtral"));
  short_prompt.sampling.max_tokens = 100;
  short_prompt.sampling.ignore_eos = true;
  // The observer cancels by step number (see `submitted` above).
  absl::StatusOr<int64_t> a = engine->Submit(long_prompt, collector.Sink(0));
  ASSERT_TRUE(a.ok());
  prefill_id = *a;
  absl::StatusOr<int64_t> b = engine->Submit(short_prompt, collector.Sink(1));
  ASSERT_TRUE(b.ok());
  decode_id = *b;
  submitted.Notify();
  engine->WaitUntilIdle();
  Collector::Result prefill = collector.Get(0);
  Collector::Result decode = collector.Get(1);
  EXPECT_EQ(prefill.final_event.finish_reason, FinishReason::kCancelled);
  EXPECT_TRUE(prefill.tokens.empty());  // cancelled before its prompt was done
  EXPECT_EQ(decode.final_event.finish_reason, FinishReason::kCancelled);
  EXPECT_GT(decode.tokens.size(), 0u);
  EXPECT_LT(decode.tokens.size(), 100u);
  ExpectAllBlocksFree(*engine);
  engine->Cancel(*a);  // finished ids are ignored
  engine->Cancel(12345);
  EXPECT_EQ(engine->Stats().finished_by_reason.at(FinishReason::kCancelled), 2);
}

TEST(EngineTest, DeadlineEndsRequestAndFreesBlocks) {
  EngineOptions options = OptionsFor("mixtral", 64);
  // Each step takes at least 2 ms, so 400 tokens take far longer than the 100 ms deadline.
  options.step_observer = [](const EngineStepInfo&) { absl::SleepFor(absl::Milliseconds(2)); };
  Collector collector;
  std::unique_ptr<Engine> engine = MakeEngine(options);
  ASSERT_NE(engine, nullptr);
  std::mt19937_64 rng(4);
  GenerateRequest request;
  request.prompt_token_ids = RandomPrompt(rng, 20, VocabOf("mixtral"));
  request.sampling.max_tokens = 400;
  request.sampling.ignore_eos = true;
  request.deadline = absl::Now() + absl::Milliseconds(100);
  ASSERT_TRUE(engine->Submit(request, collector.Sink(0)).ok());
  engine->WaitUntilIdle();
  Collector::Result r = collector.Get(0);
  EXPECT_EQ(r.final_event.finish_reason, FinishReason::kDeadline);
  EXPECT_LT(r.tokens.size(), 400u);
  ExpectAllBlocksFree(*engine);
}

// The final event splits the request's life into queue, prefill and decode time.
TEST(EngineTest, FinalEventReportsPhaseTimes) {
  EngineOptions options = OptionsFor("mixtral", 64);
  // Every step is followed by a 2 ms pause, so 4 decode steps after the first token take at
  // least 8 ms of decode time.
  options.step_observer = [](const EngineStepInfo&) { absl::SleepFor(absl::Milliseconds(2)); };
  Collector collector;
  std::unique_ptr<Engine> engine = MakeEngine(options);
  ASSERT_NE(engine, nullptr);
  std::mt19937_64 rng(5);
  GenerateRequest request;
  request.prompt_token_ids = RandomPrompt(rng, 20, VocabOf("mixtral"));
  request.sampling.max_tokens = 5;
  request.sampling.ignore_eos = true;
  const absl::Time start = absl::Now();
  ASSERT_TRUE(engine->Submit(request, collector.Sink(0)).ok());
  engine->WaitUntilIdle();
  const absl::Duration wall = absl::Now() - start;
  const RequestEvent& final_event = collector.Get(0).final_event;
  ASSERT_EQ(final_event.finish_reason, FinishReason::kLength);
  EXPECT_GE(final_event.queue_time, absl::ZeroDuration());
  EXPECT_GT(final_event.prefill_time, absl::ZeroDuration());
  EXPECT_GE(final_event.decode_time, absl::Milliseconds(8));
  EXPECT_LE(final_event.queue_time + final_event.prefill_time + final_event.decode_time, wall);
}

TEST(EngineTest, StopConditions) {
  EngineOptions options = OptionsFor("mixtral", 64);
  options.detokenizer = testing::ToyDetokenizerFactory();
  std::unique_ptr<Engine> engine = MakeEngine(options);
  ASSERT_NE(engine, nullptr);
  std::mt19937_64 rng(6);
  GenerateRequest base;
  base.prompt_token_ids = RandomPrompt(rng, 12, VocabOf("mixtral"));
  base.sampling.temperature = 0.0f;
  base.sampling.max_tokens = 30;
  base.sampling.ignore_eos = true;
  base.sampling.logprobs = 3;
  Collector collector;
  ASSERT_TRUE(engine->Submit(base, collector.Sink(0)).ok());
  engine->WaitUntilIdle();
  const Collector::Result full = collector.Get(0);
  ASSERT_EQ(full.tokens.size(), 30u);
  EXPECT_EQ(full.final_event.finish_reason, FinishReason::kLength);
  EXPECT_EQ(full.final_event.num_generated_tokens, 30);
  std::string expected_text;
  for (int32_t t : full.tokens) expected_text += testing::ToyText(t);
  EXPECT_EQ(full.text, expected_text);
  for (const GeneratedToken& t : full.generated) {
    ASSERT_EQ(t.top_logprobs.size(), 3u);
    EXPECT_EQ(t.top_logprobs[0].token_id, t.token_id);  // greedy picks the most likely
    EXPECT_FLOAT_EQ(t.logprob, t.top_logprobs[0].logprob);
    EXPECT_LE(t.logprob, 0.0f);
  }

  // A stop string spanning tokens 10..12 of that output: text stops right before it.
  std::string stop;
  for (int i = 10; i < 13; ++i) stop += testing::ToyText(full.tokens[i]);
  const size_t stop_at = expected_text.find(stop);
  GenerateRequest with_stop_string = base;
  with_stop_string.sampling.stop_strings = {stop};
  ASSERT_TRUE(engine->Submit(with_stop_string, collector.Sink(1)).ok());
  engine->WaitUntilIdle();
  const Collector::Result stopped = collector.Get(1);
  EXPECT_EQ(stopped.final_event.finish_reason, FinishReason::kStopString);
  EXPECT_EQ(stopped.final_event.matched_stop_string, stop);
  EXPECT_EQ(stopped.text, expected_text.substr(0, stop_at));
  EXPECT_LE(stopped.tokens.size(), 13u);

  // A stop token id: the token is generated and reported, its text is not.
  GenerateRequest with_stop_token = base;
  with_stop_token.sampling.stop_token_ids = {full.tokens[5]};
  const size_t first =
      std::find(full.tokens.begin(), full.tokens.end(), full.tokens[5]) - full.tokens.begin();
  ASSERT_TRUE(engine->Submit(with_stop_token, collector.Sink(2)).ok());
  engine->WaitUntilIdle();
  const Collector::Result stop_token = collector.Get(2);
  EXPECT_EQ(stop_token.final_event.finish_reason, FinishReason::kStopToken);
  EXPECT_EQ(stop_token.tokens,
            std::vector<int32_t>(full.tokens.begin(), full.tokens.begin() + first + 1));
  std::string text_before_stop;
  for (size_t i = 0; i < first; ++i) text_before_stop += testing::ToyText(full.tokens[i]);
  EXPECT_EQ(stop_token.text, text_before_stop);

  // min_tokens masks the stop token until enough tokens are out.
  GenerateRequest min_tokens = with_stop_token;
  min_tokens.sampling.min_tokens = static_cast<int32_t>(first) + 3;
  ASSERT_TRUE(engine->Submit(min_tokens, collector.Sink(3)).ok());
  engine->WaitUntilIdle();
  const Collector::Result late = collector.Get(3);
  EXPECT_GE(late.tokens.size(), first + 3);
  for (size_t i = 0; i < first + 3 && i < late.tokens.size(); ++i) {
    EXPECT_NE(late.tokens[i], full.tokens[5]) << i;
  }
  ExpectAllBlocksFree(*engine);
}

TEST(EngineTest, EveryRefusalPathHasAClearError) {
  EngineOptions options = OptionsFor("mixtral", /*num_blocks=*/8);  // 128 KV tokens
  options.max_model_len = 200;
  options.max_waiting_requests = 2;
  options.scheduler.max_num_seqs = 1;
  options.scheduler.max_num_batched_tokens = 64;
  absl::Notification parked, release;
  std::atomic<bool> hold{true};
  options.step_observer = [&](const EngineStepInfo&) {
    if (hold.exchange(false)) {  // parks the engine thread in step 1
      parked.Notify();
      release.WaitForNotification();
    }
  };
  Collector collector;
  std::unique_ptr<Engine> engine = MakeEngine(options);
  ASSERT_NE(engine, nullptr);
  auto submit = [&](GenerateRequest r) { return engine->Submit(std::move(r), collector.Sink(99)); };
  auto expect_error = [&](GenerateRequest r, absl::StatusCode code, const std::string& text) {
    absl::StatusOr<int64_t> id = submit(std::move(r));
    ASSERT_FALSE(id.ok());
    EXPECT_EQ(id.status().code(), code) << id.status();
    EXPECT_NE(id.status().message().find(text), std::string::npos) << id.status();
  };
  GenerateRequest ok;
  ok.prompt_token_ids = {5, 6, 7};
  ok.sampling.max_tokens = 4;

  GenerateRequest r = ok;
  r.prompt_token_ids.clear();
  expect_error(r, absl::StatusCode::kInvalidArgument, "prompt is empty");
  r = ok;
  r.prompt_token_ids = {5, 320};
  expect_error(r, absl::StatusCode::kInvalidArgument, "outside the vocabulary");
  r = ok;
  r.sampling.top_p = 2.0f;
  expect_error(r, absl::StatusCode::kInvalidArgument, "top_p");
  r = ok;
  r.sampling.stop_strings = {"x"};
  expect_error(r, absl::StatusCode::kInvalidArgument, "no detokenizer");
  r = ok;
  r.prompt_token_ids.assign(190, 5);
  r.sampling.max_tokens = 20;
  expect_error(r, absl::StatusCode::kInvalidArgument, "exceeds the maximum context length");
  r = ok;
  r.prompt_token_ids.assign(120, 5);
  r.sampling.max_tokens = 20;
  expect_error(r, absl::StatusCode::kInvalidArgument, "whole KV pool");
  r = ok;
  r.deadline = absl::Now() - absl::Seconds(1);
  expect_error(r, absl::StatusCode::kDeadlineExceeded, "deadline");
  {
    absl::StatusOr<int64_t> id = engine->Submit(ok, nullptr);
    EXPECT_EQ(id.status().code(), absl::StatusCode::kInvalidArgument);
  }

  // Overload: one runs (parked in step 1), two wait, the next is refused.
  GenerateRequest long_one = ok;
  long_one.sampling.max_tokens = 40;
  ASSERT_TRUE(engine->Submit(long_one, collector.Sink(0)).ok());
  parked.WaitForNotification();
  ASSERT_TRUE(engine->Submit(ok, collector.Sink(1)).ok());
  ASSERT_TRUE(engine->Submit(ok, collector.Sink(2)).ok());
  expect_error(ok, absl::StatusCode::kResourceExhausted, "overloaded");
  release.Notify();
  engine->WaitUntilIdle();
  for (int i = 0; i < 3; ++i) EXPECT_EQ(collector.Get(i).num_final_events, 1);
  const EngineStats stats = engine->Stats();
  EXPECT_EQ(stats.requests_overloaded, 1);
  EXPECT_EQ(stats.requests_refused, 9);
  EXPECT_EQ(stats.requests_submitted, 3);
  ExpectAllBlocksFree(*engine);

  // Without chunked prefill, a request whose recomputation would not fit one step is refused.
  EngineOptions no_chunk = OptionsFor("mixtral", 64);
  no_chunk.scheduler.enable_chunked_prefill = false;
  no_chunk.scheduler.max_num_seqs = 8;
  no_chunk.scheduler.max_num_batched_tokens = 32;
  std::unique_ptr<Engine> strict = MakeEngine(no_chunk);
  ASSERT_NE(strict, nullptr);
  r = ok;
  r.prompt_token_ids.assign(30, 5);
  r.sampling.max_tokens = 10;
  absl::StatusOr<int64_t> id = strict->Submit(r, collector.Sink(100));
  EXPECT_EQ(id.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(id.status().message().find("max_num_batched_tokens"), std::string::npos);

  // Bad engine options.
  EngineOptions bad = OptionsFor("mixtral", 8);
  bad.scheduler.max_num_seqs = 0;
  EXPECT_FALSE(Engine::Create(bad).ok());
  bad = OptionsFor("mixtral", 8);
  bad.max_model_len = 100000;
  EXPECT_FALSE(Engine::Create(bad).ok());
}

TEST(EngineTest, RoutingReachesTheObserverAndRequestsThatAsk) {
  EngineOptions options = OptionsFor("mixtral", 64);
  absl::StatusOr<ModelConfig> config = LoadModelConfig(options.runner.model_dir);
  ASSERT_TRUE(config.ok());
  std::atomic<int64_t> observed_tokens{0};
  std::atomic<int64_t> observed_choices{0};
  std::atomic<bool> shapes_ok{true};
  options.routing_observer = [&](const ForwardBatch& batch, const StepRouting& routing) {
    observed_tokens += batch.num_tokens();
    if (static_cast<int32_t>(routing.expert_ids.size()) != config->num_moe_layers()) {
      shapes_ok = false;
    }
    for (const std::vector<int32_t>& layer : routing.expert_ids) {
      if (layer.size() != static_cast<size_t>(batch.num_tokens() * config->top_k)) {
        shapes_ok = false;
      }
      observed_choices += layer.size();
    }
  };
  Collector collector;
  std::unique_ptr<Engine> engine = MakeEngine(options);
  ASSERT_NE(engine, nullptr);
  GenerateRequest request;
  request.prompt_token_ids = {4, 5, 6, 7, 8};
  request.sampling.max_tokens = 6;
  request.sampling.ignore_eos = true;
  request.return_routing = true;
  ASSERT_TRUE(engine->Submit(request, collector.Sink(0)).ok());
  engine->WaitUntilIdle();
  EXPECT_TRUE(shapes_ok);
  // Every computed token (5 prompt + 5 fed-back generated ones) routed top_k per MoE layer.
  EXPECT_EQ(observed_tokens, 10);
  EXPECT_EQ(observed_choices, 10 * config->top_k * config->num_moe_layers());
  Collector::Result r = collector.Get(0);
  ASSERT_EQ(r.routing.size(), 10u);
  for (size_t i = 0; i < r.routing.size(); ++i) {
    EXPECT_EQ(r.routing[i].position, static_cast<int32_t>(i));
    EXPECT_EQ(r.routing[i].expert_ids.size(),
              static_cast<size_t>(config->top_k * config->num_moe_layers()));
    for (int32_t e : r.routing[i].expert_ids) {
      EXPECT_GE(e, 0);
      EXPECT_LT(e, config->num_experts);
    }
  }
}

TEST(EngineTest, RandomizedSoakOfSubmitsCancelsAndDeadlinesKeepsInvariants) {
  EngineOptions options = OptionsFor("mixtral", /*num_blocks=*/12);
  options.scheduler.max_num_seqs = 6;
  options.scheduler.max_num_batched_tokens = 32;
  options.scheduler.policy = SchedulingPolicy::kPriority;
  options.max_waiting_requests = 24;
  std::atomic<int64_t> steps{0};
  std::atomic<int64_t> violations{0};
  options.step_observer = [&](const EngineStepInfo& info) {
    ++steps;
    if (!info.invariants.ok() ||
        info.kv_free_blocks + info.kv_used_blocks != info.kv_total_blocks) {
      ++violations;
    }
  };
  Collector collector;
  std::unique_ptr<Engine> engine = MakeEngine(options);
  ASSERT_NE(engine, nullptr);
  std::mt19937_64 rng(21);
  const int32_t vocab = VocabOf("mixtral");
  std::vector<int64_t> ids;
  int accepted = 0, overloaded = 0, expired_at_submit = 0;
  const absl::Time end = absl::Now() + absl::Seconds(6);
  for (int i = 0; i < 400 && absl::Now() < end; ++i) {
    GenerateRequest r;
    r.prompt_token_ids = RandomPrompt(rng, 1 + static_cast<int32_t>(rng() % 80), vocab);
    r.sampling.max_tokens = 1 + static_cast<int32_t>(rng() % 40);
    r.sampling.temperature = rng() % 2 ? 0.0f : 1.0f;
    r.priority = static_cast<int32_t>(rng() % 3);
    if (rng() % 5 == 0) r.deadline = absl::Now() + absl::Milliseconds(1 + rng() % 30);
    absl::StatusOr<int64_t> id = engine->Submit(r, collector.Sink(i));
    if (id.ok()) {
      ++accepted;
      ids.push_back(*id);
    } else if (id.status().code() == absl::StatusCode::kDeadlineExceeded) {
      ++expired_at_submit;  // the machine stalled past a 1 ms deadline before Submit
    } else {
      EXPECT_EQ(id.status().code(), absl::StatusCode::kResourceExhausted) << id.status();
      ++overloaded;
      absl::SleepFor(absl::Milliseconds(2));  // back off, like a client would
    }
    if (rng() % 4 == 0 && !ids.empty()) engine->Cancel(ids[rng() % ids.size()]);
    if (rng() % 8 == 0) absl::SleepFor(absl::Milliseconds(rng() % 5));
  }
  engine->WaitUntilIdle();
  EXPECT_EQ(violations, 0);
  EXPECT_GT(steps, 50);
  const EngineStats stats = engine->Stats();
  EXPECT_EQ(stats.requests_finished, accepted);
  EXPECT_EQ(stats.requests_overloaded, overloaded);
  EXPECT_EQ(stats.requests_refused, overloaded + expired_at_submit);
  EXPECT_GT(accepted, 100);
  EXPECT_TRUE(stats.finished_by_reason.contains(FinishReason::kDeadline));
  EXPECT_GT(stats.preemptions, 0);
  EXPECT_TRUE(stats.finished_by_reason.contains(FinishReason::kCancelled));
  ExpectAllBlocksFree(*engine);
  for (int i = 0; i < 400; ++i) {
    if (!collector.Finished(i)) continue;
    Collector::Result r = collector.Get(i);
    EXPECT_EQ(r.num_final_events, 1);
    EXPECT_FALSE(r.events_after_final);
  }
}

TEST(EngineTest, DestroyingTheEngineFinishesRequestsInFlight) {
  EngineOptions options = OptionsFor("mixtral", 64);
  Collector collector;
  {
    std::unique_ptr<Engine> engine = MakeEngine(options);
    ASSERT_NE(engine, nullptr);
    GenerateRequest r;
    r.prompt_token_ids = {5, 6, 7};
    r.sampling.max_tokens = 400;
    r.sampling.ignore_eos = true;
    for (int i = 0; i < 3; ++i) ASSERT_TRUE(engine->Submit(r, collector.Sink(i)).ok());
  }
  for (int i = 0; i < 3; ++i) {
    Collector::Result r = collector.Get(i);
    ASSERT_EQ(r.num_final_events, 1);
    // Either it completed first or it was stopped.
    if (r.final_event.finish_reason == FinishReason::kError) {
      EXPECT_EQ(r.final_event.status.code(), absl::StatusCode::kUnavailable);
    }
  }
}

}  // namespace
}  // namespace moe
