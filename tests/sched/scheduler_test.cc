#include "engine/sched/scheduler.h"

#include <algorithm>
#include <map>
#include <random>
#include <vector>

#include "gtest/gtest.h"
#include "tests/sched/fake_kv_model.h"

namespace moe {
namespace {

using ::moe::testing::FakeKvModel;

constexpr int32_t kVocab = 1000;

std::vector<int32_t> Prompt(int32_t length, int32_t salt) {
  std::vector<int32_t> tokens;
  for (int32_t i = 0; i < length; ++i) tokens.push_back((salt * 131 + i * 7) % kVocab);
  return tokens;
}

// What a request produces when it runs alone, by definition of the fake model.
std::vector<int32_t> Reference(std::vector<int32_t> tokens, int32_t max_new) {
  std::vector<int32_t> out;
  for (int32_t i = 0; i < max_new; ++i) {
    out.push_back(FakeKvModel::NextToken(tokens, kVocab));
    tokens.push_back(out.back());
  }
  return out;
}

// Runs the scheduler against the fake model, like the engine loop does.
class Driver {
 public:
  Driver(const SchedulerOptions& options, int32_t num_blocks, int32_t block_size)
      : scheduler(options, num_blocks, block_size), model(num_blocks, block_size, kVocab) {}

  void Add(int64_t id, std::vector<int32_t> prompt, int32_t max_new, int32_t priority = 0) {
    max_new_[id] = max_new;
    scheduler.Add(id, std::move(prompt), priority);
  }

  // One step; returns its plan (copied before sequences may finish).
  StepPlan Step() {
    StepPlan plan = scheduler.Schedule();
    EXPECT_TRUE(scheduler.CheckInvariants().ok()) << scheduler.CheckInvariants();
    EXPECT_LE(plan.batch.num_tokens(), scheduler.options().max_num_batched_tokens);
    EXPECT_LE(plan.scheduled.size(), static_cast<size_t>(scheduler.options().max_num_seqs));
    if (plan.empty()) return plan;
    std::vector<int32_t> next = model.Forward(plan.batch);
    EXPECT_EQ(model.error(), "");
    scheduler.CompleteStep(plan);
    for (const ScheduledSequence& s : plan.scheduled) {
      if (s.logits_index < 0) continue;
      const int64_t id = s.sequence->id();
      s.sequence->AppendToken(next[s.logits_index]);
      outputs[id].push_back(next[s.logits_index]);
      if (static_cast<int32_t>(outputs[id].size()) == max_new_[id]) {
        scheduler.Finish(id);
        finished_order.push_back(id);
      }
    }
    EXPECT_TRUE(scheduler.CheckInvariants().ok()) << scheduler.CheckInvariants();
    return plan;
  }

  void RunToCompletion(int max_steps = 100000) {
    for (int i = 0; i < max_steps && scheduler.has_unfinished(); ++i) Step();
    ASSERT_FALSE(scheduler.has_unfinished());
  }

  void ExpectAllBlocksFree() const {
    const BlockManager& kv = scheduler.block_manager();
    EXPECT_EQ(kv.num_used_blocks(), 0);
    EXPECT_EQ(kv.num_free_blocks(), kv.num_blocks());
    EXPECT_TRUE(kv.CheckInvariants().ok());
  }

  Scheduler scheduler;
  FakeKvModel model;
  std::map<int64_t, std::vector<int32_t>> outputs;
  std::vector<int64_t> finished_order;

 private:
  std::map<int64_t, int32_t> max_new_;
};

SchedulerOptions Options(int32_t max_seqs, int32_t budget, bool chunked = true,
                         bool prefix = false) {
  SchedulerOptions o;
  o.max_num_seqs = max_seqs;
  o.max_num_batched_tokens = budget;
  o.enable_chunked_prefill = chunked;
  o.enable_prefix_caching = prefix;
  return o;
}

TEST(SchedulerTest, OptionsValidate) {
  EXPECT_TRUE(Options(4, 64).Validate().ok());
  EXPECT_FALSE(Options(0, 64).Validate().ok());
  EXPECT_FALSE(Options(8, 4).Validate().ok());
}

TEST(SchedulerTest, PrefillThenDecodeBuildsTheRightBatch) {
  Driver d(Options(4, 64), /*num_blocks=*/16, /*block_size=*/4);
  d.Add(7, Prompt(6, 1), 3);
  StepPlan first = d.Step();
  ASSERT_EQ(first.scheduled.size(), 1u);
  EXPECT_EQ(first.batch.num_tokens(), 6);
  EXPECT_EQ(first.num_prefill_tokens, 6);
  EXPECT_EQ(first.batch.positions, (std::vector<int32_t>{0, 1, 2, 3, 4, 5}));
  ASSERT_EQ(first.batch.sequences.size(), 1u);
  EXPECT_EQ(first.batch.sequences[0].seq_id, 7);
  EXPECT_EQ(first.batch.sequences[0].context_len, 6);
  EXPECT_EQ(first.batch.sequences[0].block_table.size(), 2u);
  EXPECT_EQ(first.batch.logits_rows, (std::vector<int32_t>{5}));
  StepPlan second = d.Step();
  EXPECT_EQ(second.batch.num_tokens(), 1);
  EXPECT_EQ(second.num_decode_tokens, 1);
  EXPECT_EQ(second.batch.positions, (std::vector<int32_t>{6}));
  EXPECT_EQ(second.batch.sequences[0].context_len, 7);
  d.RunToCompletion();
  EXPECT_EQ(d.outputs[7], Reference(Prompt(6, 1), 3));
  d.ExpectAllBlocksFree();
}

TEST(SchedulerTest, ChunkedPrefillRunsAlongsideDecodes) {
  Driver d(Options(4, /*budget=*/8), 64, 4);
  d.Add(1, Prompt(3, 1), 20);
  d.Step();  // 1 prefilled
  d.Add(2, Prompt(30, 2), 5);
  // 30 prompt tokens at <= 7 per step (one slot goes to 1's decode): 5 steps, 1 decodes in all.
  int prefill_steps = 0;
  while (d.scheduler.Find(2) && d.scheduler.Find(2)->num_computed_tokens() < 30) {
    StepPlan plan = d.Step();
    ++prefill_steps;
    ASSERT_EQ(plan.scheduled.size(), 2u);
    EXPECT_EQ(plan.scheduled[0].sequence->id(), 1);  // decode first
    EXPECT_EQ(plan.scheduled[0].num_new_tokens, 1);
    EXPECT_GE(plan.scheduled[0].logits_index, 0);
    EXPECT_LE(plan.scheduled[1].num_new_tokens, 7);
    EXPECT_EQ(plan.batch.num_tokens(), plan.scheduled[1].num_new_tokens + 1);
  }
  EXPECT_EQ(prefill_steps, 5);
  d.RunToCompletion();
  EXPECT_EQ(d.outputs[1], Reference(Prompt(3, 1), 20));
  EXPECT_EQ(d.outputs[2], Reference(Prompt(30, 2), 5));
  d.ExpectAllBlocksFree();
}

TEST(SchedulerTest, WithoutChunkingAPromptWaitsForAWholeBudget) {
  Driver d(Options(4, /*budget=*/10, /*chunked=*/false), 64, 4);
  d.Add(1, Prompt(2, 1), 4);
  d.Add(2, Prompt(10, 2), 2);
  StepPlan plan = d.Step();
  ASSERT_EQ(plan.scheduled.size(), 1u);  // 2 + 10 > 10: the second prompt waits
  plan = d.Step();
  EXPECT_EQ(plan.scheduled.size(), 1u);  // 1 decode + 10 > 10 still
  d.RunToCompletion();
  EXPECT_EQ(d.outputs[2], Reference(Prompt(10, 2), 2));
  d.ExpectAllBlocksFree();
}

TEST(SchedulerTest, MaxNumSeqsBoundsTheRunningSet) {
  Driver d(Options(/*max_seqs=*/3, 64), 64, 4);
  for (int i = 0; i < 8; ++i) d.Add(i, Prompt(5, i), 4);
  for (int step = 0; d.scheduler.has_unfinished(); ++step) {
    d.Step();
    EXPECT_LE(d.scheduler.num_running(), 3);
  }
  // FCFS: finished in arrival order (same lengths).
  EXPECT_EQ(d.finished_order, (std::vector<int64_t>{0, 1, 2, 3, 4, 5, 6, 7}));
  for (int i = 0; i < 8; ++i) EXPECT_EQ(d.outputs[i], Reference(Prompt(5, i), 4));
  d.ExpectAllBlocksFree();
}

TEST(SchedulerTest, TinyPoolPreemptsByRecomputeAndChangesNoOutput) {
  // 10 blocks of 4 tokens; each request needs up to ceil((12 + 12) / 4) = 6 blocks.
  Driver d(Options(4, 64), /*num_blocks=*/10, /*block_size=*/4);
  for (int i = 0; i < 4; ++i) d.Add(i, Prompt(12, i), 12);
  d.RunToCompletion();
  EXPECT_GT(d.scheduler.counters().preemptions, 0);
  EXPECT_GT(d.scheduler.counters().recomputed_tokens, 0);
  for (int i = 0; i < 4; ++i) EXPECT_EQ(d.outputs[i], Reference(Prompt(12, i), 12)) << i;
  d.ExpectAllBlocksFree();
}

TEST(SchedulerTest, PreemptionWithPrefixCachingAlsoChangesNoOutput) {
  Driver d(Options(4, 16, true, /*prefix=*/true), /*num_blocks=*/10, /*block_size=*/4);
  for (int i = 0; i < 5; ++i) d.Add(i, Prompt(12, i % 2), 12);
  d.RunToCompletion();
  EXPECT_GT(d.scheduler.counters().preemptions, 0);
  for (int i = 0; i < 5; ++i) EXPECT_EQ(d.outputs[i], Reference(Prompt(12, i % 2), 12)) << i;
  EXPECT_EQ(d.scheduler.block_manager().num_used_blocks(), 0);
  EXPECT_TRUE(d.scheduler.block_manager().CheckInvariants().ok());
}

TEST(SchedulerTest, PrefixCacheHitsSkipPrefillAndChangeNoOutput) {
  Driver d(Options(4, 64, true, /*prefix=*/true), 64, 4);
  std::vector<int32_t> shared = Prompt(20, 3);
  std::vector<int32_t> a = shared, b = shared;
  a.push_back(1);
  b.push_back(2);
  b.push_back(3);
  d.Add(1, a, 4);
  d.RunToCompletion();
  const int64_t computed_alone = d.scheduler.counters().prompt_tokens_computed;
  EXPECT_EQ(computed_alone, 21);
  d.Add(2, b, 4);
  StepPlan plan = d.Step();
  ASSERT_EQ(plan.scheduled.size(), 1u);
  EXPECT_EQ(plan.scheduled[0].sequence->num_cached_prompt_tokens(), 20);  // 5 full blocks
  EXPECT_EQ(plan.scheduled[0].num_new_tokens, 2);
  d.RunToCompletion();
  EXPECT_EQ(d.scheduler.counters().prompt_tokens_computed, 21 + 2);
  EXPECT_EQ(d.scheduler.counters().prefix_cache_hit_tokens, 20);
  EXPECT_EQ(d.outputs[2], Reference(b, 4));
  // The same prompt again: all but the last block comes from the cache (its last token must
  // be computed to get logits).
  d.Add(3, a, 4);
  d.RunToCompletion();
  EXPECT_EQ(d.outputs[3], d.outputs[1]);
  EXPECT_EQ(d.scheduler.counters().prefix_cache_hit_tokens, 40);
  EXPECT_EQ(d.scheduler.block_manager().num_used_blocks(), 0);
  EXPECT_GT(d.scheduler.block_manager().num_cached_free_blocks(), 0);
}

// The same prompt twice at once (the n completions of one request): the second waits while the
// first computes the shared blocks, then takes them from the cache; the prompt is computed
// once (chunked over several steps here) and the outputs are unchanged.
TEST(SchedulerTest, TheSamePromptTwiceAtOnceIsComputedOnce) {
  Driver d(Options(4, 8, /*chunked=*/true, /*prefix=*/true), 64, 4);
  const std::vector<int32_t> prompt = Prompt(21, 5);  // 5 full blocks + 1 token
  d.Add(1, prompt, 3);
  d.Add(2, prompt, 3);
  StepPlan first = d.Step();
  ASSERT_EQ(first.scheduled.size(), 1u);  // 2 waits: 1 is computing its first block
  EXPECT_EQ(first.scheduled[0].sequence->id(), 1);
  d.RunToCompletion();
  EXPECT_EQ(d.outputs[1], Reference(prompt, 3));
  EXPECT_EQ(d.outputs[2], d.outputs[1]);
  // 21 prompt tokens once, and the second's last block (its one token) again.
  EXPECT_EQ(d.scheduler.counters().prompt_tokens_computed, 21 + 1);
  EXPECT_EQ(d.scheduler.counters().prefix_cache_hit_tokens, 20);
  d.ExpectAllBlocksFree();

  // Without prefix caching nothing waits: both compute the prompt.
  Driver plain(Options(4, 64, true, /*prefix=*/false), 64, 4);
  plain.Add(1, prompt, 3);
  plain.Add(2, prompt, 3);
  EXPECT_EQ(plain.Step().scheduled.size(), 2u);
  plain.RunToCompletion();
  EXPECT_EQ(plain.outputs[2], plain.outputs[1]);
  EXPECT_EQ(plain.scheduler.counters().prompt_tokens_computed, 2 * 21);
}

TEST(SchedulerTest, FinishMidPrefillAndMidDecodeFreesEverything) {
  Driver d(Options(4, /*budget=*/8), 64, 4);
  d.Add(1, Prompt(40, 1), 10);
  d.Add(2, Prompt(3, 2), 10);
  d.Step();
  ASSERT_NE(d.scheduler.Find(1), nullptr);
  EXPECT_GT(d.scheduler.Find(1)->num_computed_tokens(), 0);
  EXPECT_LT(d.scheduler.Find(1)->num_computed_tokens(), 40);  // mid-prefill
  EXPECT_TRUE(d.scheduler.Finish(1));
  EXPECT_FALSE(d.scheduler.Finish(1));  // already gone
  d.Step();
  d.Step();
  ASSERT_NE(d.scheduler.Find(2), nullptr);
  EXPECT_GT(d.scheduler.Find(2)->num_generated_tokens(), 0);  // mid-decode
  EXPECT_TRUE(d.scheduler.Finish(2));
  EXPECT_TRUE(d.scheduler.CheckInvariants().ok());
  d.ExpectAllBlocksFree();
  EXPECT_FALSE(d.scheduler.has_unfinished());
  // Waiting sequences can be finished too.
  d.Add(3, Prompt(5, 3), 2);
  EXPECT_TRUE(d.scheduler.Finish(3));
  d.ExpectAllBlocksFree();
}

TEST(SchedulerTest, PriorityPolicyServesMoreImportantFirstAndPreemptsForIt) {
  SchedulerOptions options = Options(/*max_seqs=*/2, 64);
  options.policy = SchedulingPolicy::kPriority;
  Driver d(options, 64, 4);
  d.Add(1, Prompt(4, 1), 30, /*priority=*/5);
  d.Add(2, Prompt(4, 2), 30, /*priority=*/5);
  d.Step();
  EXPECT_EQ(d.scheduler.num_running(), 2);
  d.Add(3, Prompt(4, 3), 3, /*priority=*/0);  // more important: takes 2's place
  StepPlan plan = d.Step();
  EXPECT_EQ(plan.preempted_ids, (std::vector<int64_t>{2}));
  EXPECT_EQ(d.scheduler.Find(3)->status(), SequenceStatus::kRunning);
  d.Add(4, Prompt(4, 4), 3, /*priority=*/5);  // equal to the running ones: waits
  d.RunToCompletion();
  EXPECT_EQ(d.finished_order.front(), 3);
  for (int i = 1; i <= 2; ++i) EXPECT_EQ(d.outputs[i], Reference(Prompt(4, i), 30));
  d.ExpectAllBlocksFree();

  // Under FCFS the same arrivals never preempt.
  Driver fcfs(Options(2, 64), 64, 4);
  fcfs.Add(1, Prompt(4, 1), 30, 5);
  fcfs.Add(2, Prompt(4, 2), 30, 5);
  fcfs.Step();
  fcfs.Add(3, Prompt(4, 3), 3, 0);
  fcfs.RunToCompletion();
  EXPECT_EQ(fcfs.scheduler.counters().preemptions, 0);
  EXPECT_EQ(fcfs.finished_order.back(), 3);
}

TEST(SchedulerTest, RandomizedSoakKeepsInvariantsAndOutputs) {
  for (bool prefix : {false, true}) {
    std::mt19937_64 rng(prefix ? 11 : 12);
    SchedulerOptions options = Options(6, 24, true, prefix);
    options.policy = prefix ? SchedulingPolicy::kPriority : SchedulingPolicy::kFcfs;
    Driver d(options, /*num_blocks=*/24, /*block_size=*/4);
    std::map<int64_t, std::pair<std::vector<int32_t>, int32_t>> requests;
    std::vector<int64_t> live;
    int64_t next_id = 0;
    for (int step = 0; step < 1500; ++step) {
      if (rng() % 3 == 0 && next_id < 300) {
        const int32_t len = 1 + static_cast<int32_t>(rng() % 30);
        std::vector<int32_t> prompt = Prompt(len, static_cast<int32_t>(rng() % 4));
        const int32_t max_new = 1 + static_cast<int32_t>(rng() % 20);
        // Never more than the whole pool: 24 blocks * 4 tokens.
        requests[next_id] = {prompt, max_new};
        d.Add(next_id, prompt, max_new, static_cast<int32_t>(rng() % 3));
        live.push_back(next_id++);
      }
      if (rng() % 17 == 0 && !live.empty()) {  // a cancellation
        const size_t i = rng() % live.size();
        d.scheduler.Finish(live[i]);
        requests.erase(live[i]);
        live.erase(live.begin() + i);
      }
      d.Step();
      const BlockManager& kv = d.scheduler.block_manager();
      ASSERT_EQ(kv.num_free_blocks() + kv.num_used_blocks(), kv.num_blocks());
      std::erase_if(live, [&](int64_t id) { return d.scheduler.Find(id) == nullptr; });
    }
    d.RunToCompletion();
    d.ExpectAllBlocksFree();
    int checked = 0;
    for (const auto& [id, request] : requests) {
      EXPECT_EQ(d.outputs[id], Reference(request.first, request.second)) << id;
      ++checked;
    }
    EXPECT_GT(checked, 100);
    EXPECT_GT(d.scheduler.counters().preemptions, 0) << "prefix=" << prefix;
    if (prefix) {
      EXPECT_GT(d.scheduler.counters().prefix_cache_hit_tokens, 0);
    }
  }
}

}  // namespace
}  // namespace moe
