// The BPE model of tokenizer.json (models/bpe/model.rs of Hugging Face `tokenizers`): vocab,
// ranked merges applied lowest rank first (a heap over the pairs of one pre-token), unknown
// tokens, byte fallback (<0xNN>), continuing_subword_prefix / end_of_word_suffix,
// ignore_merges, and a bounded cache of pre-token results shared by all threads.
#pragma once

#include <array>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "nlohmann/json.hpp"

namespace moe::tokenizer_internal {

class BpeModel {
 public:
  static absl::StatusOr<std::unique_ptr<BpeModel>> FromJson(const nlohmann::json& model);

  // Appends the ids of one pre-token (valid UTF-8, non-empty).
  absl::Status Tokenize(std::string_view word, std::vector<int32_t>& ids) const;

  std::optional<int32_t> TokenToId(std::string_view token) const;
  // nullptr when the id is not in the vocab.
  const std::string* IdToToken(int32_t id) const;
  // One past the largest id of the vocab.
  int32_t id_end() const { return static_cast<int32_t>(id_to_token_.size()); }

 private:
  BpeModel() = default;
  absl::Status MergeWord(std::string_view word, std::vector<int32_t>& ids) const;

  struct MergeResult {
    uint32_t rank;
    int32_t new_id;
  };
  static uint64_t PairKey(int32_t left, int32_t right) {
    return (static_cast<uint64_t>(static_cast<uint32_t>(left)) << 32) |
           static_cast<uint32_t>(right);
  }

  absl::flat_hash_map<std::string, int32_t> vocab_;
  std::vector<std::string> id_to_token_;
  std::vector<bool> id_present_;
  absl::flat_hash_map<uint64_t, MergeResult> merges_;
  std::optional<std::string> unk_token_;
  std::string continuing_subword_prefix_;
  std::string end_of_word_suffix_;
  bool fuse_unk_ = false;
  bool byte_fallback_ = false;
  bool ignore_merges_ = false;
  std::array<int32_t, 256> byte_ids_{};   // <0xNN> tokens, -1 when missing
  std::array<int32_t, 128> ascii_ids_{};  // single ASCII characters, -1 when missing

  // Pre-token -> ids. Sharded; a full shard is cleared.
  static constexpr int kCacheShards = 16;
  static constexpr size_t kCacheEntriesPerShard = 4096;
  static constexpr size_t kMaxCachedWordBytes = 256;
  struct CacheShard {
    absl::Mutex mutex;
    absl::flat_hash_map<std::string, std::vector<int32_t>> entries ABSL_GUARDED_BY(mutex);
  };
  mutable std::unique_ptr<CacheShard[]> cache_;
};

}  // namespace moe::tokenizer_internal
