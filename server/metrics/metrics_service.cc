#include "server/metrics/metrics_service.h"

#include "engine/common/status_macros.h"

namespace moe::server {
namespace {

class MetricsRequestObserver final : public RequestObserver {
 public:
  MetricsRequestObserver(std::shared_ptr<ServingMetrics> metrics, absl::Time arrival)
      : metrics_(std::move(metrics)), timer_(metrics_.get(), arrival) {}

  void OnTokens(int32_t count, absl::Time now) override { timer_.OnTokens(count, now); }

  void OnFinished(const RequestEvent* final_event, grpc::StatusCode code, absl::Time now) override {
    if (final_event == nullptr) {
      metrics_->OnRejected(GrpcCodeName(code));
    } else {
      timer_.OnFinished(*final_event, GrpcCodeName(code), now);
    }
  }

 private:
  std::shared_ptr<ServingMetrics> metrics_;
  ServingMetrics::RequestTimer timer_;
};

}  // namespace

absl::string_view GrpcCodeName(grpc::StatusCode code) {
  static constexpr absl::string_view kNames[] = {"OK",
                                                 "CANCELLED",
                                                 "UNKNOWN",
                                                 "INVALID_ARGUMENT",
                                                 "DEADLINE_EXCEEDED",
                                                 "NOT_FOUND",
                                                 "ALREADY_EXISTS",
                                                 "PERMISSION_DENIED",
                                                 "RESOURCE_EXHAUSTED",
                                                 "FAILED_PRECONDITION",
                                                 "ABORTED",
                                                 "OUT_OF_RANGE",
                                                 "UNIMPLEMENTED",
                                                 "INTERNAL",
                                                 "UNAVAILABLE",
                                                 "DATA_LOSS",
                                                 "UNAUTHENTICATED"};
  const int index = static_cast<int>(code);
  return index >= 0 && index < static_cast<int>(std::size(kNames)) ? kNames[index] : "UNKNOWN";
}

absl::StatusOr<std::unique_ptr<MetricsService>> MetricsService::Start(
    const std::string& address, int port, std::string model_name, ExpertMetrics expert_metrics) {
  std::unique_ptr<MetricsService> service(
      new MetricsService(std::move(model_name), expert_metrics));
  ASSIGN_OR_RETURN(service->http_, MetricsHttpServer::Start(address, port, [raw = service.get()] {
                     return raw->Render();
                   }));
  return service;
}

std::string MetricsService::Render() {
  std::shared_ptr<ServingMetrics> metrics;
  {
    absl::MutexLock lock(&mu_);
    metrics = metrics_;
  }
  return metrics == nullptr ? std::string() : metrics->Render();
}

HooksFactory MetricsService::MakeHooksFactory() {
  return [this](const LoadedModel& model) {
    ModelDescription description{model_name_,
                                 *model.config,
                                 *model.parameters,
                                 model.info->dtype(),
                                 model.info->backend(),
                                 model.info->kv_cache_dtype(),
                                 model.info->kv_capacity_tokens()};
    auto metrics =
        std::make_shared<ServingMetrics>(description, model.expert_stats, expert_metrics_);
    {
      absl::MutexLock lock(&mu_);
      metrics_ = metrics;
    }
    ServerHooks hooks;
    hooks.on_step = [metrics](const EngineStepInfo& info) { metrics->OnStep(info); };
    hooks.on_routing = [metrics](const ForwardBatch& batch, const StepRouting& routing) {
      metrics->OnRouting(batch, routing);
    };
    hooks.on_request = [metrics](absl::Time arrival) -> std::unique_ptr<RequestObserver> {
      return std::make_unique<MetricsRequestObserver>(metrics, arrival);
    };
    return hooks;
  };
}

}  // namespace moe::server
