#include "server/inference_service.h"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <optional>
#include <span>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "grpcpp/support/byte_buffer.h"
#include "grpcpp/support/proto_buffer_reader.h"
#include "server/completion_text.h"
#include "server/reasoning_splitter.h"
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
                          absl::Span<const StringField> string_fields) {
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

// One Generate call of n >= 1 completions, each an engine request of its own. Engine-side state
// lives in `Shared` (every completion's sink holds a reference, so an event arriving after the
// call is done finds `call == nullptr` and is dropped).
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
      shared_->observed[0].observer = model->on_request(arrival_);
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
    std::vector<int64_t> engine_ids;
    {
      absl::MutexLock lock(&shared_->mu);
      shared_->call = nullptr;
      for (const Completion& completion : completions_) {
        engine_ids.push_back(completion.engine_id);
      }
    }
    InferenceService* service = service_;
    delete this;
    service->CallDone(engine_ids);
  }

 private:
  struct Shared {
    // What the hooks (metrics) need of one completion: it is one request for them, reported
    // once the call's status is known and the engine is done with it.
    struct Observed {
      std::unique_ptr<RequestObserver> observer;
      bool in_engine = false;
      bool engine_done = false;
      RequestEvent final_event;  // metadata only
    };

    absl::Mutex mu;
    GenerateCall* call ABSL_GUARDED_BY(mu) = nullptr;
    // One per completion. [0] exists from the call's arrival, so a call refused before it is
    // submitted reports as one request; the others get an observer when they are submitted.
    std::vector<Observed> observed ABSL_GUARDED_BY(mu) = std::vector<Observed>(1);
    std::optional<grpc::StatusCode> code ABSL_GUARDED_BY(mu);

    void MaybeReportLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu) {
      if (!code.has_value()) return;
      for (Observed& o : observed) {
        if (o.observer == nullptr || (o.in_engine && !o.engine_done)) continue;
        o.observer->OnFinished(o.in_engine ? &o.final_event : nullptr, *code, absl::Now());
        o.observer.reset();
      }
    }
  };

  // The stream state of one completion (guarded by shared_->mu).
  struct Completion {
    int64_t engine_id = -1;  // -1 until submitted
    v1::GenerateResponse pending;
    bool final_event = false;   // the engine's final event arrived
    bool last_written = false;  // its last response was handed to gRPC
    grpc::Status final_status;
    FinishReason reason = FinishReason::kLength;
    absl::Time first_token_time = absl::InfinitePast();
    int32_t prompt_tokens = 0;
    int32_t completion_tokens = 0;
    int32_t cached_tokens = 0;
    absl::Duration queue_time;
    std::optional<CompletionText> text;  // set in Start
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
    // Every completion exists before the first is submitted, so the call cannot end OK while
    // some are still to be submitted.
    const int n = std::max(1, request.n());
    completions_.resize(n);
    shared_->observed.resize(n);
    unwritten_ = n;
    bool opens_reasoning = false;
    if (request.separate_reasoning()) {
      // The prompt's last few tokens tell whether it opened the block (a tokenizer is there:
      // BuildEngineRequest checked).
      const std::vector<int32_t>& prompt = engine_request->prompt_token_ids;
      const size_t tail = std::min<size_t>(prompt.size(), 8);
      absl::StatusOr<std::string> text = model->tokenizer->Decode(
          std::span<const int32_t>(prompt.data() + prompt.size() - tail, tail));
      opens_reasoning = text.ok() && PromptOpensReasoning(*text);
    }
    for (int i = 0; i < n; ++i) {
      completions_[i].prompt_tokens = prompt_tokens_;
      completions_[i].pending.set_request_id(request_id_);
      completions_[i].pending.set_index(i);
      completions_[i].text.emplace(request.separate_reasoning(), opens_reasoning,
                                   request.parse_tool_calls());
    }
    for (int i = 0; i < n; ++i) {
      GenerateRequest copy = i + 1 < n ? *engine_request : *std::move(engine_request);
      if (copy.sampling.seed.has_value()) *copy.sampling.seed += static_cast<uint64_t>(i);
      if (!SubmitLocked(i, std::move(copy))) return;
    }
  }

  // Submits completion `index`; false when the call ends: the engine refused it (the call fails
  // with that status and the completions before it are cancelled), or the call failed or was
  // cancelled meanwhile.
  bool SubmitLocked(int index, GenerateRequest engine_request) {
    if (index > 0 && model_->on_request) {
      shared_->observed[index].observer = model_->on_request(arrival_);
    }
    std::shared_ptr<Shared> shared = shared_;
    EventSink sink = [shared, index](RequestEvent event) {
      absl::MutexLock lock(&shared->mu);
      Shared::Observed& observed = shared->observed[index];
      const bool finished = event.finished;
      if (observed.observer != nullptr && !event.tokens.empty()) {
        observed.observer->OnTokens(static_cast<int32_t>(event.tokens.size()), absl::Now());
      }
      if (finished) {
        observed.engine_done = true;
        observed.final_event = Metadata(event);
      }
      if (shared->call != nullptr) shared->call->OnEventLocked(index, std::move(event));
      if (finished) shared->MaybeReportLocked();
    };
    shared_->observed[index].in_engine = true;  // until Submit says otherwise
    // The engine may call the sink before Submit returns: release the lock meanwhile.
    shared_->mu.Unlock();
    absl::StatusOr<int64_t> id = model_->engine->Submit(std::move(engine_request), sink);
    shared_->mu.Lock();
    if (!id.ok()) {
      shared_->observed[index].in_engine = false;
      shared_->MaybeReportLocked();  // in case the call ended meanwhile
      FailLocked(
          ToGrpcStatus(id.status()),
          id.status().code() == absl::StatusCode::kResourceExhausted ? "overloaded" : "refused");
      return false;
    }
    completions_[index].engine_id = *id;
    Engine* engine = model_->engine;
    service_->Register(*id, [shared, engine, id = *id] {
      {
        absl::MutexLock lock(&shared->mu);
        if (shared->call != nullptr) shared->call->shutdown_cancel_ = true;
      }
      engine->Cancel(id);
    });
    if (cancel_requested_ || finished_) {
      CancelInEngine();
      return false;
    }
    return true;
  }

  // Engine thread, under shared_->mu.
  void OnEventLocked(int index, RequestEvent event) {
    if (finished_) return;
    Completion& completion = completions_[index];
    v1::GenerateResponse& pending = completion.pending;
    const absl::Time now = absl::Now();
    for (const GeneratedToken& token : event.tokens) {
      if (completion.first_token_time == absl::InfinitePast()) completion.first_token_time = now;
      pending.add_token_ids(token.token_id);
      if (model_ != nullptr && !token.top_logprobs.empty()) {
        v1::GeneratedTokenLogprobs* lp = pending.add_logprobs();
        lp->mutable_chosen()->set_token_id(token.token_id);
        lp->mutable_chosen()->set_logprob(token.logprob);
        for (const TokenLogprob& top : token.top_logprobs) {
          v1::TokenLogprob* entry = lp->add_top();
          entry->set_token_id(top.token_id);
          entry->set_logprob(top.logprob);
        }
      }
    }
    completion.text->Append(event.text, event.finished, pending);
    for (const PromptTokenLogprob& scored : event.prompt_logprobs) {
      v1::PromptTokenLogprob* out = pending.add_prompt_logprobs();
      out->set_position(scored.position);
      out->set_token_id(scored.token_id);
      out->set_logprob(scored.logprob);
    }
    for (const TokenRouting& routing : event.routing) {
      if (!return_prompt_routing_ && routing.position < prompt_tokens_) continue;
      v1::TokenRouting* out = pending.add_routing();
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
    completion.final_event = true;
    completion.reason = event.finish_reason;
    completion.prompt_tokens = event.num_prompt_tokens;
    completion.completion_tokens = event.num_generated_tokens;
    completion.cached_tokens = event.num_cached_prompt_tokens;
    completion.queue_time = event.queue_time;
    switch (event.finish_reason) {
      case FinishReason::kStopToken:
      case FinishReason::kStopString:
      case FinishReason::kLength: {
        pending.set_finish_reason(ToProto(event.finish_reason));
        pending.set_matched_stop_string(event.matched_stop_string);
        v1::Usage* usage = pending.mutable_usage();
        usage->set_prompt_tokens(event.num_prompt_tokens);
        usage->set_completion_tokens(event.num_generated_tokens);
        usage->set_cached_prompt_tokens(event.num_cached_prompt_tokens);
        const int64_t active = model_->info.parameters().active_per_token();
        usage->set_active_parameters_per_token(active);
        usage->set_active_parameters_used(active * (static_cast<int64_t>(event.num_prompt_tokens) -
                                                    event.num_cached_prompt_tokens +
                                                    event.num_generated_tokens));
        v1::Timing* timing = pending.mutable_timing();
        if (completion.first_token_time != absl::InfinitePast()) {
          timing->set_time_to_first_token_seconds(
              absl::ToDoubleSeconds(completion.first_token_time - arrival_));
        }
        timing->set_total_seconds(absl::ToDoubleSeconds(now - arrival_));
        timing->set_queue_seconds(absl::ToDoubleSeconds(event.queue_time));
        timing->set_prefill_seconds(absl::ToDoubleSeconds(event.prefill_time));
        timing->set_decode_seconds(absl::ToDoubleSeconds(event.decode_time));
        completion.final_status = grpc::Status::OK;
        break;
      }
      case FinishReason::kCancelled:
        completion.final_status =
            shutdown_cancel_
                ? grpc::Status(grpc::StatusCode::UNAVAILABLE,
                               "the server is shutting down and its drain timeout passed before "
                               "this request finished")
                : grpc::Status(grpc::StatusCode::CANCELLED, "the request was cancelled");
        break;
      case FinishReason::kDeadline:
        completion.final_status = grpc::Status(grpc::StatusCode::DEADLINE_EXCEEDED,
                                               "the request's deadline passed during generation");
        break;
      case FinishReason::kError:
        completion.final_status =
            ToGrpcStatus(event.status.ok() ? absl::InternalError("engine error") : event.status);
        break;
    }
    if (completion.final_status.ok()) {
      MaybeWriteLocked();
    } else {
      FailLocked(completion.final_status, "");
    }
  }

  // Ends the call with `status` as soon as no write is in flight, and cancels the completions
  // still in the engine. The first failure decides (the cancelled ones' own events then
  // change nothing).
  void FailLocked(const grpc::Status& status, absl::string_view what) {
    if (!failure_.has_value()) {
      failure_ = status;
      failure_what_ = std::string(what);
    }
    CancelInEngine();
    MaybeWriteLocked();
  }

  // Sends what is pending if no write is in flight, taking the completions in turn from the
  // one after the last written; the last message (of the last completion to finish) goes with
  // Finish. A failed completion ends the call with its status.
  void MaybeWriteLocked() {
    if (finished_ || write_in_flight_) return;
    if (failure_.has_value()) {
      FinishLocked(*failure_, failure_what_);
      return;
    }
    const int n = static_cast<int>(completions_.size());
    for (int k = 0; k < n; ++k) {
      const int index = (next_write_ + k) % n;
      Completion& completion = completions_[index];
      const v1::GenerateResponse& pending = completion.pending;
      if (completion.last_written) continue;
      if (completion.final_event) {
        completion.last_written = true;
        if (--unwritten_ == 0) {
          Serialize(completion);
          LogLocked("ok");
          finished_ = true;
          shared_->code = grpc::StatusCode::OK;
          shared_->MaybeReportLocked();
          StartWriteAndFinish(&in_flight_, grpc::WriteOptions(), grpc::Status::OK);
          return;
        }
      } else if (pending.token_ids_size() == 0 && pending.text().empty() &&
                 pending.reasoning_text().empty() && pending.tool_calls_size() == 0 &&
                 pending.routing_size() == 0 && pending.prompt_logprobs_size() == 0) {
        continue;
      }
      Serialize(completion);
      next_write_ = (index + 1) % n;
      write_in_flight_ = true;
      StartWrite(&in_flight_);
      return;
    }
  }

  // completion.pending -> in_flight_ (bytes); pending keeps only its request id and index.
  void Serialize(Completion& completion) {
    bool own = false;
    in_flight_.Clear();
    grpc::SerializationTraits<v1::GenerateResponse>::Serialize(completion.pending, &in_flight_,
                                                               &own);
    const int32_t index = completion.pending.index();
    completion.pending.Clear();
    completion.pending.set_request_id(request_id_);
    completion.pending.set_index(index);
  }

  void FinishLocked(const grpc::Status& status, absl::string_view what) {
    if (finished_) return;
    finished_ = true;
    LogLocked(what.empty() ? "" : what, &status);
    shared_->code = status.error_code();
    shared_->MaybeReportLocked();
    Finish(status);
  }

  // Cancels every submitted completion the engine has not finished.
  void CancelInEngine() {
    cancel_requested_ = true;
    if (model_ == nullptr) return;
    for (const Completion& completion : completions_) {
      if (completion.engine_id >= 0 && !completion.final_event) {
        model_->engine->Cancel(completion.engine_id);
      }
    }
  }

  // One line per completion.
  void LogLocked(absl::string_view what, const grpc::Status* status = nullptr) {
    if (!service_->log_requests_) return;
    const absl::Time now = absl::Now();
    const int code = status ? static_cast<int>(status->error_code()) : 0;
    std::string lines;
    for (size_t i = 0; i < completions_.size(); ++i) {
      const Completion& completion = completions_[i];
      std::string finish = std::string(what);
      if (completion.final_event) finish = std::string(FinishReasonName(completion.reason));
      const double ttft_ms =
          completion.first_token_time == absl::InfinitePast()
              ? -1.0
              : absl::ToDoubleMilliseconds(completion.first_token_time - arrival_);
      absl::StrAppendFormat(
          &lines,
          "request id=%s index=%d engine_id=%d prompt_tokens=%d completion_tokens=%d "
          "cached_tokens=%d queue_ms=%.2f ttft_ms=%.2f total_ms=%.2f finish=%s code=%d",
          request_id_, i, completion.engine_id, completion.prompt_tokens,
          completion.completion_tokens, completion.cached_tokens,
          absl::ToDoubleMilliseconds(completion.queue_time), ttft_ms,
          absl::ToDoubleMilliseconds(now - arrival_), finish, code);
      if (status != nullptr && !status->ok()) {
        absl::StrAppend(&lines, " message=\"", status->error_message(), "\"");
      }
      lines += "\n";
    }
    std::fputs(lines.c_str(), stderr);
  }

  InferenceService* const service_;
  grpc::CallbackServerContext* const context_;
  std::shared_ptr<Shared> shared_;
  const absl::Time arrival_;

  // Guarded by shared_->mu.
  const ServingModel* model_ = nullptr;
  std::string request_id_;
  absl::Time deadline_ = absl::InfiniteFuture();
  bool return_prompt_routing_ = false;
  int32_t num_moe_layers_ = 0;
  int32_t prompt_tokens_ = 0;
  // One per completion; one until Start knows n (a call refused before logs one line).
  std::vector<Completion> completions_ = std::vector<Completion>(1);
  int unwritten_ = 1;   // completions whose last response was not yet handed to gRPC
  int next_write_ = 0;  // the completion whose turn it is to write
  // The first failure (a completion's, or a refused submission's) and what to log for it.
  std::optional<grpc::Status> failure_;
  std::string failure_what_;
  grpc::ByteBuffer in_flight_;
  bool write_in_flight_ = false;
  bool finished_ = false;
  bool cancel_requested_ = false;
  bool shutdown_cancel_ = false;
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

void InferenceService::CallDone(absl::Span<const int64_t> engine_ids) {
  absl::MutexLock lock(&mu_);
  --active_calls_;
  for (int64_t engine_id : engine_ids) {
    if (engine_id >= 0) shutdown_cancels_.erase(engine_id);
  }
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
                                     &parsed_request, kTokenizeRequestStringFields);
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
  absl::StatusOr<std::vector<int32_t>> ids;
  if (request->has_chat()) {
    if (!request->text().empty()) {
      reactor->Finish(grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                                   "text: not allowed together with chat; set one of them"));
      return reactor;
    }
    absl::StatusOr<EncodedChat> chat =
        EncodeChatPrompt(request->chat(), model->tokenizer, model->limits);
    if (chat.ok()) {
      response->set_chat_text(std::move(chat->text));
      ids = std::move(chat->token_ids);
    } else {
      ids = chat.status();
    }
  } else {
    EncodeOptions options;
    options.add_special_tokens =
        request->has_add_special_tokens() ? request->add_special_tokens() : true;
    ids = model->tokenizer->Encode(request->text(), options);
    if (!ids.ok()) {
      ids = absl::Status(ids.status().code(), absl::StrCat("text: ", ids.status().message()));
    }
  }
  if (!ids.ok()) {
    reactor->Finish(ToGrpcStatus(ids.status()));
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
