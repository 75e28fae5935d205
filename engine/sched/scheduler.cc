#include "engine/sched/scheduler.h"

#include <algorithm>

#include "absl/strings/str_cat.h"

namespace moe {

absl::Status SchedulerOptions::Validate() const {
  if (max_num_seqs < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("max_num_seqs must be >= 1, got ", max_num_seqs));
  }
  if (max_num_batched_tokens < max_num_seqs) {
    // Otherwise running decodes beyond the budget would starve behind earlier ones.
    return absl::InvalidArgumentError(
        absl::StrCat("max_num_batched_tokens (", max_num_batched_tokens,
                     ") must be >= max_num_seqs (", max_num_seqs, ")"));
  }
  return absl::OkStatus();
}

bool Scheduler::QueueOrder::operator()(const Sequence* a, const Sequence* b) const {
  if (by_priority && a->priority() != b->priority()) return a->priority() < b->priority();
  return a->arrival_index() < b->arrival_index();
}

Scheduler::Scheduler(const SchedulerOptions& options, int32_t num_blocks, int32_t block_size)
    : options_(options),
      order_{options.policy == SchedulingPolicy::kPriority},
      block_manager_(num_blocks, block_size, options.enable_prefix_caching),
      waiting_(order_) {
  running_.reserve(options.max_num_seqs);
}

Sequence* Scheduler::Add(int64_t id, std::vector<int32_t> prompt_token_ids, int32_t priority,
                         bool prompt_logits) {
  auto seq = std::make_unique<Sequence>(id, std::move(prompt_token_ids), priority,
                                        next_arrival_index_++, prompt_logits);
  Sequence* raw = seq.get();
  sequences_[id] = std::move(seq);
  waiting_.insert(raw);
  return raw;
}

Sequence* Scheduler::Find(int64_t id) const {
  auto it = sequences_.find(id);
  return it == sequences_.end() ? nullptr : it->second.get();
}

void Scheduler::InsertRunning(Sequence* seq) {
  seq->status_ = SequenceStatus::kRunning;
  running_.insert(std::upper_bound(running_.begin(), running_.end(), seq, order_), seq);
}

void Scheduler::RemoveRunning(Sequence* seq) {
  running_.erase(std::find(running_.begin(), running_.end(), seq));
}

bool Scheduler::Finish(int64_t id) {
  auto it = sequences_.find(id);
  if (it == sequences_.end()) return false;
  Sequence* seq = it->second.get();
  if (seq->status_ == SequenceStatus::kRunning) {
    RemoveRunning(seq);
  } else {
    waiting_.erase(seq);
  }
  block_manager_.Release(seq->block_table_);
  sequences_.erase(it);
  return true;
}

void Scheduler::Preempt(Sequence* seq, std::vector<ScheduledSequence>& picks, int32_t& budget,
                        StepPlan& plan) {
  auto picked = std::find_if(picks.begin(), picks.end(),
                             [seq](const ScheduledSequence& s) { return s.sequence == seq; });
  if (picked != picks.end()) {  // already in this step: take it out again
    budget += picked->num_new_tokens;
    picks.erase(picked);
  }
  RemoveRunning(seq);
  block_manager_.Release(seq->block_table_);
  seq->num_computed_tokens_ = 0;
  seq->num_cached_tokens_ = 0;
  seq->status_ = SequenceStatus::kWaiting;
  ++seq->num_preemptions_;
  waiting_.insert(seq);
  plan.preempted_ids.push_back(seq->id());
  ++counters_.preemptions;
}

bool Scheduler::PrefixBeingComputed(const Sequence& seq, int32_t cached) const {
  if (!options_.enable_prefix_caching || seq.wants_prompt_logits()) return false;
  // The block must be full and cacheable for `seq`: its last token is always computed.
  const int32_t end = cached + block_manager_.block_size();
  if (end > seq.num_tokens() - 1) return false;
  for (const Sequence* other : running_) {
    if (other->num_computed_tokens() >= end || other->num_tokens() < end) continue;
    if (std::equal(seq.token_ids().begin(), seq.token_ids().begin() + end,
                   other->token_ids().begin())) {
      return true;
    }
  }
  return false;
}

bool Scheduler::TryAdmit(Sequence* seq, std::vector<ScheduledSequence>& picks, int32_t& budget,
                         StepPlan& plan) {
  // Waiting sequences hold no blocks. Reuse cached full blocks, but always leave the last
  // token to compute: its logits are needed.
  // (None for a sequence that wants every prompt position's logits.)
  const int32_t max_cached_blocks =
      seq->wants_prompt_logits() ? 0 : (seq->num_tokens() - 1) / block_manager_.block_size();
  const int32_t cached = block_manager_.AcquireCachedPrefix(
      seq->token_ids(), max_cached_blocks, seq->block_table_, &seq->prefix_block_hashes_);
  seq->num_computed_tokens_ = cached;
  const int32_t remaining = seq->num_uncomputed_tokens();
  const int32_t num_new = std::min(remaining, budget);
  auto undo = [&] {
    block_manager_.Release(seq->block_table_);
    seq->num_computed_tokens_ = 0;
  };
  if (PrefixBeingComputed(*seq, cached)) {  // wait for it, then take it from the cache
    undo();
    return false;
  }
  if (num_new < remaining && !options_.enable_chunked_prefill) {
    undo();
    return false;
  }
  while (running_.size() >= static_cast<size_t>(options_.max_num_seqs) ||
         !block_manager_.CanGrowTo(seq->block_table_, cached + num_new)) {
    // Only a strictly more important sequence may take a running one's place.
    if (options_.policy != SchedulingPolicy::kPriority || running_.empty() ||
        running_.back()->priority() <= seq->priority()) {
      undo();
      return false;
    }
    Preempt(running_.back(), picks, budget, plan);
  }
  if (!block_manager_.GrowTo(seq->block_table_, cached + num_new).ok()) {  // checked above
    undo();
    return false;
  }
  waiting_.erase(seq);
  seq->num_cached_tokens_ = cached;
  counters_.prefix_cache_hit_tokens += cached;
  InsertRunning(seq);
  picks.push_back({seq, num_new, -1});
  budget -= num_new;
  return true;
}

StepPlan Scheduler::Schedule() {
  StepPlan plan;
  std::vector<ScheduledSequence> picks;
  picks.reserve(running_.size() + 8);
  int32_t budget = options_.max_num_batched_tokens;

  // Running sequences: decodes first so they keep streaming, then prompts in progress.
  std::vector<Sequence*> order;
  order.reserve(running_.size());
  for (Sequence* seq : running_) {
    if (seq->num_uncomputed_tokens() == 1) order.push_back(seq);
  }
  for (Sequence* seq : running_) {
    if (seq->num_uncomputed_tokens() > 1) order.push_back(seq);
  }
  for (Sequence* seq : order) {
    if (budget == 0) break;
    if (seq->status_ != SequenceStatus::kRunning) continue;  // preempted as a victim
    const int32_t num_new = std::min(seq->num_uncomputed_tokens(), budget);
    const int64_t target = static_cast<int64_t>(seq->num_computed_tokens_) + num_new;
    bool preempted_self = false;
    while (!block_manager_.CanGrowTo(seq->block_table_, target)) {
      Sequence* victim = running_.back();
      Preempt(victim, picks, budget, plan);
      if (victim == seq) {
        preempted_self = true;
        break;
      }
    }
    if (preempted_self) continue;
    if (!block_manager_.GrowTo(seq->block_table_, target).ok()) continue;  // checked above
    picks.push_back({seq, num_new, -1});
    budget -= num_new;
  }

  if (plan.preempted_ids.empty()) {
    while (!waiting_.empty() && budget > 0) {
      if (!TryAdmit(*waiting_.begin(), picks, budget, plan)) break;
    }
  }

  BuildBatch(std::move(picks), plan);
  return plan;
}

void Scheduler::BuildBatch(std::vector<ScheduledSequence> picks, StepPlan& plan) const {
  const int32_t block_size = block_manager_.block_size();
  ForwardBatch& batch = plan.batch;
  int32_t total = 0;
  for (const ScheduledSequence& pick : picks) total += pick.num_new_tokens;
  batch.token_ids.reserve(total);
  batch.positions.reserve(total);
  batch.slot_mapping.reserve(total);
  batch.sequences.reserve(picks.size());
  for (ScheduledSequence& pick : picks) {
    const Sequence& seq = *pick.sequence;
    const int32_t begin = seq.num_computed_tokens();
    const int32_t end = begin + pick.num_new_tokens;
    const std::vector<int32_t>& blocks = seq.block_table().blocks;
    SequenceChunk chunk;
    chunk.seq_id = seq.id();
    chunk.token_begin = batch.num_tokens();
    chunk.num_tokens = pick.num_new_tokens;
    chunk.context_len = end;
    chunk.block_table = blocks;
    for (int32_t pos = begin; pos < end; ++pos) {
      batch.token_ids.push_back(seq.token_ids()[pos]);
      batch.positions.push_back(pos);
      batch.slot_mapping.push_back(blocks[pos / block_size] * block_size + pos % block_size);
    }
    // Prompt positions whose next token is a prompt token.
    const int32_t scored_end = std::min(end, seq.num_prompt_tokens() - 1);
    if (seq.wants_prompt_logits() && begin < scored_end) {
      pick.prompt_logits_index = static_cast<int32_t>(batch.logits_rows.size());
      pick.prompt_logits_position = begin;
      pick.num_prompt_logits = scored_end - begin;
      for (int32_t pos = begin; pos < scored_end; ++pos) {
        batch.logits_rows.push_back(chunk.token_begin + (pos - begin));
      }
    }
    if (end == seq.num_tokens()) {  // every token computed: the last row gives the next token
      pick.logits_index = static_cast<int32_t>(batch.logits_rows.size());
      batch.logits_rows.push_back(chunk.token_begin + chunk.num_tokens - 1);
    }
    const bool is_decode =
        pick.num_new_tokens == 1 && seq.num_generated_tokens() > 0 && begin == seq.num_tokens() - 1;
    (is_decode ? plan.num_decode_tokens : plan.num_prefill_tokens) += pick.num_new_tokens;
    batch.sequences.push_back(std::move(chunk));
  }
  plan.scheduled = std::move(picks);
}

void Scheduler::CompleteStep(const StepPlan& plan) {
  ++counters_.steps;
  for (const ScheduledSequence& pick : plan.scheduled) {
    Sequence* seq = pick.sequence;
    const int32_t begin = seq->num_computed_tokens_;
    const int32_t end = begin + pick.num_new_tokens;
    counters_.scheduled_tokens += pick.num_new_tokens;
    counters_.prompt_tokens_computed +=
        std::max(0, std::min(end, seq->num_prompt_tokens()) - begin);
    // Generated positions below the newest token are only ever computed again after a
    // preemption (the newest one is the normal decode).
    const int32_t recompute_end = std::min(end, seq->num_tokens() - 1);
    counters_.recomputed_tokens +=
        std::max(0, recompute_end - std::max(begin, seq->num_prompt_tokens()));
    seq->num_computed_tokens_ = end;
    block_manager_.CacheComputedBlocks(seq->block_table_, seq->token_ids(), end);
  }
}

absl::Status Scheduler::CheckInvariants() const {
  if (absl::Status status = block_manager_.CheckInvariants(); !status.ok()) return status;
  if (waiting_.size() + running_.size() != sequences_.size()) {
    return absl::InternalError(absl::StrCat("scheduler: ", waiting_.size(), " waiting + ",
                                            running_.size(), " running != ", sequences_.size(),
                                            " sequences"));
  }
  if (running_.size() > static_cast<size_t>(options_.max_num_seqs)) {
    return absl::InternalError("scheduler: more running sequences than max_num_seqs");
  }
  if (!std::is_sorted(running_.begin(), running_.end(), order_)) {
    return absl::InternalError("scheduler: running queue out of order");
  }
  // Block references: the pool's used count equals the distinct blocks held by sequences.
  absl::flat_hash_map<int32_t, int32_t> references;
  for (const Sequence* seq : waiting_) {
    if (seq->status() != SequenceStatus::kWaiting || !seq->block_table().blocks.empty() ||
        seq->num_computed_tokens() != 0) {
      return absl::InternalError(
          absl::StrCat("scheduler: waiting sequence ", seq->id(), " holds KV state"));
    }
  }
  for (const Sequence* seq : running_) {
    if (seq->status() != SequenceStatus::kRunning) {
      return absl::InternalError(absl::StrCat("scheduler: sequence ", seq->id(), " misfiled"));
    }
    if (seq->block_table().num_blocks() < block_manager_.BlocksFor(seq->num_computed_tokens())) {
      return absl::InternalError(
          absl::StrCat("scheduler: sequence ", seq->id(), " has too few blocks"));
    }
    for (int32_t block : seq->block_table().blocks) ++references[block];
  }
  if (static_cast<int32_t>(references.size()) != block_manager_.num_used_blocks()) {
    return absl::InternalError(absl::StrCat("scheduler: sequences hold ", references.size(),
                                            " distinct blocks but the pool has ",
                                            block_manager_.num_used_blocks(), " in use"));
  }
  for (const auto& [block, count] : references) {
    if (block_manager_.ref_count(block) != count) {
      return absl::InternalError(absl::StrCat("scheduler: block ", block, " has ref count ",
                                              block_manager_.ref_count(block), " but ", count,
                                              " sequences hold it"));
    }
  }
  return absl::OkStatus();
}

}  // namespace moe
