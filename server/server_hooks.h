// Observers of the serving path, for the metrics component (server/metrics). All optional; a
// MoeServer without hooks behaves the same.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>

#include "absl/time/time.h"
#include "engine/engine.h"
#include "engine/model/model_config.h"
#include "engine/model/model_weights.h"
#include "engine/ops/batch.h"
#include "grpcpp/support/status.h"
#include "moe/serving/v1/inference.pb.h"
#include "server/expert_stats.h"

namespace moe::server {

// One Generate call's timeline.
class RequestObserver {
 public:
  virtual ~RequestObserver() = default;
  // `count` generated tokens were queued to the call's stream (engine thread).
  virtual void OnTokens(int32_t count, absl::Time now) = 0;
  // Called once, when the call's gRPC status is decided and, if the request entered the
  // engine, the engine's final event has arrived (for a client cancel or deadline, that is
  // after the status). `final_event` (tokens, text and routing left out) is null when the
  // request never entered the engine (invalid, overloaded, loading, draining).
  virtual void OnFinished(const RequestEvent* final_event, grpc::StatusCode code,
                          absl::Time now) = 0;
};

struct ServerHooks {
  std::function<void(const EngineStepInfo&)> on_step;                       // engine thread
  std::function<void(const ForwardBatch&, const StepRouting&)> on_routing;  // engine thread
  // At each Generate call's arrival (gRPC thread); may return null.
  std::function<std::unique_ptr<RequestObserver>(absl::Time arrival)> on_request;
};

// What the hooks may need to know about the model, handed over during MoeServer::LoadModel.
struct LoadedModel {
  const ModelConfig* config = nullptr;
  const ParameterCounts* parameters = nullptr;
  // Complete once LoadModel returns (context_length and max_prompt_tokens are set last).
  const serving::v1::ModelInfo* info = nullptr;
  const ExpertStatsAccumulator* expert_stats = nullptr;
};

using HooksFactory = std::function<ServerHooks(const LoadedModel&)>;

}  // namespace moe::server
