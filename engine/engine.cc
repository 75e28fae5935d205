#include "engine/engine.h"

#include <algorithm>
#include <random>
#include <utility>

#include "absl/strings/str_cat.h"
#include "engine/common/status_macros.h"
#include "engine/sampling/stop_string_matcher.h"

namespace moe {
namespace {

uint64_t Mix64(uint64_t x) {  // splitmix64
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

}  // namespace

absl::string_view FinishReasonName(FinishReason reason) {
  switch (reason) {
    case FinishReason::kStopToken:
      return "stop_token";
    case FinishReason::kStopString:
      return "stop_string";
    case FinishReason::kLength:
      return "length";
    case FinishReason::kCancelled:
      return "cancelled";
    case FinishReason::kDeadline:
      return "deadline";
    case FinishReason::kError:
      return "error";
  }
  return "unknown";
}

struct Engine::ActiveRequest {
  ActiveRequest(const GenerateRequest& request, EventSink sink, uint64_t seed,
                std::vector<int32_t> stop_ids)
      : sampling(request.sampling),
        deadline(request.deadline),
        return_routing(request.return_routing),
        prompt_logprobs(request.prompt_logprobs),
        sink(std::move(sink)),
        sampler(request.sampling, seed, request.prompt_token_ids, stop_ids),
        stop_token_ids(std::move(stop_ids)),
        stop_matcher(request.sampling.stop_strings) {}

  const SamplingParams sampling;
  const absl::Time deadline;
  const bool return_routing;
  const bool prompt_logprobs;
  int32_t next_prompt_logprob_position = 1;  // the next prompt position to report
  EventSink sink;
  RequestSampler sampler;
  // Ids that end the request: stop_token_ids, plus EOS unless ignore_eos.
  const std::vector<int32_t> stop_token_ids;
  std::unique_ptr<IncrementalDetokenizer> detokenizer;  // null without a factory
  StopStringMatcher stop_matcher;
  int32_t num_prompt_tokens = 0;
  int32_t num_cached_prompt_tokens = 0;
  // Phase boundaries (InfinitePast until reached).
  absl::Time submitted = absl::InfinitePast();
  absl::Time first_scheduled = absl::InfinitePast();
  absl::Time first_token = absl::InfinitePast();
};

absl::StatusOr<std::unique_ptr<Engine>> Engine::Create(EngineOptions options) {
  ASSIGN_OR_RETURN(std::unique_ptr<ModelRunner> runner, ModelRunner::Create(options.runner));
  return CreateWithRunner(std::move(options), std::move(runner));
}

absl::StatusOr<std::unique_ptr<Engine>> Engine::CreateWithRunner(
    EngineOptions options, std::unique_ptr<ModelRunner> runner) {
  if (runner == nullptr) return absl::InvalidArgumentError("Engine: no model runner");
  RETURN_IF_ERROR(options.scheduler.Validate());
  if (options.max_waiting_requests < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("max_waiting_requests must be >= 1, got ", options.max_waiting_requests));
  }
  const int32_t model_max = runner->config().max_position_embeddings;
  if (options.max_model_len < 0 || (model_max > 0 && options.max_model_len > model_max)) {
    return absl::InvalidArgumentError(
        absl::StrCat("max_model_len must be in [0, max_position_embeddings = ", model_max,
                     "], got ", options.max_model_len));
  }
  if (runner->num_blocks() < 1 || runner->block_size() < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("the model runner has no KV blocks (", runner->num_blocks(), " blocks of ",
                     runner->block_size(), " tokens): raise kv_cache_bytes"));
  }
  return std::unique_ptr<Engine>(new Engine(std::move(options), std::move(runner)));
}

Engine::Engine(EngineOptions options, std::unique_ptr<ModelRunner> runner)
    : options_(std::move(options)),
      runner_(std::move(runner)),
      scheduler_(options_.scheduler, runner_->num_blocks(), runner_->block_size()) {
  const ModelConfig& config = runner_->config();
  max_model_len_ =
      options_.max_model_len > 0 ? options_.max_model_len : config.max_position_embeddings;
  if (max_model_len_ <= 0) max_model_len_ = runner_->num_blocks() * runner_->block_size();
  eos_token_ids_ = config.eos_token_ids;
  base_seed_ = options_.base_seed
                   ? *options_.base_seed
                   : (static_cast<uint64_t>(std::random_device{}()) << 32) ^ std::random_device{}();
  {
    absl::MutexLock lock(&stats_mu_);
    stats_.kv_total_blocks = scheduler_.block_manager().num_blocks();
    stats_.kv_free_blocks = scheduler_.block_manager().num_free_blocks();
  }
  thread_ = std::thread([this] { Run(); });
}

Engine::~Engine() {
  {
    absl::MutexLock lock(&mu_);
    stopping_ = true;
  }
  thread_.join();
}

absl::StatusOr<int64_t> Engine::Submit(GenerateRequest request, EventSink sink) {
  auto refuse = [this](absl::Status status, bool overloaded = false) {
    absl::MutexLock lock(&stats_mu_);
    ++stats_.requests_refused;
    if (overloaded) ++stats_.requests_overloaded;
    return status;
  };
  if (!sink) return refuse(absl::InvalidArgumentError("Submit: no event sink"));
  const std::vector<int32_t>& prompt = request.prompt_token_ids;
  const int32_t vocab = runner_->config().vocab_size;
  if (prompt.empty()) return refuse(absl::InvalidArgumentError("the prompt is empty"));
  for (size_t i = 0; i < prompt.size(); ++i) {
    if (prompt[i] < 0 || prompt[i] >= vocab) {
      return refuse(absl::InvalidArgumentError(absl::StrCat(
          "prompt token ", i, " (id ", prompt[i], ") is outside the vocabulary [0, ", vocab, ")")));
    }
  }
  if (absl::Status status = request.sampling.Validate(vocab); !status.ok()) {
    return refuse(status);
  }
  if (!request.sampling.stop_strings.empty() && !options_.detokenizer) {
    return refuse(
        absl::InvalidArgumentError("stop strings need text, but this engine has no detokenizer"));
  }
  const int64_t prompt_len = static_cast<int64_t>(prompt.size());
  const int64_t total_len = prompt_len + request.sampling.max_tokens;
  if (total_len > max_model_len_) {
    return refuse(absl::InvalidArgumentError(absl::StrCat(
        "prompt (", prompt_len, " tokens) + max_tokens (", request.sampling.max_tokens,
        ") = ", total_len, " exceeds the maximum context length of ", max_model_len_, " tokens")));
  }
  // K/V are written for every token but the last generated one.
  const int64_t kv_tokens = total_len - 1;
  const BlockManager& kv = scheduler_.block_manager();  // immutable geometry: safe to read
  if (kv.BlocksFor(kv_tokens) > kv.num_blocks()) {
    return refuse(absl::InvalidArgumentError(
        absl::StrCat("prompt + max_tokens needs ", kv.BlocksFor(kv_tokens), " KV blocks of ",
                     kv.block_size(), " tokens, but the whole KV pool has ", kv.num_blocks())));
  }
  if (!options_.scheduler.enable_chunked_prefill &&
      kv_tokens > options_.scheduler.max_num_batched_tokens) {
    // A preempted request is prefilled again with its generated tokens, in one step.
    return refuse(absl::InvalidArgumentError(absl::StrCat(
        "prompt + max_tokens - 1 = ", kv_tokens, " tokens exceeds max_num_batched_tokens (",
        options_.scheduler.max_num_batched_tokens, ") and chunked prefill is off")));
  }
  if (request.deadline <= absl::Now()) {
    return refuse(absl::DeadlineExceededError("the request's deadline has already passed"));
  }

  int64_t id = 0;
  {
    absl::MutexLock lock(&mu_);
    if (stopping_) return refuse(absl::UnavailableError("the engine is shutting down"));
    const int64_t waiting = static_cast<int64_t>(inbox_.size()) + scheduler_waiting_;
    if (waiting >= options_.max_waiting_requests) {
      return refuse(absl::ResourceExhaustedError(
                        absl::StrCat("engine overloaded: ", waiting,
                                     " requests already waiting (max_waiting_"
                                     "requests = ",
                                     options_.max_waiting_requests, "); retry later")),
                    /*overloaded=*/true);
    }
    id = next_request_id_++;
    ++in_flight_;
    next_deadline_ = std::min(next_deadline_, request.deadline);
    inbox_.push_back({id, std::move(request), std::move(sink), absl::Now()});
  }
  absl::MutexLock lock(&stats_mu_);
  ++stats_.requests_submitted;
  return id;
}

void Engine::Cancel(int64_t request_id) {
  absl::MutexLock lock(&mu_);
  cancels_.push_back(request_id);
}

EngineStats Engine::Stats() const {
  EngineStats stats;
  {
    absl::MutexLock lock(&stats_mu_);
    stats = stats_;
  }
  absl::MutexLock lock(&mu_);
  stats.num_queued = static_cast<int32_t>(inbox_.size());
  return stats;
}

void Engine::WaitUntilIdle() const {
  absl::MutexLock lock(&mu_);
  mu_.Await(absl::Condition(
      +[](int64_t* in_flight) { return *in_flight == 0; }, const_cast<int64_t*>(&in_flight_)));
}

void Engine::Run() {
  while (true) {
    std::vector<Pending> arrivals;
    std::vector<int64_t> cancels;
    bool stopping = false;
    {
      absl::MutexLock lock(&mu_);
      if (!scheduler_.has_unfinished()) {
        // Idle: sleep until there is something to do or a deadline falls due.
        auto has_input = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
          return stopping_ || !inbox_.empty() || !cancels_.empty();
        };
        mu_.AwaitWithDeadline(absl::Condition(&has_input), next_deadline_);
      }
      arrivals.swap(inbox_);
      cancels.swap(cancels_);
      stopping = stopping_;
    }
    if (stopping) {
      for (Pending& pending : arrivals) Admit(std::move(pending));
      FailAll(absl::UnavailableError("the engine stopped"));
      PublishStats();
      return;
    }
    for (Pending& pending : arrivals) Admit(std::move(pending));
    for (int64_t id : cancels) {
      if (active_.contains(id)) FinishRequest(id, FinishReason::kCancelled, {}, {});
    }
    ExpireDeadlines(absl::Now());
    Step();
    PublishStats();
  }
}

void Engine::Admit(Pending pending) {
  GenerateRequest& request = pending.request;
  const uint64_t seed =
      request.sampling.seed ? *request.sampling.seed : Mix64(base_seed_ ^ Mix64(pending.id));
  std::vector<int32_t> stop_ids = request.sampling.stop_token_ids;
  if (!request.sampling.ignore_eos) {
    stop_ids.insert(stop_ids.end(), eos_token_ids_.begin(), eos_token_ids_.end());
  }
  // The same ids are masked by the sampler while fewer than min_tokens are generated (with
  // ignore_eos, EOS does not stop, so it is neither a stop id nor masked).
  auto state =
      std::make_unique<ActiveRequest>(request, std::move(pending.sink), seed, std::move(stop_ids));
  if (options_.detokenizer) state->detokenizer = options_.detokenizer(request.prompt_token_ids);
  state->num_prompt_tokens = static_cast<int32_t>(request.prompt_token_ids.size());
  state->submitted = pending.submitted;
  scheduler_.Add(pending.id, std::move(request.prompt_token_ids), request.priority,
                 request.prompt_logprobs);
  active_[pending.id] = std::move(state);
}

void Engine::ExpireDeadlines(absl::Time now) {
  std::vector<int64_t> expired;
  absl::Time next = absl::InfiniteFuture();
  for (const auto& [id, state] : active_) {
    if (state->deadline <= now) {
      expired.push_back(id);
    } else {
      next = std::min(next, state->deadline);
    }
  }
  std::sort(expired.begin(), expired.end());  // deterministic event order
  for (int64_t id : expired) FinishRequest(id, FinishReason::kDeadline, {}, {});
  absl::MutexLock lock(&mu_);
  // Requests still in the inbox have their deadlines folded in again by Submit's min; keep
  // the earliest of both.
  for (const Pending& pending : inbox_) next = std::min(next, pending.request.deadline);
  next_deadline_ = next;
}

void Engine::MarkArgmaxOnlyRows(StepPlan& plan, std::vector<int32_t>& logits_offset) const {
  const size_t rows = plan.batch.logits_rows.size();
  std::vector<bool> argmax_only(rows, false);
  bool any = false;
  for (const ScheduledSequence& scheduled : plan.scheduled) {
    if (scheduled.logits_index < 0) continue;
    const bool only = active_.at(scheduled.sequence->id())->sampler.OnlyNeedsArgmax();
    argmax_only[scheduled.logits_index] = only;
    any = any || only;
  }
  logits_offset.resize(rows);
  int32_t next = 0;
  for (size_t i = 0; i < rows; ++i) logits_offset[i] = any && argmax_only[i] ? -1 : next++;
  plan.batch.argmax_only.clear();
  if (any) plan.batch.argmax_only = std::move(argmax_only);
}

bool Engine::Step() {
  if (!scheduler_.has_unfinished()) return false;
  const absl::Time schedule_start = absl::Now();
  StepPlan plan = scheduler_.Schedule();
  const absl::Time forward_start = absl::Now();
  schedule_time_ += forward_start - schedule_start;
  if (plan.empty()) {
    // Unreachable when Submit's fit checks hold: with nothing running, the head of the
    // waiting queue always fits. Fail loudly rather than spin.
    FailAll(absl::InternalError("scheduler made no progress with nothing running"));
    return false;
  }
  // Greedy requests that read nothing else of their logits get the argmax computed where the
  // logits are (on a GPU: a few bytes copied instead of a vocabulary-wide row).
  std::vector<int32_t> logits_offset;  // per logits row: its row in output->logits, or -1
  MarkArgmaxOnlyRows(plan, logits_offset);
  absl::StatusOr<ForwardOutput> output = runner_->Forward(plan.batch);
  const absl::Time forward_end = absl::Now();
  forward_time_ += forward_end - forward_start;
  if (!output.ok()) {
    const absl::Status status(output.status().code(),
                              absl::StrCat("forward pass failed: ", output.status().message()));
    for (const ScheduledSequence& s : plan.scheduled) {
      FinishRequest(s.sequence->id(), FinishReason::kError, status, {});
    }
    return true;
  }
  const int32_t vocab = runner_->config().vocab_size;
  const size_t returned_rows = static_cast<size_t>(
      std::count_if(logits_offset.begin(), logits_offset.end(), [](int32_t o) { return o >= 0; }));
  if (output->logits.size() != returned_rows * vocab ||
      output->argmax.size() != (plan.batch.argmax_only.empty() ? 0 : logits_offset.size())) {
    FailAll(absl::InternalError(absl::StrCat(
        "forward pass returned ", output->logits.size(), " logits and ", output->argmax.size(),
        " argmax ids for ", returned_rows, " rows of ", vocab, " and ",
        plan.batch.argmax_only.empty() ? 0 : logits_offset.size(), " argmax rows")));
    return true;
  }
  if (options_.routing_observer) options_.routing_observer(plan.batch, output->routing);
  scheduler_.CompleteStep(plan);
  const absl::Time sample_start = absl::Now();
  schedule_time_ += sample_start - forward_end;

  const StepRouting& routing = output->routing;
  const int32_t num_tokens = plan.batch.num_tokens();
  for (size_t i = 0; i < plan.scheduled.size(); ++i) {
    const ScheduledSequence& scheduled = plan.scheduled[i];
    Sequence* seq = scheduled.sequence;
    const int64_t id = seq->id();
    ActiveRequest& state = *active_.at(id);
    if (state.first_scheduled == absl::InfinitePast()) state.first_scheduled = forward_start;
    state.num_cached_prompt_tokens =
        std::max(state.num_cached_prompt_tokens, seq->num_cached_prompt_tokens());
    RequestEvent event;
    event.request_id = id;
    if (state.return_routing && !routing.expert_ids.empty() && num_tokens > 0) {
      const SequenceChunk& chunk = plan.batch.sequences[i];
      for (int32_t r = 0; r < chunk.num_tokens; ++r) {
        const int32_t row = chunk.token_begin + r;
        TokenRouting token_routing;
        token_routing.position = plan.batch.positions[row];
        for (size_t layer = 0; layer < routing.expert_ids.size(); ++layer) {
          const size_t top_k = routing.expert_ids[layer].size() / num_tokens;
          for (size_t k = 0; k < top_k; ++k) {
            token_routing.expert_ids.push_back(routing.expert_ids[layer][row * top_k + k]);
            if (layer < routing.expert_weights.size()) {
              token_routing.expert_weights.push_back(
                  routing.expert_weights[layer][row * top_k + k]);
            }
          }
        }
        event.routing.push_back(std::move(token_routing));
      }
    }
    for (int32_t i = 0; i < scheduled.num_prompt_logits; ++i) {
      const int32_t position = scheduled.prompt_logits_position + i + 1;  // the scored token
      if (position < state.next_prompt_logprob_position) continue;  // recomputed after preemption
      const int32_t offset = logits_offset[scheduled.prompt_logits_index + i];
      const int32_t token = seq->token_ids()[position];
      SampledToken scored;
      ComputeLogprobs(absl::Span<const float>(
                          output->logits.data() + static_cast<size_t>(offset) * vocab, vocab),
                      token, 0, sampler_workspace_, scored);
      event.prompt_logprobs.push_back({position, token, scored.logprob});
      state.next_prompt_logprob_position = position + 1;
    }
    if (scheduled.logits_index < 0) {  // a prompt chunk: nothing sampled yet
      if (!event.routing.empty() || !event.prompt_logprobs.empty()) state.sink(std::move(event));
      continue;
    }

    const int32_t offset = logits_offset[scheduled.logits_index];
    SampledToken sampled =
        offset < 0 ? state.sampler.AcceptArgmax(output->argmax[scheduled.logits_index])
                   : state.sampler.Sample(
                         absl::Span<const float>(
                             output->logits.data() + static_cast<size_t>(offset) * vocab, vocab),
                         sampler_workspace_);
    seq->AppendToken(sampled.token_id);
    ++generated_tokens_;
    if (state.first_token == absl::InfinitePast()) state.first_token = forward_end;
    event.tokens.push_back({sampled.token_id, sampled.logprob, std::move(sampled.top_logprobs)});
    const int32_t num_generated = state.sampler.num_generated();

    // Stop token: ends the request; its text is not part of the output.
    const bool stop_token = num_generated > state.sampling.min_tokens &&
                            std::find(state.stop_token_ids.begin(), state.stop_token_ids.end(),
                                      sampled.token_id) != state.stop_token_ids.end();
    if (stop_token) {
      FinishRequest(id, FinishReason::kStopToken, {}, std::move(event));
      continue;
    }
    if (state.detokenizer) {
      std::string piece = state.detokenizer->Push(sampled.token_id);
      // Stop strings are searched only in text generated after min_tokens.
      if (num_generated <= state.sampling.min_tokens || state.sampling.stop_strings.empty()) {
        event.text = std::move(piece);
      } else {
        StopStringMatcher::Result match = state.stop_matcher.Push(piece);
        event.text = std::move(match.text);
        if (match.matched_stop) {
          event.matched_stop_string = state.sampling.stop_strings[*match.matched_stop];
          FinishRequest(id, FinishReason::kStopString, {}, std::move(event));
          continue;
        }
      }
    }
    if (num_generated >= state.sampling.max_tokens) {
      FinishRequest(id, FinishReason::kLength, {}, std::move(event));
      continue;
    }
    state.sink(std::move(event));
  }

  ++step_count_;
  sample_time_ += absl::Now() - sample_start;
  if (options_.check_invariants || options_.step_observer) {
    EngineStepInfo info;
    info.step = step_count_;
    info.num_scheduled_tokens = plan.batch.num_tokens();
    info.num_scheduled_sequences = static_cast<int32_t>(plan.scheduled.size());
    info.num_preempted = static_cast<int32_t>(plan.preempted_ids.size());
    info.num_waiting = scheduler_.num_waiting();
    info.num_running = scheduler_.num_running();
    const BlockManager& kv = scheduler_.block_manager();
    info.kv_total_blocks = kv.num_blocks();
    info.kv_free_blocks = kv.num_free_blocks();
    info.kv_used_blocks = kv.num_used_blocks();
    info.kv_cached_free_blocks = kv.num_cached_free_blocks();
    if (options_.check_invariants) info.invariants = scheduler_.CheckInvariants();
    if (options_.step_observer) options_.step_observer(info);
    if (!info.invariants.ok()) FailAll(info.invariants);
  }
  return true;
}

void Engine::FinishRequest(int64_t id, FinishReason reason, absl::Status status,
                           RequestEvent event) {
  auto it = active_.find(id);
  if (it == active_.end()) return;
  std::unique_ptr<ActiveRequest> state = std::move(it->second);
  active_.erase(it);
  const Sequence* seq = scheduler_.Find(id);
  event.request_id = id;
  event.finished = true;
  event.finish_reason = reason;
  event.status = std::move(status);
  event.num_prompt_tokens = state->num_prompt_tokens;
  event.num_generated_tokens = state->sampler.num_generated();
  event.num_cached_prompt_tokens =
      std::max(state->num_cached_prompt_tokens, seq ? seq->num_cached_prompt_tokens() : 0);
  const absl::Time now = absl::Now();
  auto phase = [](absl::Time begin, absl::Time end) {
    return begin == absl::InfinitePast() || end == absl::InfinitePast() ? absl::ZeroDuration()
                                                                        : end - begin;
  };
  event.queue_time =
      phase(state->submitted,
            state->first_scheduled == absl::InfinitePast() ? now : state->first_scheduled);
  event.prefill_time = phase(state->first_scheduled, state->first_token);
  event.decode_time = phase(state->first_token, now);
  // Release text held back for a possible stop string (not after a stop string or a stop
  // token, whose text is excluded, nor after an error).
  if (state->detokenizer && reason != FinishReason::kStopString &&
      reason != FinishReason::kStopToken && reason != FinishReason::kError) {
    std::string tail = state->detokenizer->Flush();
    if (!state->sampling.stop_strings.empty() &&
        state->sampler.num_generated() > state->sampling.min_tokens) {
      StopStringMatcher::Result match = state->stop_matcher.Push(tail);
      event.text += match.text;
      if (match.matched_stop) {
        event.matched_stop_string = state->sampling.stop_strings[*match.matched_stop];
        event.finish_reason = FinishReason::kStopString;
      } else {
        event.text += state->stop_matcher.Flush();
      }
    } else {
      event.text += tail;
    }
  } else if (reason == FinishReason::kStopToken && state->detokenizer) {
    event.text += state->stop_matcher.Flush();  // text before the stop token stands
  }
  scheduler_.Finish(id);
  const FinishReason final_reason = event.finish_reason;
  state->sink(std::move(event));
  {
    absl::MutexLock lock(&stats_mu_);
    ++stats_.requests_finished;
    ++stats_.finished_by_reason[final_reason];
  }
  ++finished_unpublished_;  // leaves in_flight_ once the stats show it (PublishStats)
}

void Engine::FailAll(const absl::Status& status) {
  std::vector<int64_t> ids;
  ids.reserve(active_.size());
  for (const auto& [id, state] : active_) ids.push_back(id);
  std::sort(ids.begin(), ids.end());
  for (int64_t id : ids) FinishRequest(id, FinishReason::kError, status, {});
}

void Engine::PublishStats() {
  const BlockManager& kv = scheduler_.block_manager();
  const SchedulerCounters& counters = scheduler_.counters();
  {
    absl::MutexLock lock(&stats_mu_);
    stats_.num_waiting = scheduler_.num_waiting();
    stats_.num_running = scheduler_.num_running();
    stats_.kv_total_blocks = kv.num_blocks();
    stats_.kv_free_blocks = kv.num_free_blocks();
    stats_.kv_used_blocks = kv.num_used_blocks();
    stats_.kv_cached_free_blocks = kv.num_cached_free_blocks();
    stats_.steps = counters.steps;
    stats_.scheduled_tokens = counters.scheduled_tokens;
    stats_.prompt_tokens_computed = counters.prompt_tokens_computed;
    stats_.prefix_cache_hit_tokens = counters.prefix_cache_hit_tokens;
    stats_.recomputed_tokens = counters.recomputed_tokens;
    stats_.preemptions = counters.preemptions;
    stats_.generated_tokens = generated_tokens_;
    stats_.schedule_seconds = absl::ToDoubleSeconds(schedule_time_);
    stats_.forward_seconds = absl::ToDoubleSeconds(forward_time_);
    stats_.sample_seconds = absl::ToDoubleSeconds(sample_time_);
  }
  absl::MutexLock lock(&mu_);
  scheduler_waiting_ = scheduler_.num_waiting();
  in_flight_ -= finished_unpublished_;
  finished_unpublished_ = 0;
}

}  // namespace moe
