// Added tokens of tokenizer.json (added_vocabulary.rs of Hugging Face `tokenizers`): special
// and normal tokens, matched leftmost-longest in the raw text (normalized: false) or in the
// normalized text (normalized: true), with lstrip / rstrip / single_word.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "engine/tokenizer/components.h"

namespace moe::tokenizer_internal {

struct AddedToken {
  int32_t id = -1;
  std::string content;
  bool single_word = false;
  bool lstrip = false;
  bool rstrip = false;
  bool normalized = true;
  bool special = false;
};

// Leftmost-longest matching of a set of byte strings (a trie walked from each position).
class TokenMatcher {
 public:
  void Add(std::string_view pattern, int32_t value);
  bool empty() const { return values_.empty(); }
  // Leftmost-longest non-overlapping matches, as aho-corasick's find_iter with
  // MatchKind::LeftmostLongest gives them.
  struct Found {
    size_t start;
    size_t end;
    int32_t value;
  };
  void FindAll(std::string_view text, std::vector<Found>& found) const;

 private:
  // node * 256 + byte -> child node. Node 0 is the root.
  absl::flat_hash_map<uint32_t, uint32_t> edges_;
  std::vector<int32_t> node_value_{-1};  // value (index) ending at the node, or -1
  std::vector<int32_t> values_;
  bool first_byte_[256] = {};
};

class AddedVocabulary {
 public:
  // `tokens` in file order. The normalizer (may be null) normalizes the patterns of
  // normalized tokens.
  absl::Status Init(std::vector<AddedToken> tokens, const Normalizer* normalizer);

  // Splits `text` on added tokens: first the non-normalized ones in the raw text, then each
  // remaining piece is normalized and split on the normalized ones. Special tokens are only
  // matched when `parse_special`.
  absl::Status ExtractAndNormalize(std::string_view text, const Normalizer* normalizer,
                                   bool parse_special, std::vector<Piece>& pieces) const;

  const std::vector<AddedToken>& tokens() const { return tokens_; }

 private:
  void Split(const Piece& piece, const TokenMatcher& matcher, bool parse_special,
             std::vector<Piece>& out) const;

  std::vector<AddedToken> tokens_;
  TokenMatcher raw_matcher_;         // values index tokens_
  TokenMatcher normalized_matcher_;  // values index tokens_
};

}  // namespace moe::tokenizer_internal
