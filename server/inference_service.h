// InferenceService: moe.serving.v1.Inference on gRPC's callback API.
//
// Generate runs as a ServerWriteReactor. The engine calls the request's sink on its own thread;
// the sink only appends the event to the stream's pending response (coalescing tokens, text,
// logprobs and routing) and starts a write if none is in flight. The write-done callback (a
// gRPC thread) sends whatever accumulated meanwhile. So a slow reader costs the engine nothing
// and its pending data is bounded by its own max_tokens. A call with n completions submits n
// engine requests, each with its own sink and pending response; the writes take the
// completions with something to send in turn (still one write in flight).
//
// Lifecycle: the service answers UNAVAILABLE until SetEngine() (model loading) and again once
// StartDrain() was called; CancelAll() ends what is still running (UNAVAILABLE).
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>

#include "absl/container/flat_hash_map.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "absl/types/span.h"
#include "engine/engine.h"
#include "engine/tokenizer/tokenizer.h"
#include "moe/serving/v1/inference.grpc.pb.h"
#include "server/auth.h"
#include "server/expert_stats.h"
#include "server/request_validation.h"
#include "server/server_hooks.h"

namespace moe::server {

// What the service needs from the loaded model (owned by the caller, outliving the service's
// use of it: set once by SetEngine, valid until the gRPC server has shut down).
struct ServingModel {
  Engine* engine = nullptr;
  const Tokenizer* tokenizer = nullptr;  // null: token ids only
  ExpertStatsAccumulator* expert_stats = nullptr;
  serving::v1::ModelInfo info;
  RequestLimits limits;
  // Per-call observer factory (optional).
  std::function<std::unique_ptr<RequestObserver>(absl::Time arrival)> on_request;
};

// Generate and Tokenize take their requests as raw bytes and parse them here, so that a string
// field with invalid UTF-8 (which protobuf's parser refuses) gets an INVALID_ARGUMENT that names
// the field rather than gRPC's bare parse failure.
using InferenceServiceBase = serving::v1::Inference::WithRawCallbackMethod_Generate<
    serving::v1::Inference::WithRawCallbackMethod_Tokenize<
        serving::v1::Inference::CallbackService>>;

class InferenceService final : public InferenceServiceBase {
 public:
  InferenceService() = default;
  ~InferenceService() override;

  // Makes the service serve `model` (after the model loaded).
  void SetModel(ServingModel model);
  // Write one log line per finished request to stderr (default on).
  void set_log_requests(bool on) { log_requests_ = on; }
  // Require `authorization: Bearer <token>` on every call of this service (before Start).
  void set_auth(std::optional<BearerAuth> auth) { auth_ = std::move(auth); }
  // Refuses new Generate calls with UNAVAILABLE from now on.
  void StartDrain();
  // Generate calls not yet done.
  int64_t num_active() const;
  // Blocks until no Generate call is active or `deadline`; returns whether none is.
  bool WaitForIdle(absl::Time deadline) const;
  // Cancels every active Generate call in the engine; they end with UNAVAILABLE.
  void CancelAll();

  grpc::ServerWriteReactor<grpc::ByteBuffer>* Generate(grpc::CallbackServerContext* context,
                                                       const grpc::ByteBuffer* request) override;
  grpc::ServerUnaryReactor* Tokenize(grpc::CallbackServerContext* context,
                                     const grpc::ByteBuffer* request,
                                     grpc::ByteBuffer* response) override;
  grpc::ServerUnaryReactor* Detokenize(grpc::CallbackServerContext* context,
                                       const serving::v1::DetokenizeRequest* request,
                                       serving::v1::DetokenizeResponse* response) override;
  grpc::ServerUnaryReactor* GetModelInfo(grpc::CallbackServerContext* context,
                                         const serving::v1::GetModelInfoRequest* request,
                                         serving::v1::ModelInfo* response) override;
  grpc::ServerUnaryReactor* GetExpertStats(grpc::CallbackServerContext* context,
                                           const serving::v1::GetExpertStatsRequest* request,
                                           serving::v1::ExpertStats* response) override;

 private:
  class GenerateCall;
  friend class GenerateCall;

  // OK without authentication or with a valid token; else UNAUTHENTICATED.
  grpc::Status Authenticate(const grpc::CallbackServerContext& context) const;
  // Null while loading or draining (with the status to answer).
  const ServingModel* ModelOrStatus(grpc::Status* status) const;
  // ModelOrStatus, and FAILED_PRECONDITION when the model has no tokenizer.
  const ServingModel* ModelWithTokenizerOrStatus(grpc::Status* status) const;
  // The model once loaded, draining or not (for observers of refused calls).
  const ServingModel* model_if_loaded() const {
    return ready_.load(std::memory_order_acquire) ? &model_ : nullptr;
  }

  void Register(int64_t engine_id, std::function<void()> cancel);
  void CallStarted();
  // `engine_ids`: the call's engine requests (one per completion; -1 = never submitted).
  void CallDone(absl::Span<const int64_t> engine_ids);

  ServingModel model_;
  std::atomic<bool> ready_{false};
  std::atomic<bool> draining_{false};
  bool log_requests_ = true;
  std::optional<BearerAuth> auth_;
  std::atomic<int64_t> next_request_number_{1};

  mutable absl::Mutex mu_;
  int64_t active_calls_ ABSL_GUARDED_BY(mu_) = 0;
  // Engine id -> how to cancel that call for shutdown.
  absl::flat_hash_map<int64_t, std::function<void()>> shutdown_cancels_ ABSL_GUARDED_BY(mu_);
};

}  // namespace moe::server
