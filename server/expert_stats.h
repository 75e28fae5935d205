// ExpertStatsAccumulator: the [MoE layer x expert] load of the engine's routing, exact, over a
// recent window of engine steps and since start, with derived imbalance figures.
//
// Fed by EngineOptions::routing_observer on the engine thread (Record: a bincount of the step's
// chosen experts, O(tokens x top_k) per layer, under a mutex held for microseconds); read from
// any thread (Snapshot). No gRPC here: the metrics exporter can use it too.
//
// The window advances bucket by bucket: it is made of `kBuckets` buckets of window_steps /
// kBuckets steps each plus the bucket being filled, so it covers between window_steps and
// window_steps + window_steps / kBuckets steps once that many have run (LoadSpan::steps says
// exactly how many).
#pragma once

#include <cstdint>
#include <deque>
#include <vector>

#include "absl/synchronization/mutex.h"
#include "engine/ops/batch.h"

namespace moe::server {

// Raw sums over a span of steps for one MoE layer.
struct LayerCounts {
  int64_t tokens = 0;                   // T
  std::vector<int64_t> expert_counts;   // c_i, [num_experts]
  std::vector<double> probability_sum;  // sum over tokens of the router probability, [N]
  double router_z_sum = 0.0;            // sum over tokens of logsumexp(logits)^2
};

// Derived figures of one layer (see proto LayerLoad for the definitions).
struct LayerImbalance {
  double max_load_ratio = 0.0;
  double load_cv = 0.0;
  double entropy_ratio = 0.0;
  double switch_balance = 0.0;
  double router_z = 0.0;
  int32_t dead_experts = 0;
  std::vector<int32_t> hottest;          // up to 3 expert ids, most loaded first
  std::vector<double> mean_probability;  // P_i
};
LayerImbalance ComputeImbalance(const LayerCounts& counts, int32_t top_k);

struct SpanCounts {
  int64_t steps = 0;
  int64_t tokens = 0;
  std::vector<LayerCounts> layers;  // [num_moe_layers]
};

class ExpertStatsAccumulator {
 public:
  static constexpr int kBuckets = 10;

  ExpertStatsAccumulator(int32_t num_moe_layers, int32_t num_experts, int32_t top_k,
                         int64_t window_steps);

  // One engine step's routing (call from EngineOptions::routing_observer).
  void Record(const ForwardBatch& batch, const StepRouting& routing);

  struct Snapshot {
    SpanCounts window;
    SpanCounts since_start;
  };
  Snapshot Get() const;

  int32_t num_moe_layers() const { return num_moe_layers_; }
  int32_t num_experts() const { return num_experts_; }
  int32_t top_k() const { return top_k_; }
  int64_t window_steps() const { return window_steps_; }

 private:
  SpanCounts Empty() const;
  static void Add(SpanCounts& into, const SpanCounts& from);

  const int32_t num_moe_layers_;
  const int32_t num_experts_;
  const int32_t top_k_;
  const int64_t window_steps_;
  const int64_t steps_per_bucket_;

  mutable absl::Mutex mu_;
  SpanCounts since_start_ ABSL_GUARDED_BY(mu_);
  SpanCounts current_ ABSL_GUARDED_BY(mu_);                   // the bucket being filled
  std::deque<SpanCounts> full_buckets_ ABSL_GUARDED_BY(mu_);  // at most kBuckets
  std::vector<int64_t> scratch_ ABSL_GUARDED_BY(mu_);
};

}  // namespace moe::server
