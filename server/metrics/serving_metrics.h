// ServingMetrics: everything moe-serve exports on /metrics (see ../shared/METRICS.md and the
// README's metrics table). Serving latency and token counters per request, scheduler state
// per engine step, model description and parameter counts at start, and MoE expert load per
// layer from the engine's exact routing record.
//
// Threads: OnStep / OnRouting run on the engine thread (cheap: counters, one pass over the
// step's expert ids); request hooks on gRPC or engine threads; Render on the metrics thread.
// prometheus-cpp metrics are thread-safe; label handles are created once, up front.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "engine/engine.h"
#include "engine/model/model_config.h"
#include "engine/model/model_weights.h"
#include "prometheus/counter.h"
#include "prometheus/gauge.h"
#include "prometheus/histogram.h"
#include "prometheus/registry.h"
#include "server/expert_stats.h"

namespace moe::server {

struct ModelDescription {
  std::string name;  // the `model` label
  ModelConfig config;
  ParameterCounts parameters;
  std::string dtype;                   // e.g. "bf16"
  std::string backend;                 // e.g. "cpu"
  std::string kv_cache_dtype = "f32";  // "f32" or "bf16"
  int64_t kv_capacity_tokens = 0;      // tokens the paged KV pool holds
};

enum class ExpertMetrics { kDefault, kFull };  // kFull adds the [layer, expert] counter matrix

class ServingMetrics {
 public:
  // `expert_stats` (not owned, may be null) feeds the windowed MoE gauges at each scrape.
  ServingMetrics(const ModelDescription& model, const ExpertStatsAccumulator* expert_stats,
                 ExpertMetrics expert_metrics);

  // ---- engine thread ---------------------------------------------------------------------------
  void OnStep(const EngineStepInfo& info);
  void OnRouting(const ForwardBatch& batch, const StepRouting& routing);

  // ---- requests --------------------------------------------------------------------------------
  // One request's timeline: create at arrival, report tokens as they are streamed, finish once.
  class RequestTimer {
   public:
    RequestTimer(ServingMetrics* metrics, absl::Time arrival)
        : metrics_(metrics), arrival_(arrival) {}
    // `count` tokens reached the client's stream at `now`.
    void OnTokens(int32_t count, absl::Time now);
    // The final event (engine totals and phase times) and the gRPC status code name.
    void OnFinished(const RequestEvent& final_event, absl::string_view code, absl::Time now);

   private:
    ServingMetrics* metrics_;
    absl::Time arrival_;
    absl::Time first_token_ = absl::InfinitePast();
    absl::Time last_token_ = absl::InfinitePast();
    int32_t tokens_ = 0;
  };
  // A request that ended before reaching the engine (invalid, overloaded, draining).
  void OnRejected(absl::string_view code);

  // Prometheus text format of all metrics (refreshes the windowed MoE gauges first).
  std::string Render();

  prometheus::Registry& registry() { return *registry_; }

 private:
  void RecordFinished(absl::string_view finished_reason, absl::string_view code);
  void RefreshExpertGauges();

  const std::string model_name_;
  const ModelConfig config_;
  const int64_t non_expert_parameters_;
  const int64_t parameters_per_expert_;
  const int64_t shared_expert_parameters_;
  const ExpertStatsAccumulator* expert_stats_;
  std::shared_ptr<prometheus::Registry> registry_;

  // Serving.
  prometheus::Histogram* time_to_first_token_;
  prometheus::Histogram* inter_token_latency_;
  prometheus::Histogram* time_per_output_token_;
  prometheus::Histogram* e2e_latency_;
  prometheus::Histogram* queue_time_;
  prometheus::Histogram* prefill_time_;
  prometheus::Histogram* decode_time_;
  prometheus::Counter* prompt_tokens_;
  prometheus::Counter* generation_tokens_;
  prometheus::Counter* cached_prompt_tokens_;
  prometheus::Family<prometheus::Counter>* requests_;
  prometheus::Gauge* running_;
  prometheus::Gauge* waiting_;
  prometheus::Gauge* kv_usage_;
  prometheus::Counter* preemptions_;
  prometheus::Histogram* iteration_tokens_;
  prometheus::Histogram* iteration_requests_;

  // MoE, per MoE layer (index = MoE layer order; label = model layer index).
  std::vector<prometheus::Counter*> routed_tokens_;
  std::vector<prometheus::Gauge*> max_load_ratio_;
  std::vector<prometheus::Gauge*> load_cv_;
  std::vector<prometheus::Gauge*> entropy_ratio_;
  std::vector<prometheus::Gauge*> switch_balance_;
  std::vector<prometheus::Gauge*> router_z_;
  std::vector<prometheus::Gauge*> dead_experts_;
  std::vector<std::vector<prometheus::Gauge*>> hot_expert_;              // [layer][rank]
  std::vector<std::vector<prometheus::Gauge*>> hot_expert_load_ratio_;   // [layer][rank]
  std::vector<std::vector<prometheus::Counter*>> expert_routed_tokens_;  // opt-in [layer][e]
  // Per phase ("prefill", "decode", "mixed").
  std::vector<prometheus::Histogram*> activated_experts_;
  std::vector<prometheus::Counter*> activated_parameters_;
};

}  // namespace moe::server
