// Sequence: one request's token ids and how far its KV cache has been computed.
#pragma once

#include <cstdint>
#include <vector>

#include "engine/kv/block_manager.h"

namespace moe {

enum class SequenceStatus { kWaiting, kRunning };

class Sequence {
 public:
  // `arrival_index` orders sequences first-come-first-served (smaller = earlier); under the
  // priority policy a smaller `priority` value is served first. `prompt_logits`: every prompt
  // position's logits are needed (prompt log-probabilities), so nothing comes from the prefix
  // cache.
  Sequence(int64_t id, std::vector<int32_t> prompt_token_ids, int32_t priority,
           int64_t arrival_index, bool prompt_logits = false)
      : id_(id),
        priority_(priority),
        arrival_index_(arrival_index),
        num_prompt_tokens_(static_cast<int32_t>(prompt_token_ids.size())),
        prompt_logits_(prompt_logits),
        token_ids_(std::move(prompt_token_ids)) {}

  Sequence(const Sequence&) = delete;
  Sequence& operator=(const Sequence&) = delete;

  int64_t id() const { return id_; }
  int32_t priority() const { return priority_; }
  int64_t arrival_index() const { return arrival_index_; }
  SequenceStatus status() const { return status_; }

  // Prompt followed by the generated tokens.
  const std::vector<int32_t>& token_ids() const { return token_ids_; }
  int32_t num_tokens() const { return static_cast<int32_t>(token_ids_.size()); }
  int32_t num_prompt_tokens() const { return num_prompt_tokens_; }
  int32_t num_generated_tokens() const { return num_tokens() - num_prompt_tokens_; }
  bool wants_prompt_logits() const { return prompt_logits_; }
  // Tokens whose K/V are in the cache (positions [0, num_computed_tokens)).
  int32_t num_computed_tokens() const { return num_computed_tokens_; }
  int32_t num_uncomputed_tokens() const { return num_tokens() - num_computed_tokens_; }
  // Prompt tokens taken from the prefix cache at the last admission.
  int32_t num_cached_prompt_tokens() const { return num_cached_tokens_; }
  int32_t num_preemptions() const { return num_preemptions_; }
  const BlockTable& block_table() const { return block_table_; }

  // A generated token; its K/V are computed in a later step.
  void AppendToken(int32_t token_id) { token_ids_.push_back(token_id); }

 private:
  friend class Scheduler;

  const int64_t id_;
  const int32_t priority_;
  const int64_t arrival_index_;
  const int32_t num_prompt_tokens_;
  const bool prompt_logits_;
  std::vector<int32_t> token_ids_;
  SequenceStatus status_ = SequenceStatus::kWaiting;
  int32_t num_computed_tokens_ = 0;
  int32_t num_cached_tokens_ = 0;
  int32_t num_preemptions_ = 0;
  BlockTable block_table_;
  // Chained hashes of the leading full blocks of token_ids_ (BlockManager::AcquireCachedPrefix's
  // memo): a sequence that waits, or is preempted, is looked up again without rehashing.
  std::vector<uint64_t> prefix_block_hashes_;
};

}  // namespace moe
