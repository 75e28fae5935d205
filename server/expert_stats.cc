#include "server/expert_stats.h"

#include <algorithm>
#include <cmath>
#include <numeric>

namespace moe::server {

LayerImbalance ComputeImbalance(const LayerCounts& counts, int32_t top_k) {
  LayerImbalance out;
  const size_t n = counts.expert_counts.size();
  out.mean_probability.assign(n, 0.0);
  if (n == 0) return out;
  int64_t sum = 0;
  int64_t max = 0;
  for (int64_t c : counts.expert_counts) {
    sum += c;
    max = std::max(max, c);
    if (c == 0) ++out.dead_experts;
  }
  // Hottest three, ties to the lower id.
  std::vector<int32_t> order(n);
  std::iota(order.begin(), order.end(), 0);
  const size_t hot = std::min<size_t>(3, n);
  std::partial_sort(order.begin(), order.begin() + hot, order.end(), [&](int32_t a, int32_t b) {
    return counts.expert_counts[a] != counts.expert_counts[b]
               ? counts.expert_counts[a] > counts.expert_counts[b]
               : a < b;
  });
  if (sum > 0) out.hottest.assign(order.begin(), order.begin() + hot);
  if (counts.tokens > 0) {
    for (size_t i = 0; i < n && i < counts.probability_sum.size(); ++i) {
      out.mean_probability[i] = counts.probability_sum[i] / static_cast<double>(counts.tokens);
    }
    out.router_z = counts.router_z_sum / static_cast<double>(counts.tokens);
  }
  if (sum == 0) return out;
  const double mean = static_cast<double>(sum) / static_cast<double>(n);
  out.max_load_ratio = static_cast<double>(max) / mean;
  double var = 0.0;
  double entropy = 0.0;
  double switch_sum = 0.0;
  for (size_t i = 0; i < n; ++i) {
    const double c = static_cast<double>(counts.expert_counts[i]);
    var += (c - mean) * (c - mean);
    const double f = c / static_cast<double>(sum);
    if (f > 0.0) entropy -= f * std::log(f);
    switch_sum += f * out.mean_probability[i];
  }
  out.load_cv = std::sqrt(var / static_cast<double>(n)) / mean;
  out.entropy_ratio = n > 1 ? entropy / std::log(static_cast<double>(n)) : 1.0;
  out.switch_balance = static_cast<double>(n) * switch_sum;
  (void)top_k;  // f_i = c_i / (k T) = c_i / sum c_i: k is implied by the counts
  return out;
}

ExpertStatsAccumulator::ExpertStatsAccumulator(int32_t num_moe_layers, int32_t num_experts,
                                               int32_t top_k, int64_t window_steps)
    : num_moe_layers_(num_moe_layers),
      num_experts_(num_experts),
      top_k_(top_k),
      window_steps_(std::max<int64_t>(window_steps, kBuckets)),
      steps_per_bucket_(std::max<int64_t>(1, window_steps_ / kBuckets)) {
  absl::MutexLock lock(&mu_);
  since_start_ = Empty();
  current_ = Empty();
  scratch_.assign(num_experts_, 0);
}

SpanCounts ExpertStatsAccumulator::Empty() const {
  SpanCounts span;
  span.layers.resize(num_moe_layers_);
  for (LayerCounts& layer : span.layers) {
    layer.expert_counts.assign(num_experts_, 0);
    layer.probability_sum.assign(num_experts_, 0.0);
  }
  return span;
}

void ExpertStatsAccumulator::Add(SpanCounts& into, const SpanCounts& from) {
  into.steps += from.steps;
  into.tokens += from.tokens;
  for (size_t l = 0; l < into.layers.size() && l < from.layers.size(); ++l) {
    LayerCounts& a = into.layers[l];
    const LayerCounts& b = from.layers[l];
    a.tokens += b.tokens;
    a.router_z_sum += b.router_z_sum;
    for (size_t i = 0; i < a.expert_counts.size(); ++i) a.expert_counts[i] += b.expert_counts[i];
    for (size_t i = 0; i < a.probability_sum.size(); ++i) {
      a.probability_sum[i] += b.probability_sum[i];
    }
  }
}

void ExpertStatsAccumulator::Record(const ForwardBatch& batch, const StepRouting& routing) {
  const int64_t tokens = batch.num_tokens();
  absl::MutexLock lock(&mu_);
  for (SpanCounts* span : {&since_start_, &current_}) {
    ++span->steps;
    span->tokens += tokens;
  }
  const size_t layers = std::min<size_t>(routing.expert_ids.size(), num_moe_layers_);
  for (size_t l = 0; l < layers; ++l) {
    std::fill(scratch_.begin(), scratch_.end(), 0);
    for (int32_t expert : routing.expert_ids[l]) {
      if (expert >= 0 && expert < num_experts_) ++scratch_[expert];
    }
    const int64_t layer_tokens =
        top_k_ > 0 ? static_cast<int64_t>(routing.expert_ids[l].size()) / top_k_ : 0;
    for (SpanCounts* span : {&since_start_, &current_}) {
      LayerCounts& counts = span->layers[l];
      counts.tokens += layer_tokens;
      for (int32_t i = 0; i < num_experts_; ++i) counts.expert_counts[i] += scratch_[i];
      if (l < routing.probability_mass.size()) {
        const std::vector<double>& mass = routing.probability_mass[l];
        for (size_t i = 0; i < mass.size() && i < counts.probability_sum.size(); ++i) {
          counts.probability_sum[i] += mass[i];
        }
      }
      if (l < routing.router_z_sum.size()) counts.router_z_sum += routing.router_z_sum[l];
    }
  }
  if (current_.steps >= steps_per_bucket_) {
    full_buckets_.push_back(std::move(current_));
    while (static_cast<int64_t>(full_buckets_.size()) > kBuckets) full_buckets_.pop_front();
    current_ = Empty();
  }
}

ExpertStatsAccumulator::Snapshot ExpertStatsAccumulator::Get() const {
  Snapshot snapshot;
  snapshot.window = Empty();
  absl::MutexLock lock(&mu_);
  snapshot.since_start = since_start_;
  // Full buckets, dropping the oldest while the window without it still covers window_steps.
  int64_t steps = current_.steps;
  for (const SpanCounts& bucket : full_buckets_) steps += bucket.steps;
  size_t first = 0;
  while (first < full_buckets_.size() && steps - full_buckets_[first].steps >= window_steps_) {
    steps -= full_buckets_[first].steps;
    ++first;
  }
  for (size_t b = first; b < full_buckets_.size(); ++b) Add(snapshot.window, full_buckets_[b]);
  Add(snapshot.window, current_);
  return snapshot;
}

}  // namespace moe::server
