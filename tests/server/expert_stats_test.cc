// ExpertStatsAccumulator: exact counts, the window, and the imbalance formulas on hand-made
// routing (checked against values computed by hand).
#include "server/expert_stats.h"

#include <cmath>

#include "gtest/gtest.h"

namespace moe::server {
namespace {

// One step of `tokens` tokens, 1 MoE layer, 4 experts, top-2, every token routed to `a`, `b`.
StepRouting Step(int tokens, int a, int b) {
  StepRouting routing;
  routing.expert_ids.emplace_back();
  routing.expert_weights.emplace_back();
  for (int t = 0; t < tokens; ++t) {
    routing.expert_ids[0].insert(routing.expert_ids[0].end(), {a, b});
    routing.expert_weights[0].insert(routing.expert_weights[0].end(), {0.5f, 0.5f});
  }
  routing.probability_mass.push_back({0.25 * tokens, 0.25 * tokens, 0.25 * tokens, 0.25 * tokens});
  routing.router_z_sum.push_back(2.0 * tokens);
  return routing;
}

ForwardBatch Batch(int tokens) {
  ForwardBatch batch;
  batch.token_ids.assign(tokens, 0);
  return batch;
}

TEST(ExpertStatsTest, UniformLoadIsPerfectlyBalanced) {
  LayerCounts counts;
  counts.tokens = 10;
  counts.expert_counts = {5, 5, 5, 5};
  counts.probability_sum = {2.5, 2.5, 2.5, 2.5};
  counts.router_z_sum = 30.0;
  const LayerImbalance f = ComputeImbalance(counts, 2);
  EXPECT_DOUBLE_EQ(f.max_load_ratio, 1.0);
  EXPECT_DOUBLE_EQ(f.load_cv, 0.0);
  EXPECT_NEAR(f.entropy_ratio, 1.0, 1e-12);
  EXPECT_NEAR(f.switch_balance, 1.0, 1e-12);  // 4 * sum(0.25 * 0.25)
  EXPECT_DOUBLE_EQ(f.router_z, 3.0);
  EXPECT_EQ(f.dead_experts, 0);
}

TEST(ExpertStatsTest, SkewedLoadByHand) {
  LayerCounts counts;
  counts.tokens = 4;
  counts.expert_counts = {4, 4, 0, 0};  // every token to experts 0 and 1
  counts.probability_sum = {2.0, 2.0, 0.0, 0.0};
  const LayerImbalance f = ComputeImbalance(counts, 2);
  EXPECT_DOUBLE_EQ(f.max_load_ratio, 2.0);                             // 4 / mean 2
  EXPECT_DOUBLE_EQ(f.load_cv, 1.0);                                    // std 2 / mean 2
  EXPECT_NEAR(f.entropy_ratio, std::log(2.0) / std::log(4.0), 1e-12);  // 0.5
  EXPECT_NEAR(f.switch_balance, 4 * (0.5 * 0.5 + 0.5 * 0.5), 1e-12);   // 2
  EXPECT_EQ(f.dead_experts, 2);
  ASSERT_EQ(f.hottest.size(), 3u);
  EXPECT_EQ(f.hottest[0], 0);
  EXPECT_EQ(f.hottest[1], 1);
}

TEST(ExpertStatsTest, CountsAndWindow) {
  ExpertStatsAccumulator stats(/*num_moe_layers=*/1, /*num_experts=*/4, /*top_k=*/2,
                               /*window_steps=*/10);  // 10 buckets of 1 step
  for (int step = 0; step < 25; ++step) {
    stats.Record(Batch(3), step < 15 ? Step(3, 0, 1) : Step(3, 2, 3));
  }
  const auto snapshot = stats.Get();
  EXPECT_EQ(snapshot.since_start.steps, 25);
  EXPECT_EQ(snapshot.since_start.tokens, 75);
  const LayerCounts& all = snapshot.since_start.layers[0];
  EXPECT_EQ(all.tokens, 75);
  EXPECT_EQ(all.expert_counts, (std::vector<int64_t>{45, 45, 30, 30}));
  // The last 10 steps all went to experts 2 and 3.
  EXPECT_EQ(snapshot.window.steps, 10);
  EXPECT_EQ(snapshot.window.layers[0].expert_counts, (std::vector<int64_t>{0, 0, 30, 30}));
  EXPECT_DOUBLE_EQ(snapshot.window.layers[0].router_z_sum, 60.0);
}

}  // namespace
}  // namespace moe::server
