// Checks a ForwardBatch against the KV pool before any backend touches memory with it, and the
// pool's element type; shared by every backend so that a malformed batch is an error, never an
// out-of-bounds access.
#pragma once

#include <cstdint>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "engine/backend/backend.h"
#include "engine/ops/batch.h"

namespace moe {

// The KV element types every backend stores: F32 and BF16. `backend` prefixes the message.
inline absl::Status ValidateKvCacheDType(const KvCacheShape& shape, const char* backend) {
  if (shape.dtype == DType::kF32 || shape.dtype == DType::kBF16) return absl::OkStatus();
  return absl::InvalidArgumentError(
      absl::StrCat(backend, ": KV cache type ", DTypeName(shape.dtype), " is not supported; ",
                   "supported: ", DTypeName(DType::kF32), ", ", DTypeName(DType::kBF16)));
}

// Sizes agree, every sequence's token range, positions and block table fit, every token
// belongs to exactly one sequence and every KV slot and block id is inside the pool. Fills
// token_sequence ([tokens]: index into batch.sequences) on success.
inline absl::Status ValidateBatch(const ForwardBatch& batch, const KvCacheShape& kv_shape,
                                  std::vector<int32_t>& token_sequence) {
  const int64_t tokens = batch.num_tokens();
  if (batch.positions.size() != static_cast<size_t>(tokens) ||
      batch.slot_mapping.size() != static_cast<size_t>(tokens)) {
    return absl::InvalidArgumentError(
        "batch: token_ids, positions and slot_mapping differ in size");
  }
  const int64_t num_slots = int64_t{kv_shape.num_blocks} * kv_shape.block_size;
  token_sequence.assign(tokens, -1);
  for (size_t s = 0; s < batch.sequences.size(); ++s) {
    const SequenceChunk& chunk = batch.sequences[s];
    if (chunk.token_begin < 0 || chunk.num_tokens < 0 ||
        int64_t{chunk.token_begin} + chunk.num_tokens > tokens ||
        chunk.context_len < chunk.num_tokens) {
      return absl::InvalidArgumentError(
          absl::StrCat("batch: sequence ", chunk.seq_id, " has an invalid token range"));
    }
    if (static_cast<int64_t>(chunk.block_table.size()) * kv_shape.block_size < chunk.context_len) {
      return absl::InvalidArgumentError(
          absl::StrCat("batch: sequence ", chunk.seq_id, " block table too short for its context"));
    }
    for (int32_t block : chunk.block_table) {
      if (block < 0 || block >= kv_shape.num_blocks) {
        return absl::InvalidArgumentError(
            absl::StrCat("batch: block id ", block, " outside the KV pool"));
      }
    }
    for (int32_t t = chunk.token_begin; t < chunk.token_begin + chunk.num_tokens; ++t) {
      const int32_t expected = chunk.context_len - chunk.num_tokens + (t - chunk.token_begin);
      if (batch.positions[t] != expected) {
        return absl::InvalidArgumentError(absl::StrCat(
            "batch: token ", t, " has position ", batch.positions[t], ", expected ", expected));
      }
      token_sequence[t] = static_cast<int32_t>(s);
    }
  }
  for (int64_t t = 0; t < tokens; ++t) {
    if (token_sequence[t] < 0) {
      return absl::InvalidArgumentError(absl::StrCat("batch: token ", t, " has no sequence"));
    }
    if (batch.slot_mapping[t] < 0 || batch.slot_mapping[t] >= num_slots) {
      return absl::InvalidArgumentError(
          absl::StrCat("batch: KV slot ", batch.slot_mapping[t], " outside the KV pool"));
    }
  }
  return absl::OkStatus();
}

}  // namespace moe
