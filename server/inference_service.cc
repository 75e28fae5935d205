#include "server/inference_service.h"

#include <chrono>
#include <cstdio>
#include <optional>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "grpcpp/support/byte_buffer.h"
#include "grpcpp/support/proto_buffer_reader.h"
#include "server/status_util.h"

namespace moe::server {
namespace {

namespace v1 = ::moe::serving::v1;

v1::FinishReason ToProto(FinishReason reason) {
  switch (reason) {
    case FinishReason::kStopToken:
      return v1::FINISH_REASON_STOP;
    case FinishReason::kStopString:
      return v1::FINISH_REASON_STOP_STRING;
    case FinishReason::kLength:
      return v1::FINISH_REASON_LENGTH;
    default:
      return v1::FINISH_REASON_UNSPECIFIED;
  }
}

// The raw bytes of a ByteBuffer.
std::string BufferBytes(const grpc::ByteBuffer& buffer) {
  std::vector<grpc::Slice> slices;
  std::string out;
  if (!buffer.Dump(&slices).ok()) return out;
  for (const grpc::Slice& slice : slices) {
    out.append(reinterpret_cast<const char*>(slice.begin()), slice.size());
  }
  return out;
}

// Parses a request; on failure, INVALID_ARGUMENT naming the field with invalid UTF-8, if any.
template <typename Message>
grpc::Status ParseRequest(const grpc::ByteBuffer& buffer, Message* message,
                          std::initializer_list<StringField> string_fields) {
  grpc::ByteBuffer copy(buffer);
  if (grpc::GenericDeserialize<grpc::ProtoBufferReader, Message>(&copy, message).ok()) {
    return grpc::Status::OK;
  }
  return ToGrpcStatus(
      ExplainParseFailure(BufferBytes(buffer), string_fields, Message::descriptor()->full_name()));
}

absl::Time DeadlineOf(const grpc::CallbackServerContext& context) {
  const auto deadline = context.deadline();
  if (deadline == std::chrono::system_clock::time_point::max()) return absl::InfiniteFuture();
  return absl::FromChrono(deadline);
}

}  // namespace

// One Generate call. Engine-side state lives in `Shared` (the sink holds a reference, so an
// event arriving after the call is done finds `call == nullptr` and is dropped).
// StartWrite / StartWriteAndFinish / Finish are called with shared_->mu held: gRPC 1.51 never
// runs OnWriteDone or OnDone inline from them (their tags are not inlineable; OnDone goes to
// the executor), so the reactions cannot re-enter the lock.
class InferenceService::GenerateCall final : public grpc::ServerWriteReactor<grpc::ByteBuffer> {
 public:
  GenerateCall(InferenceService* service, grpc::CallbackServerContext* context,
               const grpc::ByteBuffer& raw_request)
      : service_(service), context_(context), arrival_(absl::Now()) {
    shared_ = std::make_shared<Shared>();
    shared_->call = this;
    service_->CallStarted();
    if (const ServingModel* model = service_->model_if_loaded();
        model != nullptr && model->on_request) {
      absl::MutexLock lock(&shared_->mu);
      shared_->observer = model->on_request(arrival_);
    }
    if (grpc::Status auth = service_->Authenticate(*context_); !auth.ok()) {
      absl::MutexLock lock(&shared_->mu);
      request_id_ = absl::StrCat("req-", service_->next_request_number_.fetch_add(1));
      FinishLocked(auth, "unauthenticated");
      return;
    }
    v1::GenerateRequest request;
    const grpc::Status parsed = ParseRequest(raw_request, &request, kGenerateRequestStringFields);
    if (!parsed.ok()) {
      absl::MutexLock lock(&shared_->mu);
      request_id_ = absl::StrCat("req-", service_->next_request_number_.fetch_add(1));
      FinishLocked(parsed, "invalid");
      return;
    }
    Start(request);
  }

  void OnWriteDone(bool ok) override {
    absl::MutexLock lock(&shared_->mu);
    write_in_flight_ = false;
    if (!ok) {
      // The client went away mid-write; OnCancel follows (or already ran).
      FinishLocked(grpc::Status(grpc::StatusCode::CANCELLED, "write failed: client gone"),
                   "client_gone");
      CancelInEngine();
      return;
    }
    MaybeWriteLocked();
  }

  void OnCancel() override {
    absl::MutexLock lock(&shared_->mu);
    const bool expired = absl::Now() >= deadline_;
    FinishLocked(
        expired ? grpc::Status(grpc::StatusCode::DEADLINE_EXCEEDED, "the request's deadline passed")
                : grpc::Status(grpc::StatusCode::CANCELLED, "cancelled by the client"),
        expired ? "deadline" : "cancelled");
    CancelInEngine();
  }

  void OnDone() override {
    int64_t engine_id = -1;
    {
      absl::MutexLock lock(&shared_->mu);
      shared_->call = nullptr;
      engine_id = engine_id_;
    }
    InferenceService* service = service_;
    delete this;
    service->CallDone(engine_id);
  }

 private:
  struct Shared {
    absl::Mutex mu;
    GenerateCall* call ABSL_GUARDED_BY(mu) = nullptr;
    // Hooks (metrics): reported once the status is known and the engine is done with it.
    std::unique_ptr<RequestObserver> observer ABSL_GUARDED_BY(mu);
    bool in_engine ABSL_GUARDED_BY(mu) = false;
    bool engine_done ABSL_GUARDED_BY(mu) = false;
    RequestEvent final_event ABSL_GUARDED_BY(mu);  // metadata only
    std::optional<grpc::StatusCode> code ABSL_GUARDED_BY(mu);

    void MaybeReportLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu) {
      if (observer == nullptr || !code.has_value() || (in_engine && !engine_done)) return;
      observer->OnFinished(in_engine ? &final_event : nullptr, *code, absl::Now());
      observer.reset();
    }
  };

  // The final event without its tokens, text and routing.
  static RequestEvent Metadata(const RequestEvent& event) {
    RequestEvent meta;
    meta.request_id = event.request_id;
    meta.finished = event.finished;
    meta.finish_reason = event.finish_reason;
    meta.status = event.status;
    meta.matched_stop_string = event.matched_stop_string;
    meta.num_prompt_tokens = event.num_prompt_tokens;
    meta.num_generated_tokens = event.num_generated_tokens;
    meta.num_cached_prompt_tokens = event.num_cached_prompt_tokens;
    meta.queue_time = event.queue_time;
    meta.prefill_time = event.prefill_time;
    meta.decode_time = event.decode_time;
    return meta;
  }

  void Start(const v1::GenerateRequest& request) {
    grpc::Status refusal;
    const ServingModel* model = service_->ModelOrStatus(&refusal);
    request_id_ = request.request_id();
    if (request_id_.empty()) {
      request_id_ = absl::StrCat("req-", service_->next_request_number_.fetch_add(1));
    }
    absl::MutexLock lock(&shared_->mu);
    if (model == nullptr) {
      FinishLocked(refusal, "refused");
      return;
    }
    model_ = model;
    absl::StatusOr<GenerateRequest> engine_request =
        BuildEngineRequest(request, model->tokenizer, model->limits);
    if (!engine_request.ok()) {
      FinishLocked(ToGrpcStatus(engine_request.status()), "invalid");
      return;
    }
    deadline_ = DeadlineOf(*context_);
    engine_request->deadline = deadline_;
    return_prompt_routing_ = request.return_prompt_routing();
    num_moe_layers_ = model->info.num_moe_layers();
    prompt_tokens_ = static_cast<int32_t>(engine_request->prompt_token_ids.size());
    pending_.set_request_id(request_id_);

    std::shared_ptr<Shared> shared = shared_;
    EventSink sink = [shared](RequestEvent event) {
      absl::MutexLock lock(&shared->mu);
      const bool finished = event.finished;
      if (shared->observer != nullptr && !event.tokens.empty()) {
        shared->observer->OnTokens(static_cast<int32_t>(event.tokens.size()), absl::Now());
      }
      if (finished) {
        shared->engine_done = true;
        shared->final_event = Metadata(event);
      }
      if (shared->call != nullptr) shared->call->OnEventLocked(std::move(event));
      if (finished) shared->MaybeReportLocked();
    };
    shared_->in_engine = true;  // until Submit says otherwise
    // The engine may call the sink before Submit returns: release the lock meanwhile.
    shared_->mu.Unlock();
    absl::StatusOr<int64_t> id = model->engine->Submit(*std::move(engine_request), sink);
    shared_->mu.Lock();
    if (!id.ok()) {
      shared_->in_engine = false;
      FinishLocked(
          ToGrpcStatus(id.status()),
          id.status().code() == absl::StatusCode::kResourceExhausted ? "overloaded" : "refused");
      return;
    }
    engine_id_ = *id;
    Engine* engine = model->engine;
    service_->Register(engine_id_, [shared, engine, id = engine_id_] {
      {
        absl::MutexLock lock(&shared->mu);
        if (shared->call != nullptr) shared->call->shutdown_cancel_ = true;
      }
      engine->Cancel(id);
    });
    if (cancel_requested_) CancelInEngine();
  }

  // Engine thread, under shared_->mu.
  void OnEventLocked(RequestEvent event) {
    if (finished_) return;
    const absl::Time now = absl::Now();
    for (const GeneratedToken& token : event.tokens) {
      if (first_token_time_ == absl::InfinitePast()) first_token_time_ = now;
      pending_.add_token_ids(token.token_id);
      if (model_ != nullptr && !token.top_logprobs.empty()) {
        v1::GeneratedTokenLogprobs* lp = pending_.add_logprobs();
        lp->mutable_chosen()->set_token_id(token.token_id);
        lp->mutable_chosen()->set_logprob(token.logprob);
        for (const TokenLogprob& top : token.top_logprobs) {
          v1::TokenLogprob* entry = lp->add_top();
          entry->set_token_id(top.token_id);
          entry->set_logprob(top.logprob);
        }
      }
    }
    pending_.mutable_text()->append(event.text);
    for (const TokenRouting& routing : event.routing) {
      if (!return_prompt_routing_ && routing.position < prompt_tokens_) continue;
      v1::TokenRouting* out = pending_.add_routing();
      out->set_position(routing.position);
      const int32_t layers = num_moe_layers_;
      const size_t top_k = layers > 0 ? routing.expert_ids.size() / layers : 0;
      for (int32_t l = 0; l < layers; ++l) {
        v1::LayerRouting* layer = out->add_layers();
        layer->set_layer(model_->info.moe_layer_indices(l));
        for (size_t k = 0; k < top_k; ++k) {
          const size_t at = l * top_k + k;
          layer->add_expert_ids(routing.expert_ids[at]);
          if (at < routing.expert_weights.size()) layer->add_weights(routing.expert_weights[at]);
        }
      }
    }
    if (!event.finished) {
      MaybeWriteLocked();
      return;
    }
    final_event_ = true;
    reason_ = event.finish_reason;
    prompt_tokens_ = event.num_prompt_tokens;
    completion_tokens_ = event.num_generated_tokens;
    cached_tokens_ = event.num_cached_prompt_tokens;
    queue_time_ = event.queue_time;
    switch (event.finish_reason) {
      case FinishReason::kStopToken:
      case FinishReason::kStopString:
      case FinishReason::kLength: {
        pending_.set_finish_reason(ToProto(event.finish_reason));
        pending_.set_matched_stop_string(event.matched_stop_string);
        v1::Usage* usage = pending_.mutable_usage();
        usage->set_prompt_tokens(event.num_prompt_tokens);
        usage->set_completion_tokens(event.num_generated_tokens);
        usage->set_cached_prompt_tokens(event.num_cached_prompt_tokens);
        const int64_t active = model_->info.parameters().active_per_token();
        usage->set_active_parameters_per_token(active);
        usage->set_active_parameters_used(active * (static_cast<int64_t>(event.num_prompt_tokens) -
                                                    event.num_cached_prompt_tokens +
                                                    event.num_generated_tokens));
        v1::Timing* timing = pending_.mutable_timing();
        if (first_token_time_ != absl::InfinitePast()) {
          timing->set_time_to_first_token_seconds(
              absl::ToDoubleSeconds(first_token_time_ - arrival_));
        }
        timing->set_total_seconds(absl::ToDoubleSeconds(now - arrival_));
        timing->set_queue_seconds(absl::ToDoubleSeconds(event.queue_time));
        timing->set_prefill_seconds(absl::ToDoubleSeconds(event.prefill_time));
        timing->set_decode_seconds(absl::ToDoubleSeconds(event.decode_time));
        final_status_ = grpc::Status::OK;
        break;
      }
      case FinishReason::kCancelled:
        final_status_ =
            shutdown_cancel_
                ? grpc::Status(grpc::StatusCode::UNAVAILABLE,
                               "the server is shutting down and its drain timeout passed before "
                               "this request finished")
                : grpc::Status(grpc::StatusCode::CANCELLED, "the request was cancelled");
        break;
      case FinishReason::kDeadline:
        final_status_ = grpc::Status(grpc::StatusCode::DEADLINE_EXCEEDED,
                                     "the request's deadline passed during generation");
        break;
      case FinishReason::kError:
        final_status_ =
            ToGrpcStatus(event.status.ok() ? absl::InternalError("engine error") : event.status);
        break;
    }
    MaybeWriteLocked();
  }

  // Sends what is pending if no write is in flight; the last message goes with Finish.
  void MaybeWriteLocked() {
    if (finished_ || write_in_flight_) return;
    if (final_event_) {
      if (final_status_.ok()) {
        Serialize();
        LogLocked("ok");
        finished_ = true;
        shared_->code = grpc::StatusCode::OK;
        shared_->MaybeReportLocked();
        StartWriteAndFinish(&in_flight_, grpc::WriteOptions(), grpc::Status::OK);
      } else {
        FinishLocked(final_status_, "");
      }
      return;
    }
    if (pending_.token_ids_size() == 0 && pending_.text().empty() && pending_.routing_size() == 0) {
      return;
    }
    Serialize();
    pending_.set_request_id(request_id_);
    write_in_flight_ = true;
    StartWrite(&in_flight_);
  }

  // pending_ -> in_flight_ (bytes); pending_ is cleared.
  void Serialize() {
    bool own = false;
    in_flight_.Clear();
    grpc::SerializationTraits<v1::GenerateResponse>::Serialize(pending_, &in_flight_, &own);
    pending_.Clear();
  }

  void FinishLocked(const grpc::Status& status, absl::string_view what) {
    if (finished_) return;
    finished_ = true;
    LogLocked(what.empty() ? "" : what, &status);
    shared_->code = status.error_code();
    shared_->MaybeReportLocked();
    Finish(status);
  }

  void CancelInEngine() {
    cancel_requested_ = true;
    if (engine_id_ >= 0 && model_ != nullptr && !final_event_) model_->engine->Cancel(engine_id_);
  }

  void LogLocked(absl::string_view what, const grpc::Status* status = nullptr) {
    if (!service_->log_requests_) return;
    const absl::Time now = absl::Now();
    const int code = status ? static_cast<int>(status->error_code()) : 0;
    std::string finish = std::string(what);
    if (final_event_) finish = std::string(FinishReasonName(reason_));
    const double ttft_ms = first_token_time_ == absl::InfinitePast()
                               ? -1.0
                               : absl::ToDoubleMilliseconds(first_token_time_ - arrival_);
    std::string line = absl::StrFormat(
        "request id=%s engine_id=%d prompt_tokens=%d completion_tokens=%d cached_tokens=%d "
        "queue_ms=%.2f ttft_ms=%.2f total_ms=%.2f finish=%s code=%d",
        request_id_, engine_id_, prompt_tokens_, completion_tokens_, cached_tokens_,
        absl::ToDoubleMilliseconds(queue_time_), ttft_ms,
        absl::ToDoubleMilliseconds(now - arrival_), finish, code);
    if (status != nullptr && !status->ok()) {
      absl::StrAppend(&line, " message=\"", status->error_message(), "\"");
    }
    line += "\n";
    std::fputs(line.c_str(), stderr);
  }

  InferenceService* const service_;
  grpc::CallbackServerContext* const context_;
  std::shared_ptr<Shared> shared_;
  const absl::Time arrival_;

  // Guarded by shared_->mu.
  const ServingModel* model_ = nullptr;
  std::string request_id_;
  int64_t engine_id_ = -1;
  absl::Time deadline_ = absl::InfiniteFuture();
  bool return_prompt_routing_ = false;
  int32_t num_moe_layers_ = 0;
  v1::GenerateResponse pending_;
  grpc::ByteBuffer in_flight_;
  bool write_in_flight_ = false;
  bool final_event_ = false;
  bool finished_ = false;
  bool cancel_requested_ = false;
  bool shutdown_cancel_ = false;
  grpc::Status final_status_;
  FinishReason reason_ = FinishReason::kLength;
  absl::Time first_token_time_ = absl::InfinitePast();
  int32_t prompt_tokens_ = 0;
  int32_t completion_tokens_ = 0;
  int32_t cached_tokens_ = 0;
  absl::Duration queue_time_;
};

InferenceService::~InferenceService() = default;

void InferenceService::SetModel(ServingModel model) {
  model_ = std::move(model);
  ready_.store(true, std::memory_order_release);
}

void InferenceService::StartDrain() { draining_.store(true, std::memory_order_release); }

grpc::Status InferenceService::Authenticate(const grpc::CallbackServerContext& context) const {
  if (!auth_.has_value()) return grpc::Status::OK;
  const auto& metadata = context.client_metadata();
  const auto found = metadata.find("authorization");
  if (found == metadata.end()) {
    return grpc::Status(grpc::StatusCode::UNAUTHENTICATED,
                        "missing `authorization: Bearer <token>` metadata");
  }
  if (metadata.count("authorization") != 1 ||
      !auth_->Check(absl::string_view(found->second.data(), found->second.size()))) {
    return grpc::Status(grpc::StatusCode::UNAUTHENTICATED, "invalid bearer token");
  }
  return grpc::Status::OK;
}

const ServingModel* InferenceService::ModelOrStatus(grpc::Status* status) const {
  if (draining_.load(std::memory_order_acquire)) {
    *status = grpc::Status(grpc::StatusCode::UNAVAILABLE,
                           "the server is shutting down (draining); retry on another replica");
    return nullptr;
  }
  if (!ready_.load(std::memory_order_acquire)) {
    *status = grpc::Status(grpc::StatusCode::UNAVAILABLE, "the model is still loading; retry");
    return nullptr;
  }
  return &model_;
}

const ServingModel* InferenceService::ModelWithTokenizerOrStatus(grpc::Status* status) const {
  const ServingModel* model = ModelOrStatus(status);
  if (model != nullptr && model->tokenizer == nullptr) {
    *status = grpc::Status(grpc::StatusCode::FAILED_PRECONDITION,
                           "the model directory has no tokenizer.json");
    return nullptr;
  }
  return model;
}

int64_t InferenceService::num_active() const {
  absl::MutexLock lock(&mu_);
  return active_calls_;
}

bool InferenceService::WaitForIdle(absl::Time deadline) const {
  absl::MutexLock lock(&mu_);
  auto idle = [this]() ABSL_SHARED_LOCKS_REQUIRED(mu_) { return active_calls_ == 0; };
  mu_.AwaitWithDeadline(absl::Condition(&idle), deadline);
  return active_calls_ == 0;
}

void InferenceService::CancelAll() {
  std::vector<std::function<void()>> cancels;
  {
    absl::MutexLock lock(&mu_);
    for (auto& [id, cancel] : shutdown_cancels_) cancels.push_back(cancel);
  }
  for (auto& cancel : cancels) cancel();
}

void InferenceService::Register(int64_t engine_id, std::function<void()> cancel) {
  absl::MutexLock lock(&mu_);
  shutdown_cancels_[engine_id] = std::move(cancel);
}

void InferenceService::CallStarted() {
  absl::MutexLock lock(&mu_);
  ++active_calls_;
}

void InferenceService::CallDone(int64_t engine_id) {
  absl::MutexLock lock(&mu_);
  --active_calls_;
  if (engine_id >= 0) shutdown_cancels_.erase(engine_id);
}

grpc::ServerWriteReactor<grpc::ByteBuffer>* InferenceService::Generate(
    grpc::CallbackServerContext* context, const grpc::ByteBuffer* request) {
  return new GenerateCall(this, context, *request);
}

grpc::ServerUnaryReactor* InferenceService::Tokenize(grpc::CallbackServerContext* context,
                                                     const grpc::ByteBuffer* raw_request,
                                                     grpc::ByteBuffer* raw_response) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  if (grpc::Status auth = Authenticate(*context); !auth.ok()) {
    reactor->Finish(auth);
    return reactor;
  }
  v1::TokenizeRequest parsed_request;
  grpc::Status status = ParseRequest(raw_request ? *raw_request : grpc::ByteBuffer(),
                                     &parsed_request, {{{1}, "text", false}});
  if (!status.ok()) {
    reactor->Finish(status);
    return reactor;
  }
  const v1::TokenizeRequest* request = &parsed_request;
  v1::TokenizeResponse response_message;
  v1::TokenizeResponse* response = &response_message;
  const ServingModel* model = ModelWithTokenizerOrStatus(&status);
  if (model == nullptr) {
    reactor->Finish(status);
    return reactor;
  }
  if (const int64_t bad = FindInvalidUtf8(request->text()); bad >= 0) {
    reactor->Finish(grpc::Status(
        grpc::StatusCode::INVALID_ARGUMENT,
        absl::StrCat("text: invalid UTF-8 at byte ", bad, "; the text must be valid UTF-8")));
    return reactor;
  }
  EncodeOptions options;
  options.add_special_tokens =
      request->has_add_special_tokens() ? request->add_special_tokens() : true;
  absl::StatusOr<std::vector<int32_t>> ids = model->tokenizer->Encode(request->text(), options);
  if (!ids.ok()) {
    reactor->Finish(ToGrpcStatus(
        absl::Status(ids.status().code(), absl::StrCat("text: ", ids.status().message()))));
    return reactor;
  }
  for (int32_t id : *ids) {
    response->add_token_ids(id);
    if (request->return_pieces()) {
      response->add_pieces(model->tokenizer->IdToToken(id).value_or(""));
    }
  }
  bool own = false;
  reactor->Finish(
      grpc::SerializationTraits<v1::TokenizeResponse>::Serialize(*response, raw_response, &own));
  return reactor;
}

grpc::ServerUnaryReactor* InferenceService::Detokenize(grpc::CallbackServerContext* context,
                                                       const v1::DetokenizeRequest* request,
                                                       v1::DetokenizeResponse* response) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  if (grpc::Status auth = Authenticate(*context); !auth.ok()) {
    reactor->Finish(auth);
    return reactor;
  }
  grpc::Status status;
  const ServingModel* model = ModelWithTokenizerOrStatus(&status);
  if (model == nullptr) {
    reactor->Finish(status);
    return reactor;
  }
  const int32_t vocab = model->limits.vocab_size;
  if (request->token_ids_size() > model->limits.context_length) {
    reactor->Finish(grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                                 absl::StrCat("token_ids: ", request->token_ids_size(),
                                              " ids is not allowed; at most the context length, ",
                                              model->limits.context_length)));
    return reactor;
  }
  for (int i = 0; i < request->token_ids_size(); ++i) {
    const int32_t id = request->token_ids(i);
    if (id < 0 || id >= vocab) {
      reactor->Finish(
          grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                       absl::StrCat("token_ids[", i, "]: ", id,
                                    " is not allowed; token ids must be in [0, ", vocab, ")")));
      return reactor;
    }
  }
  std::vector<int32_t> ids(request->token_ids().begin(), request->token_ids().end());
  const bool skip = request->has_skip_special_tokens() ? request->skip_special_tokens() : true;
  absl::StatusOr<std::string> text = model->tokenizer->Decode(ids, skip);
  if (!text.ok()) {
    reactor->Finish(ToGrpcStatus(text.status()));
    return reactor;
  }
  response->set_text(*std::move(text));
  reactor->Finish(grpc::Status::OK);
  return reactor;
}

grpc::ServerUnaryReactor* InferenceService::GetModelInfo(grpc::CallbackServerContext* context,
                                                         const v1::GetModelInfoRequest* request,
                                                         v1::ModelInfo* response) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  if (grpc::Status auth = Authenticate(*context); !auth.ok()) {
    reactor->Finish(auth);
    return reactor;
  }
  grpc::Status status;
  const ServingModel* model = ModelOrStatus(&status);
  if (model != nullptr) *response = model->info;
  reactor->Finish(status);
  return reactor;
}

namespace {

void FillSpan(const SpanCounts& counts, const v1::ModelInfo& info, int32_t top_k, bool summary_only,
              v1::LoadSpan* out) {
  out->set_steps(counts.steps);
  out->set_tokens(counts.tokens);
  for (size_t l = 0; l < counts.layers.size(); ++l) {
    const LayerCounts& layer = counts.layers[l];
    const LayerImbalance figures = ComputeImbalance(layer, top_k);
    v1::LayerLoad* load = out->add_layers();
    load->set_layer(static_cast<int>(l) < info.moe_layer_indices_size()
                        ? info.moe_layer_indices(static_cast<int>(l))
                        : static_cast<int32_t>(l));
    load->set_tokens(layer.tokens);
    if (!summary_only) {
      for (int64_t c : layer.expert_counts) load->add_expert_counts(c);
      for (double p : figures.mean_probability) load->add_mean_router_probability(p);
    }
    load->set_max_load_ratio(figures.max_load_ratio);
    load->set_load_cv(figures.load_cv);
    load->set_entropy_ratio(figures.entropy_ratio);
    load->set_switch_balance(figures.switch_balance);
    load->set_router_z(figures.router_z);
    load->set_dead_experts(figures.dead_experts);
    for (int32_t e : figures.hottest) load->add_hottest_experts(e);
  }
}

}  // namespace

grpc::ServerUnaryReactor* InferenceService::GetExpertStats(grpc::CallbackServerContext* context,
                                                           const v1::GetExpertStatsRequest* request,
                                                           v1::ExpertStats* response) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  if (grpc::Status auth = Authenticate(*context); !auth.ok()) {
    reactor->Finish(auth);
    return reactor;
  }
  grpc::Status status;
  const ServingModel* model = ModelOrStatus(&status);
  if (model == nullptr) {
    reactor->Finish(status);
    return reactor;
  }
  const ExpertStatsAccumulator& stats = *model->expert_stats;
  const ExpertStatsAccumulator::Snapshot snapshot = stats.Get();
  response->set_num_experts(stats.num_experts());
  response->set_top_k(stats.top_k());
  response->set_window_steps(stats.window_steps());
  FillSpan(snapshot.window, model->info, stats.top_k(), request->summary_only(),
           response->mutable_window());
  FillSpan(snapshot.since_start, model->info, stats.top_k(), request->summary_only(),
           response->mutable_since_start());
  reactor->Finish(grpc::Status::OK);
  return reactor;
}

}  // namespace moe::server
