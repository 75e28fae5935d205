#include "engine/ops/offline_batch.h"

#include "absl/strings/str_cat.h"

namespace moe {

absl::StatusOr<int32_t> OfflineBatcher::AddSequence(int32_t max_tokens) {
  const int32_t blocks = (max_tokens + block_size_ - 1) / block_size_;
  if (next_block_ + blocks > num_blocks_) {
    return absl::ResourceExhaustedError(
        absl::StrCat("KV cache too small: ", max_tokens, " more tokens need ", blocks, " blocks, ",
                     num_blocks_ - next_block_, " of ", num_blocks_, " are left"));
  }
  Sequence sequence;
  for (int32_t i = 0; i < blocks; ++i) sequence.blocks.push_back(next_block_++);
  sequence.capacity = blocks * block_size_;
  sequences_.push_back(std::move(sequence));
  return static_cast<int32_t>(sequences_.size() - 1);
}

absl::Status OfflineBatcher::Append(ForwardBatch& batch, int32_t index,
                                    std::span<const int32_t> tokens, bool want_logits) {
  Sequence& sequence = sequences_[index];
  const int32_t count = static_cast<int32_t>(tokens.size());
  if (sequence.length + count > sequence.capacity) {
    return absl::OutOfRangeError(absl::StrCat("sequence ", index, " would exceed its reserved ",
                                              sequence.capacity, " tokens"));
  }
  SequenceChunk chunk;
  chunk.seq_id = index;
  chunk.token_begin = batch.num_tokens();
  chunk.num_tokens = count;
  chunk.context_len = sequence.length + count;
  const int32_t used_blocks = (chunk.context_len + block_size_ - 1) / block_size_;
  chunk.block_table.assign(sequence.blocks.begin(), sequence.blocks.begin() + used_blocks);
  for (int32_t i = 0; i < count; ++i) {
    const int32_t position = sequence.length + i;
    batch.token_ids.push_back(tokens[i]);
    batch.positions.push_back(position);
    batch.slot_mapping.push_back(sequence.blocks[position / block_size_] * block_size_ +
                                 position % block_size_);
  }
  if (want_logits && count > 0) batch.logits_rows.push_back(batch.num_tokens() - 1);
  batch.sequences.push_back(std::move(chunk));
  sequence.length += count;
  return absl::OkStatus();
}

}  // namespace moe
