// MetricsService: /metrics of a running moe-serve. The endpoint is up from the start (empty
// until the model is loaded, so Prometheus sees the target while it loads); the metrics are
// created when MoeServer hands over the loaded model through the hooks factory.
#pragma once

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "server/metrics/metrics_http_server.h"
#include "server/metrics/serving_metrics.h"
#include "server/server_hooks.h"

namespace moe::server {

class MetricsService {
 public:
  // Serves GET /metrics on address:port; `model_name` is the `model` label of every series.
  static absl::StatusOr<std::unique_ptr<MetricsService>> Start(const std::string& address, int port,
                                                               std::string model_name,
                                                               ExpertMetrics expert_metrics);

  // For ServerOptions::make_hooks: builds the metrics from the loaded model and returns the
  // observers that feed them.
  HooksFactory MakeHooksFactory();

  int port() const { return http_->port(); }

 private:
  MetricsService(std::string model_name, ExpertMetrics expert_metrics)
      : model_name_(std::move(model_name)), expert_metrics_(expert_metrics) {}
  std::string Render();

  const std::string model_name_;
  const ExpertMetrics expert_metrics_;
  absl::Mutex mu_;
  std::shared_ptr<ServingMetrics> metrics_ ABSL_GUARDED_BY(mu_);
  std::unique_ptr<MetricsHttpServer> http_;
};

// "OK", "CANCELLED", ... (the names gRPC documents; the `code` label of requests_total).
absl::string_view GrpcCodeName(grpc::StatusCode code);

}  // namespace moe::server
