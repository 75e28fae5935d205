// Engine: the facade over scheduler, KV cache, model runner and sampler.
//
// Threads: one engine thread owns the Scheduler (and with it the KV BlockManager), the
// ModelRunner and every request's sampling state. Submit / Cancel / Stats may be called from
// any thread: Submit validates, then hands the request over through a mutex-guarded queue.
// Events go out through each request's EventSink, called on the engine thread (never under an
// engine lock): a sink must be quick and must not block; it may call Submit / Cancel / Stats.
//
// Each step: take new requests and cancellations, expire deadlines, schedule, run one forward
// pass over the packed batch, sample every sequence that has logits, apply stop conditions,
// emit one event per touched request. A request ends with exactly one event whose
// `finished` is true; after it the sink is released.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "absl/types/span.h"
#include "engine/model/model_config.h"
#include "engine/ops/batch.h"
#include "engine/ops/model_runner.h"
#include "engine/sampling/sampler.h"
#include "engine/sampling/sampling_params.h"
#include "engine/sched/scheduler.h"

namespace moe {

enum class FinishReason {
  kStopToken,   // EOS (unless ignore_eos) or one of stop_token_ids
  kStopString,  // a stop string appeared in the text
  kLength,      // max_tokens generated
  kCancelled,   // Cancel(id)
  kDeadline,    // the request's deadline passed
  kError,       // the forward pass failed or the engine stopped; see RequestEvent::status
};
absl::string_view FinishReasonName(FinishReason reason);

struct GenerateRequest {
  std::vector<int32_t> prompt_token_ids;
  SamplingParams sampling;
  absl::Time deadline = absl::InfiniteFuture();
  int32_t priority = 0;         // smaller first, under SchedulingPolicy::kPriority
  bool return_routing = false;  // attach each computed token's expert routing to events
  // Report the log-probability of every prompt token but the first, given the tokens before
  // it (scoring text). The whole prompt is then computed: nothing from the prefix cache.
  bool prompt_logprobs = false;
};

// The log-probability of the prompt token at `position` (>= 1) given the tokens before it.
struct PromptTokenLogprob {
  int32_t position = 0;
  int32_t token_id = 0;
  float logprob = 0.0f;
};

// The routing of one computed token of a request (prompt or generated).
struct TokenRouting {
  int32_t position = 0;
  std::vector<int32_t> expert_ids;    // [num_moe_layers * top_k], layer-major
  std::vector<float> expert_weights;  // [num_moe_layers * top_k]
};

struct GeneratedToken {
  int32_t token_id = 0;
  float logprob = 0.0f;                    // when sampling.logprobs > 0
  std::vector<TokenLogprob> top_logprobs;  // [sampling.logprobs]
};

struct RequestEvent {
  int64_t request_id = 0;
  std::vector<GeneratedToken> tokens;  // new tokens (0 or 1 per step)
  // New text, when the engine has a detokenizer: never splits a UTF-8 character, holds back
  // what may be the start of a stop string, excludes the stop string and the stop token.
  std::string text;
  std::vector<TokenRouting> routing;  // when requested: tokens computed this step
  // With prompt_logprobs: the prompt positions scored this step, in order, each once (a
  // preempted request's recomputed prompt is not reported again).
  std::vector<PromptTokenLogprob> prompt_logprobs;

  bool finished = false;
  FinishReason finish_reason = FinishReason::kLength;  // meaningful when finished
  absl::Status status;                                 // not OK only for FinishReason::kError
  std::string matched_stop_string;                     // for kStopString
  // Totals, when finished.
  int32_t num_prompt_tokens = 0;
  int32_t num_generated_tokens = 0;
  int32_t num_cached_prompt_tokens = 0;  // prompt tokens taken from the prefix cache
  // Phases, when finished (zero for a phase the request did not reach): Submit -> first
  // scheduled, first scheduled -> first generated token, first token -> finish.
  absl::Duration queue_time;
  absl::Duration prefill_time;
  absl::Duration decode_time;
};

using EventSink = std::function<void(RequestEvent)>;

// Turns one request's generated token ids into text, incrementally.
class IncrementalDetokenizer {
 public:
  virtual ~IncrementalDetokenizer() = default;
  // Text completed by `token_id` (may be empty while a UTF-8 character is incomplete).
  virtual std::string Push(int32_t token_id) = 0;
  // Whatever is still pending at the end.
  virtual std::string Flush() = 0;
};
// Called once per request (on the engine thread) with its prompt.
using DetokenizerFactory =
    std::function<std::unique_ptr<IncrementalDetokenizer>(absl::Span<const int32_t> prompt)>;

// What the engine thread saw after one step (for tests and metrics).
struct EngineStepInfo {
  int64_t step = 0;
  int32_t num_scheduled_tokens = 0;
  int32_t num_scheduled_sequences = 0;
  int32_t num_preempted = 0;
  int32_t num_waiting = 0;
  int32_t num_running = 0;
  int32_t kv_total_blocks = 0;
  int32_t kv_free_blocks = 0;  // includes cached free blocks
  int32_t kv_used_blocks = 0;
  int32_t kv_cached_free_blocks = 0;
  absl::Status invariants;  // Scheduler::CheckInvariants() when check_invariants is on
};

struct EngineOptions {
  ModelRunnerOptions runner;   // model directory, backend, KV memory budget, block size
  SchedulerOptions scheduler;  // batching limits, chunked prefill, prefix caching, policy
  // Requests waiting to be admitted (queued + not yet running) at most; Submit refuses the
  // next one with ResourceExhausted.
  int32_t max_waiting_requests = 1024;
  // Prompt + max_tokens at most; 0 = the model's max_position_embeddings.
  int32_t max_model_len = 0;
  // Seeds of requests without one derive from this; unset = from std::random_device.
  std::optional<uint64_t> base_seed;
  // Needed for text in events and for stop strings (Submit refuses stop strings without it).
  DetokenizerFactory detokenizer;
  // Called on the engine thread after each forward pass with that step's batch and routing.
  std::function<void(const ForwardBatch&, const StepRouting&)> routing_observer;
  // Called on the engine thread after each step.
  std::function<void(const EngineStepInfo&)> step_observer;
  // Run Scheduler::CheckInvariants() after each step (O(blocks)); a violation fails all
  // requests with Internal. For tests and debugging.
  bool check_invariants = false;
};

struct EngineStats {
  int32_t num_queued = 0;   // submitted, not yet seen by the engine thread
  int32_t num_waiting = 0;  // in the scheduler's waiting queue
  int32_t num_running = 0;
  int32_t kv_total_blocks = 0;
  int32_t kv_free_blocks = 0;
  int32_t kv_used_blocks = 0;
  int32_t kv_cached_free_blocks = 0;
  int64_t requests_submitted = 0;   // accepted by Submit
  int64_t requests_refused = 0;     // refused by Submit (any reason)
  int64_t requests_overloaded = 0;  // of those, for a full queue
  int64_t requests_finished = 0;
  absl::flat_hash_map<FinishReason, int64_t> finished_by_reason;
  int64_t steps = 0;
  int64_t scheduled_tokens = 0;
  int64_t prompt_tokens_computed = 0;
  int64_t prefix_cache_hit_tokens = 0;
  int64_t recomputed_tokens = 0;
  int64_t generated_tokens = 0;
  int64_t preemptions = 0;
  // Engine-thread wall time by phase, summed over steps.
  double schedule_seconds = 0;  // Scheduler::Schedule + CompleteStep
  double forward_seconds = 0;   // ModelRunner::Forward
  double sample_seconds = 0;    // sampling, stop checks, events
};

class Engine {
 public:
  // Loads the model (ModelRunner::Create(options.runner)) and starts the engine thread.
  static absl::StatusOr<std::unique_ptr<Engine>> Create(EngineOptions options);
  // The same with a runner built by the caller.
  static absl::StatusOr<std::unique_ptr<Engine>> CreateWithRunner(
      EngineOptions options, std::unique_ptr<ModelRunner> runner);

  // Stops the engine thread; requests still in flight finish with kError (Unavailable).
  ~Engine();

  Engine(const Engine&) = delete;
  Engine& operator=(const Engine&) = delete;

  // Validates and enqueues a request; returns its id. Errors: InvalidArgument (bad prompt or
  // parameters, or a request that can never fit: over max_model_len, over the whole KV pool,
  // or over the token budget without chunked prefill), DeadlineExceeded (deadline already
  // past), ResourceExhausted (waiting queue full: overloaded), Unavailable (shutting down).
  absl::StatusOr<int64_t> Submit(GenerateRequest request, EventSink sink);

  // Cancels a request at the next step (its final event has kCancelled). Unknown or finished
  // ids are ignored.
  void Cancel(int64_t request_id);

  EngineStats Stats() const;

  // Blocks until every accepted request has finished (for tests and offline runs).
  void WaitUntilIdle() const;

  const ModelConfig& model_config() const { return runner_->config(); }
  int32_t max_model_len() const { return max_model_len_; }

 private:
  struct Pending {
    int64_t id;
    GenerateRequest request;
    EventSink sink;
    absl::Time submitted;
  };
  struct ActiveRequest;  // engine-thread state of one request (engine.cc)

  Engine(EngineOptions options, std::unique_ptr<ModelRunner> runner);

  void Run();  // the engine thread
  // One scheduling step; returns false when there was nothing to run.
  bool Step();
  void Admit(Pending pending);
  void ExpireDeadlines(absl::Time now);
  // Ends a request: releases its sequence, sends the final event (with `event`'s contents).
  void FinishRequest(int64_t id, FinishReason reason, absl::Status status, RequestEvent event);
  void FailAll(const absl::Status& status);
  // Marks the plan's logits rows whose request only needs their argmax (greedy, nothing else
  // read from the row); logits_offset[i] = logits row i's row in ForwardOutput::logits, or -1.
  void MarkArgmaxOnlyRows(StepPlan& plan, std::vector<int32_t>& logits_offset) const;
  void PublishStats();

  const EngineOptions options_;
  const std::unique_ptr<ModelRunner> runner_;
  int32_t max_model_len_ = 0;
  std::vector<int32_t> eos_token_ids_;
  uint64_t base_seed_ = 0;

  // Hand-off between callers and the engine thread.
  mutable absl::Mutex mu_;
  std::vector<Pending> inbox_ ABSL_GUARDED_BY(mu_);
  std::vector<int64_t> cancels_ ABSL_GUARDED_BY(mu_);
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  int64_t next_request_id_ ABSL_GUARDED_BY(mu_) = 1;
  int64_t in_flight_ ABSL_GUARDED_BY(mu_) = 0;          // accepted, not yet finished
  int32_t scheduler_waiting_ ABSL_GUARDED_BY(mu_) = 0;  // mirrored by the engine thread
  absl::Time next_deadline_ ABSL_GUARDED_BY(mu_) = absl::InfiniteFuture();

  mutable absl::Mutex stats_mu_;
  EngineStats stats_ ABSL_GUARDED_BY(stats_mu_);

  // Engine-thread state.
  Scheduler scheduler_;
  absl::flat_hash_map<int64_t, std::unique_ptr<ActiveRequest>> active_;
  SamplerWorkspace sampler_workspace_;
  int64_t generated_tokens_ = 0;
  int64_t finished_unpublished_ = 0;  // finished since the last PublishStats
  absl::Duration schedule_time_, forward_time_, sample_time_;
  int64_t step_count_ = 0;

  std::thread thread_;  // last: starts after everything above is built
};

}  // namespace moe
