// Scheduler: continuous batching over a paged KV pool.
//
// Each step it picks, under a token budget (max_num_batched_tokens) and max_num_seqs:
//   1. running sequences with one token to compute (decodes), in queue order;
//   2. running sequences part-way through their prompt (chunked prefill), in queue order;
//   3. if nothing was preempted this step, waiting sequences in queue order (FCFS, or
//      priority then FCFS), reusing cached prefix blocks and taking a prefill chunk of what
//      budget is left. The head of the queue blocks those behind it (no overtaking). A
//      sequence whose next full prompt block (the first not in the prefix cache) a running
//      sequence is computing right now waits until that block is cached, then takes it from
//      the cache instead of computing it a second time (the n completions of one prompt, a
//      popular prompt arriving twice at once).
// When a running sequence needs a block and none is free, the last sequence in queue order is
// preempted by recompute: its blocks are released and it returns to the waiting queue with its
// tokens (prompt + generated so far), to be prefilled again later. Under the priority policy a
// waiting sequence may also preempt running ones of strictly lower priority.
//
// The scheduler owns the sequences and the BlockManager. The engine calls, per step:
//   plan = Schedule();  output = runner.Forward(plan.batch);  CompleteStep(plan);
//   then for each sampling entry: sequence->AppendToken(...), and Finish(id) when done.
#pragma once

#include <cstdint>
#include <memory>
#include <set>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "engine/kv/block_manager.h"
#include "engine/ops/batch.h"
#include "engine/sched/sequence.h"

namespace moe {

enum class SchedulingPolicy { kFcfs, kPriority };

struct SchedulerOptions {
  int32_t max_num_seqs = 64;             // running sequences at most
  int32_t max_num_batched_tokens = 512;  // tokens per step at most
  bool enable_chunked_prefill = true;    // else a prompt is prefilled in one step
  bool enable_prefix_caching = true;
  SchedulingPolicy policy = SchedulingPolicy::kFcfs;

  absl::Status Validate() const;
};

// One sequence's part in a step.
struct ScheduledSequence {
  Sequence* sequence = nullptr;  // valid until Finish(sequence->id())
  int32_t num_new_tokens = 0;    // tokens whose K/V this step computes
  // Row of ForwardOutput::logits to sample from, or -1 while the prompt is not done yet.
  int32_t logits_index = -1;
  // Sequences that want prompt logits: rows [prompt_logits_index, + num_prompt_logits) of the
  // logits hold positions prompt_logits_position, +1, ...; the row of position p scores the
  // prompt token at p + 1 (so the prompt's last position has none here).
  int32_t prompt_logits_index = -1;
  int32_t prompt_logits_position = 0;
  int32_t num_prompt_logits = 0;
};

struct StepPlan {
  ForwardBatch batch;
  std::vector<ScheduledSequence> scheduled;  // in batch order
  std::vector<int64_t> preempted_ids;        // sequences sent back to waiting this step
  int32_t num_decode_tokens = 0;   // one per sequence computing its newest generated token
  int32_t num_prefill_tokens = 0;  // the rest: prompt chunks and recomputation after preemption

  bool empty() const { return scheduled.empty(); }
};

struct SchedulerCounters {
  int64_t steps = 0;
  int64_t scheduled_tokens = 0;         // all tokens run through the model
  int64_t prompt_tokens_computed = 0;   // of those, prompt positions (prefill work)
  int64_t recomputed_tokens = 0;        // of those, generated positions recomputed after preemption
  int64_t prefix_cache_hit_tokens = 0;  // prompt/recompute tokens skipped thanks to the cache
  int64_t preemptions = 0;
};

class Scheduler {
 public:
  Scheduler(const SchedulerOptions& options, int32_t num_blocks, int32_t block_size);

  Scheduler(const Scheduler&) = delete;
  Scheduler& operator=(const Scheduler&) = delete;

  const SchedulerOptions& options() const { return options_; }
  const BlockManager& block_manager() const { return block_manager_; }

  // Adds a new sequence to the waiting queue. Its id must be unique among live sequences.
  // `prompt_logits`: logits rows for every prompt position (see ScheduledSequence).
  Sequence* Add(int64_t id, std::vector<int32_t> prompt_token_ids, int32_t priority = 0,
                bool prompt_logits = false);

  // Plans the next step (see the top of this file). May return an empty plan when nothing
  // can run (no sequences, or the waiting head does not fit yet).
  StepPlan Schedule();

  // Records that `plan`'s forward pass ran: its tokens' K/V are now in the cache.
  void CompleteStep(const StepPlan& plan);

  // Removes a sequence wherever it is (waiting or running) and releases its blocks. Unknown
  // ids are ignored (returns false).
  bool Finish(int64_t id);

  Sequence* Find(int64_t id) const;
  int32_t num_waiting() const { return static_cast<int32_t>(waiting_.size()); }
  int32_t num_running() const { return static_cast<int32_t>(running_.size()); }
  bool has_unfinished() const { return !sequences_.empty(); }
  const SchedulerCounters& counters() const { return counters_; }

  // Block manager invariants plus: running sequences' tables cover their computed tokens,
  // waiting sequences hold no blocks, and every block reference belongs to a live sequence.
  absl::Status CheckInvariants() const;

 private:
  // Queue order: smaller first. FCFS: arrival; priority: (priority, arrival).
  struct QueueOrder {
    bool by_priority;
    bool operator()(const Sequence* a, const Sequence* b) const;
  };

  void InsertRunning(Sequence* seq);
  void RemoveRunning(Sequence* seq);
  // Releases the blocks of a running sequence and sends it back to waiting.
  void Preempt(Sequence* seq, std::vector<ScheduledSequence>& picks, int32_t& budget,
               StepPlan& plan);
  // Whether a running sequence is computing, and has not finished, the full block of `seq`'s
  // tokens that starts at `cached` (its first block not taken from the prefix cache).
  bool PrefixBeingComputed(const Sequence& seq, int32_t cached) const;
  // Admits the head of the waiting queue if it fits; returns whether it did.
  bool TryAdmit(Sequence* seq, std::vector<ScheduledSequence>& picks, int32_t& budget,
                StepPlan& plan);
  void BuildBatch(std::vector<ScheduledSequence> picks, StepPlan& plan) const;

  const SchedulerOptions options_;
  const QueueOrder order_;
  BlockManager block_manager_;
  absl::flat_hash_map<int64_t, std::unique_ptr<Sequence>> sequences_;
  std::set<Sequence*, QueueOrder> waiting_;
  std::vector<Sequence*> running_;  // sorted by order_
  int64_t next_arrival_index_ = 0;
  SchedulerCounters counters_;
};

}  // namespace moe
