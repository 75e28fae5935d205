// Test-only stand-in for the model, for scheduler unit tests: it checks the KV addressing of
// every batch. Each batch token writes Mix(token, position) into its KV slot; a sequence's next
// token is a hash of the KV entries read back through its block table for positions
// [0, context_len). A wrong slot, position, block table, a stale or shared-but-different block
// all change the next token, so comparing with NextToken() on the plain token list catches them.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/types/span.h"
#include "engine/ops/batch.h"

namespace moe::testing {

class FakeKvModel {
 public:
  FakeKvModel(int32_t num_blocks, int32_t block_size, int32_t vocab_size)
      : block_size_(block_size), vocab_size_(vocab_size), kv_(num_blocks * block_size, 0) {}

  static uint64_t Mix(uint64_t x) {
    x += 0x9e3779b97f4a7c15ull;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    return x ^ (x >> 31);
  }
  static uint64_t Entry(int32_t token, int32_t position) {
    return Mix((static_cast<uint64_t>(static_cast<uint32_t>(token)) << 32) ^
               static_cast<uint32_t>(position)) |
           1;  // never 0 (= unwritten)
  }

  // The token the "model" produces after `tokens`.
  static int32_t NextToken(absl::Span<const int32_t> tokens, int32_t vocab_size) {
    uint64_t h = 0;
    for (size_t p = 0; p < tokens.size(); ++p) h = Mix(h ^ Entry(tokens[p], p));
    return static_cast<int32_t>(h % vocab_size);
  }

  // Next token for each of batch.logits_rows. Malformed batches set error().
  std::vector<int32_t> Forward(const ForwardBatch& batch) {
    const int32_t n = batch.num_tokens();
    if (batch.positions.size() != static_cast<size_t>(n) ||
        batch.slot_mapping.size() != static_cast<size_t>(n)) {
      Fail("packed arrays differ in length");
      return {};
    }
    int32_t expected_begin = 0;
    std::vector<int32_t> row_to_chunk(n, -1);
    for (size_t c = 0; c < batch.sequences.size(); ++c) {
      const SequenceChunk& chunk = batch.sequences[c];
      if (chunk.token_begin != expected_begin) Fail("chunks are not contiguous");
      expected_begin += chunk.num_tokens;
      if (chunk.num_tokens < 1 || chunk.context_len < chunk.num_tokens) Fail("bad chunk size");
      for (int32_t i = 0; i < chunk.num_tokens; ++i) {
        const int32_t row = chunk.token_begin + i;
        if (row >= n) {
          Fail("chunk past the batch");
          return {};
        }
        row_to_chunk[row] = static_cast<int32_t>(c);
        const int32_t pos = chunk.context_len - chunk.num_tokens + i;
        if (batch.positions[row] != pos) Fail(absl::StrCat("row ", row, ": wrong position"));
        const size_t block_index = pos / block_size_;
        if (block_index >= chunk.block_table.size()) {
          Fail("block table too short");
          return {};
        }
        const int32_t slot = chunk.block_table[block_index] * block_size_ + pos % block_size_;
        if (batch.slot_mapping[row] != slot) Fail(absl::StrCat("row ", row, ": wrong slot"));
        if (slot < 0 || slot >= static_cast<int32_t>(kv_.size())) {
          Fail("slot out of the pool");
          return {};
        }
      }
    }
    if (expected_begin != n) Fail("chunks do not cover the batch");
    // Write every token's KV first (as each layer does before attention).
    for (int32_t row = 0; row < n; ++row) {
      kv_[batch.slot_mapping[row]] = Entry(batch.token_ids[row], batch.positions[row]);
    }
    std::vector<int32_t> next;
    for (int32_t row : batch.logits_rows) {
      if (row < 0 || row >= n || row_to_chunk[row] < 0) {
        Fail("bad logits row");
        return {};
      }
      const SequenceChunk& chunk = batch.sequences[row_to_chunk[row]];
      const int32_t context = batch.positions[row] + 1;
      uint64_t h = 0;
      for (int32_t p = 0; p < context; ++p) {
        const uint64_t entry =
            kv_[chunk.block_table[p / block_size_] * block_size_ + p % block_size_];
        if (entry == 0) Fail(absl::StrCat("sequence ", chunk.seq_id, " reads unwritten KV"));
        h = Mix(h ^ entry);
      }
      next.push_back(static_cast<int32_t>(h % vocab_size_));
    }
    ++num_forwards_;
    return next;
  }

  const std::string& error() const { return error_; }
  int64_t num_forwards() const { return num_forwards_; }

 private:
  void Fail(const std::string& message) {
    if (error_.empty()) error_ = message;
  }

  const int32_t block_size_;
  const int32_t vocab_size_;
  std::vector<uint64_t> kv_;  // [num_blocks * block_size]; 0 = never written
  std::string error_;
  int64_t num_forwards_ = 0;
};

}  // namespace moe::testing
