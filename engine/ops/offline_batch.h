// OfflineBatcher: packs tokens of a fixed set of sequences into ForwardBatches, with KV blocks
// reserved up front and contiguously. For offline tools, benchmarks and reference tests; the
// serving path uses the Scheduler and BlockManager instead.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/common/argmax.h"  // ArgMax, for the users of the logits
#include "engine/ops/batch.h"

namespace moe {

class OfflineBatcher {
 public:
  OfflineBatcher(int32_t block_size, int32_t num_blocks)
      : block_size_(block_size), num_blocks_(num_blocks) {}

  // Reserves KV blocks for a sequence of up to `max_tokens` tokens; returns its index.
  absl::StatusOr<int32_t> AddSequence(int32_t max_tokens);

  // Appends `tokens` of sequence `index` to `batch` at the sequence's next positions; when
  // `want_logits`, the last appended row is added to batch.logits_rows.
  absl::Status Append(ForwardBatch& batch, int32_t index, std::span<const int32_t> tokens,
                      bool want_logits);

  int32_t length(int32_t index) const { return sequences_[index].length; }

 private:
  struct Sequence {
    std::vector<int32_t> blocks;
    int32_t capacity = 0;
    int32_t length = 0;
  };
  int32_t block_size_;
  int32_t num_blocks_;
  int32_t next_block_ = 0;
  std::vector<Sequence> sequences_;
};

}  // namespace moe
