#include "server/metrics/serving_metrics.h"

#include <algorithm>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "prometheus/text_serializer.h"

namespace moe::server {
namespace {

using prometheus::Histogram;
using prometheus::Labels;

// Latency buckets: vLLM's sets (operators' dashboards carry over), extended down to 1 ms.
const Histogram::BucketBoundaries kTimeToFirstTokenBuckets = {
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1,  0.25,  0.5,   0.75,
    1.0,   2.5,   5.0,  7.5,  10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0};
const Histogram::BucketBoundaries kPerTokenBuckets = {
    0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1,  0.15,
    0.2,   0.3,    0.4,   0.5,  0.75,  1.0,  2.5,   5.0,  7.5,  10.0, 20.0,  40.0, 80.0};
const Histogram::BucketBoundaries kRequestPhaseBuckets = {
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1,  0.25,  0.5,   0.8,   1.0,   1.5,    2.0,   2.5,
    5.0,   10.0,  15.0, 20.0,  30.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0};
const Histogram::BucketBoundaries kIterationTokenBuckets = {1,   8,    16,   32,   64,   128,  256,
                                                            512, 1024, 2048, 4096, 8192, 16384};
const Histogram::BucketBoundaries kIterationRequestBuckets = {1,  2,   4,   8,   16,  32,
                                                              64, 128, 256, 512, 1024};

constexpr const char* kPhases[] = {"prefill", "decode", "mixed"};
constexpr int kHotRanks = 3;

// "stop" for both stop tokens and stop strings, else the engine's name.
std::string FinishedReasonLabel(FinishReason reason) {
  if (reason == FinishReason::kStopToken || reason == FinishReason::kStopString) return "stop";
  return std::string(FinishReasonName(reason));
}

// The step's phase: "decode" when every sequence contributed one token to an existing
// context, "prefill" when none did, "mixed" otherwise.
int PhaseOf(const ForwardBatch& batch) {
  int decodes = 0;
  for (const SequenceChunk& chunk : batch.sequences) {
    if (chunk.num_tokens == 1 && chunk.context_len > 1) ++decodes;
  }
  if (decodes == 0) return 0;
  if (decodes == static_cast<int>(batch.sequences.size())) return 1;
  return 2;
}

Histogram::BucketBoundaries ExpertCountBuckets(int32_t num_experts) {
  Histogram::BucketBoundaries buckets;
  for (int32_t b = 1; b < num_experts; b *= 2) buckets.push_back(b);
  buckets.push_back(num_experts);
  return buckets;
}

}  // namespace

ServingMetrics::ServingMetrics(const ModelDescription& model,
                               const ExpertStatsAccumulator* expert_stats,
                               ExpertMetrics expert_metrics)
    : model_name_(model.name),
      config_(model.config),
      non_expert_parameters_(model.parameters.non_expert),
      parameters_per_expert_(model.parameters.params_per_routed_expert),
      shared_expert_parameters_(model.parameters.shared_expert),
      expert_stats_(expert_stats),
      registry_(std::make_shared<prometheus::Registry>()) {
  const Labels model_label = {{"model", model_name_}};
  auto histogram = [&](const std::string& name, const std::string& help,
                       const Histogram::BucketBoundaries& buckets) {
    return &prometheus::BuildHistogram()
                .Name("moeserve_" + name)
                .Help(help)
                .Labels(model_label)
                .Register(*registry_)
                .Add({}, buckets);
  };
  auto counter = [&](const std::string& name, const std::string& help) {
    return &prometheus::BuildCounter()
                .Name("moeserve_" + name)
                .Help(help)
                .Labels(model_label)
                .Register(*registry_)
                .Add({});
  };
  auto gauge = [&](const std::string& name, const std::string& help) {
    return &prometheus::BuildGauge()
                .Name("moeserve_" + name)
                .Help(help)
                .Labels(model_label)
                .Register(*registry_)
                .Add({});
  };

  // ---- serving ---------------------------------------------------------------------------------
  time_to_first_token_ =
      histogram("time_to_first_token_seconds", "Request arrival to its first streamed token.",
                kTimeToFirstTokenBuckets);
  inter_token_latency_ =
      histogram("inter_token_latency_seconds",
                "Gap between consecutive streamed tokens of a request.", kPerTokenBuckets);
  time_per_output_token_ =
      histogram("request_time_per_output_token_seconds",
                "Per request: (last token - first token) / (output tokens - 1).", kPerTokenBuckets);
  e2e_latency_ =
      histogram("e2e_request_latency_seconds", "Request arrival to its end.", kRequestPhaseBuckets);
  queue_time_ = histogram("request_queue_time_seconds", "Engine submit to first scheduled step.",
                          kRequestPhaseBuckets);
  prefill_time_ = histogram("request_prefill_time_seconds",
                            "First scheduled step to first generated token.", kRequestPhaseBuckets);
  decode_time_ = histogram("request_decode_time_seconds", "First generated token to the end.",
                           kRequestPhaseBuckets);
  prompt_tokens_ = counter("prompt_tokens_total", "Prompt tokens of finished requests.");
  generation_tokens_ = counter("generation_tokens_total", "Generated tokens.");
  cached_prompt_tokens_ =
      counter("prompt_tokens_cached_total", "Prompt tokens served from the prefix cache.");
  requests_ = &prometheus::BuildCounter()
                   .Name("moeserve_requests_total")
                   .Help("Finished requests by finish reason and gRPC status code.")
                   .Labels(model_label)
                   .Register(*registry_);
  for (const auto& [reason, code] :
       std::vector<std::pair<const char*, const char*>>{{"stop", "OK"},
                                                        {"length", "OK"},
                                                        {"cancelled", "CANCELLED"},
                                                        {"deadline", "DEADLINE_EXCEEDED"},
                                                        {"error", "INTERNAL"},
                                                        {"rejected", "INVALID_ARGUMENT"},
                                                        {"rejected", "RESOURCE_EXHAUSTED"},
                                                        {"rejected", "UNAVAILABLE"}}) {
    requests_->Add({{"finished_reason", reason}, {"code", code}});  // zeros from the start
  }
  running_ = gauge("num_requests_running", "Sequences in the running batch.");
  waiting_ = gauge("num_requests_waiting", "Requests waiting to be scheduled.");
  kv_usage_ = gauge("kv_cache_usage_ratio", "KV cache blocks in use / total.");
  preemptions_ = counter("num_preemptions_total", "Sequences preempted (recomputed later).");
  iteration_tokens_ =
      histogram("iteration_tokens", "Tokens per engine step.", kIterationTokenBuckets);
  iteration_requests_ =
      histogram("iteration_requests", "Sequences per engine step.", kIterationRequestBuckets);

  // ---- model -----------------------------------------------------------------------------------
  prometheus::BuildGauge()
      .Name("moeserve_model_info")
      .Help("Static description of the loaded model (value 1).")
      .Labels(model_label)
      .Register(*registry_)
      .Add({{"architecture", config_.architecture_name},
            {"layers", std::to_string(config_.num_layers)},
            {"moe_layers", std::to_string(config_.num_moe_layers())},
            {"experts", std::to_string(config_.num_experts)},
            {"top_k", std::to_string(config_.top_k)},
            {"shared_experts", config_.shared_expert_intermediate_size > 0 ? "1" : "0"},
            {"dtype", model.dtype},
            {"backend", model.backend},
            {"kv_cache_dtype", model.kv_cache_dtype}})
      .Set(1);
  gauge("kv_cache_capacity_tokens", "Tokens the paged KV cache holds (all blocks).")
      ->Set(static_cast<double>(model.kv_capacity_tokens));
  auto& parameters = prometheus::BuildGauge()
                         .Name("moeserve_model_parameters")
                         .Help("Parameters of the loaded model, counted from its tensors.")
                         .Labels(model_label)
                         .Register(*registry_);
  parameters.Add({{"kind", "total"}}).Set(static_cast<double>(model.parameters.total));
  parameters.Add({{"kind", "active_per_token"}})
      .Set(static_cast<double>(model.parameters.active_per_token));
  parameters.Add({{"kind", "routed_expert"}})
      .Set(static_cast<double>(model.parameters.routed_expert));
  parameters.Add({{"kind", "shared_expert"}})
      .Set(static_cast<double>(model.parameters.shared_expert));
  parameters.Add({{"kind", "non_expert"}}).Set(static_cast<double>(model.parameters.non_expert));

  // ---- MoE -------------------------------------------------------------------------------------
  gauge("moe_stats_window_steps", "Engine steps in the window of the moe_layer_* gauges.")
      ->Set(expert_stats_ != nullptr ? static_cast<double>(expert_stats_->window_steps()) : 0);
  auto per_layer_gauges = [&](const std::string& name, const std::string& help) {
    return &prometheus::BuildGauge()
                .Name("moeserve_" + name)
                .Help(help)
                .Labels(model_label)
                .Register(*registry_);
  };
  auto& routed = prometheus::BuildCounter()
                     .Name("moeserve_moe_routed_tokens_total")
                     .Help("Token-to-expert assignments (top_k per token) per MoE layer.")
                     .Labels(model_label)
                     .Register(*registry_);
  auto* max_load = per_layer_gauges("moe_layer_max_load_ratio",
                                    "max_i c_i / mean_i c_i over the window (1 = even).");
  auto* cv = per_layer_gauges("moe_layer_load_cv", "std / mean of the expert loads c_i.");
  auto* entropy = per_layer_gauges("moe_layer_routing_entropy_ratio",
                                   "Entropy of the load distribution / ln N (1 = uniform).");
  auto* balance = per_layer_gauges("moe_layer_switch_balance",
                                   "N * sum_i f_i P_i (Switch Transformer term; 1 = uniform).");
  auto* z = per_layer_gauges("moe_layer_router_z",
                             "Mean over tokens of logsumexp(router logits)^2 (ST-MoE z).");
  auto* dead = per_layer_gauges("moe_layer_dead_experts", "Experts with no tokens in the window.");
  auto* hot = per_layer_gauges("moe_hot_expert", "Id of the rank-th most loaded expert.");
  auto* hot_ratio = per_layer_gauges("moe_hot_expert_load_ratio",
                                     "Load of the rank-th most loaded expert / mean load.");
  auto* full = expert_metrics == ExpertMetrics::kFull
                   ? &prometheus::BuildCounter()
                          .Name("moeserve_moe_expert_routed_tokens_total")
                          .Help("Tokens routed to each expert of each MoE layer (opt-in).")
                          .Labels(model_label)
                          .Register(*registry_)
                   : nullptr;
  for (int32_t layer = 0; layer < config_.num_layers; ++layer) {
    if (!config_.layer_is_moe[layer]) continue;
    const Labels layer_label = {{"layer", std::to_string(layer)}};
    routed_tokens_.push_back(&routed.Add(layer_label));
    max_load_ratio_.push_back(&max_load->Add(layer_label));
    load_cv_.push_back(&cv->Add(layer_label));
    entropy_ratio_.push_back(&entropy->Add(layer_label));
    switch_balance_.push_back(&balance->Add(layer_label));
    router_z_.push_back(&z->Add(layer_label));
    dead_experts_.push_back(&dead->Add(layer_label));
    hot_expert_.emplace_back();
    hot_expert_load_ratio_.emplace_back();
    for (int rank = 1; rank <= kHotRanks; ++rank) {
      const Labels rank_labels = {{"layer", std::to_string(layer)}, {"rank", std::to_string(rank)}};
      hot_expert_.back().push_back(&hot->Add(rank_labels));
      hot_expert_load_ratio_.back().push_back(&hot_ratio->Add(rank_labels));
    }
    if (full != nullptr) {
      expert_routed_tokens_.emplace_back();
      for (int32_t expert = 0; expert < config_.num_experts; ++expert) {
        expert_routed_tokens_.back().push_back(
            &full->Add({{"layer", std::to_string(layer)}, {"expert", std::to_string(expert)}}));
      }
    }
  }
  auto& activated = prometheus::BuildHistogram()
                        .Name("moeserve_moe_activated_experts")
                        .Help("Distinct experts touched per (MoE layer, engine step).")
                        .Labels(model_label)
                        .Register(*registry_);
  auto& activated_parameters =
      prometheus::BuildCounter()
          .Name("moeserve_moe_activated_parameters_total")
          .Help("Weights actually read: non-expert + shared + distinct experts x expert size.")
          .Labels(model_label)
          .Register(*registry_);
  for (const char* phase : kPhases) {
    activated_experts_.push_back(
        &activated.Add({{"phase", phase}}, ExpertCountBuckets(std::max(1, config_.num_experts))));
    activated_parameters_.push_back(&activated_parameters.Add({{"phase", phase}}));
  }
}

void ServingMetrics::OnStep(const EngineStepInfo& info) {
  running_->Set(info.num_running);
  waiting_->Set(info.num_waiting);
  kv_usage_->Set(info.kv_total_blocks > 0
                     ? static_cast<double>(info.kv_used_blocks) / info.kv_total_blocks
                     : 0.0);
  if (info.num_preempted > 0) preemptions_->Increment(info.num_preempted);
  iteration_tokens_->Observe(info.num_scheduled_tokens);
  iteration_requests_->Observe(info.num_scheduled_sequences);
}

void ServingMetrics::OnRouting(const ForwardBatch& batch, const StepRouting& routing) {
  const int phase = PhaseOf(batch);
  std::vector<int64_t> per_expert(std::max(1, config_.num_experts));
  double parameters_read = static_cast<double>(non_expert_parameters_ + shared_expert_parameters_);
  for (size_t layer = 0; layer < routing.expert_ids.size() && layer < routed_tokens_.size();
       ++layer) {
    const std::vector<int32_t>& ids = routing.expert_ids[layer];
    routed_tokens_[layer]->Increment(static_cast<double>(ids.size()));
    std::fill(per_expert.begin(), per_expert.end(), 0);
    for (int32_t id : ids) {
      if (id >= 0 && id < config_.num_experts) ++per_expert[id];
    }
    int64_t distinct = 0;
    for (int32_t expert = 0; expert < config_.num_experts; ++expert) {
      if (per_expert[expert] == 0) continue;
      ++distinct;
      if (!expert_routed_tokens_.empty()) {
        expert_routed_tokens_[layer][expert]->Increment(static_cast<double>(per_expert[expert]));
      }
    }
    activated_experts_[phase]->Observe(static_cast<double>(distinct));
    parameters_read += static_cast<double>(distinct * parameters_per_expert_);
  }
  activated_parameters_[phase]->Increment(parameters_read);
}

void ServingMetrics::RequestTimer::OnTokens(int32_t count, absl::Time now) {
  if (count <= 0) return;
  if (first_token_ == absl::InfinitePast()) {
    first_token_ = now;
    metrics_->time_to_first_token_->Observe(absl::ToDoubleSeconds(now - arrival_));
  } else {
    metrics_->inter_token_latency_->Observe(absl::ToDoubleSeconds(now - last_token_));
  }
  // Tokens that arrive together (coalesced) are 0 s apart.
  for (int32_t i = 1; i < count; ++i) metrics_->inter_token_latency_->Observe(0.0);
  last_token_ = now;
  tokens_ += count;
}

void ServingMetrics::RequestTimer::OnFinished(const RequestEvent& final_event,
                                              absl::string_view code, absl::Time now) {
  metrics_->e2e_latency_->Observe(absl::ToDoubleSeconds(now - arrival_));
  metrics_->queue_time_->Observe(absl::ToDoubleSeconds(final_event.queue_time));
  metrics_->prefill_time_->Observe(absl::ToDoubleSeconds(final_event.prefill_time));
  metrics_->decode_time_->Observe(absl::ToDoubleSeconds(final_event.decode_time));
  if (tokens_ > 1) {
    metrics_->time_per_output_token_->Observe(absl::ToDoubleSeconds(last_token_ - first_token_) /
                                              (tokens_ - 1));
  }
  metrics_->prompt_tokens_->Increment(final_event.num_prompt_tokens);
  metrics_->generation_tokens_->Increment(final_event.num_generated_tokens);
  metrics_->cached_prompt_tokens_->Increment(final_event.num_cached_prompt_tokens);
  metrics_->RecordFinished(FinishedReasonLabel(final_event.finish_reason), code);
}

void ServingMetrics::OnRejected(absl::string_view code) { RecordFinished("rejected", code); }

void ServingMetrics::RecordFinished(absl::string_view finished_reason, absl::string_view code) {
  // Bounded: a handful of reasons x the 17 gRPC codes.
  requests_->Add({{"finished_reason", std::string(finished_reason)}, {"code", std::string(code)}})
      .Increment();
}

void ServingMetrics::RefreshExpertGauges() {
  if (expert_stats_ == nullptr) return;
  const ExpertStatsAccumulator::Snapshot snapshot = expert_stats_->Get();
  const int32_t top_k = expert_stats_->top_k();
  for (size_t layer = 0; layer < snapshot.window.layers.size() && layer < max_load_ratio_.size();
       ++layer) {
    const LayerCounts& counts = snapshot.window.layers[layer];
    const LayerImbalance imbalance = ComputeImbalance(counts, top_k);
    max_load_ratio_[layer]->Set(imbalance.max_load_ratio);
    load_cv_[layer]->Set(imbalance.load_cv);
    entropy_ratio_[layer]->Set(imbalance.entropy_ratio);
    switch_balance_[layer]->Set(imbalance.switch_balance);
    router_z_[layer]->Set(imbalance.router_z);
    dead_experts_[layer]->Set(imbalance.dead_experts);
    int64_t total = 0;
    for (int64_t c : counts.expert_counts) total += c;
    const double mean = counts.expert_counts.empty()
                            ? 0.0
                            : static_cast<double>(total) / counts.expert_counts.size();
    for (int rank = 0; rank < kHotRanks; ++rank) {
      const bool known = rank < static_cast<int>(imbalance.hottest.size()) && mean > 0;
      const int32_t expert = known ? imbalance.hottest[rank] : -1;
      hot_expert_[layer][rank]->Set(expert);
      hot_expert_load_ratio_[layer][rank]->Set(known ? counts.expert_counts[expert] / mean : 0.0);
    }
  }
}

std::string ServingMetrics::Render() {
  RefreshExpertGauges();
  std::ostringstream out;
  prometheus::TextSerializer().Serialize(out, registry_->Collect());
  return out.str();
}

}  // namespace moe::server
