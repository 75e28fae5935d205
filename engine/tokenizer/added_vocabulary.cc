#include "engine/tokenizer/added_vocabulary.h"

#include <utility>

#include "engine/common/status_macros.h"
#include "engine/tokenizer/utf8.h"

namespace moe::tokenizer_internal {

void TokenMatcher::Add(std::string_view pattern, int32_t value) {
  if (pattern.empty()) return;
  uint32_t node = 0;
  for (char c : pattern) {
    const uint32_t key = node * 256 + static_cast<uint8_t>(c);
    const auto it = edges_.find(key);
    if (it != edges_.end()) {
      node = it->second;
    } else {
      const uint32_t child = static_cast<uint32_t>(node_value_.size());
      node_value_.push_back(-1);
      edges_[key] = child;
      node = child;
    }
  }
  // The first pattern added wins for a duplicate (aho-corasick reports the lowest pattern).
  if (node_value_[node] < 0) node_value_[node] = value;
  values_.push_back(value);
  first_byte_[static_cast<uint8_t>(pattern[0])] = true;
}

void TokenMatcher::FindAll(std::string_view text, std::vector<Found>& found) const {
  if (values_.empty()) return;
  size_t pos = 0;
  while (pos < text.size()) {
    if (!first_byte_[static_cast<uint8_t>(text[pos])]) {
      ++pos;
      continue;
    }
    uint32_t node = 0;
    size_t best_end = 0;
    int32_t best_value = -1;
    for (size_t i = pos; i < text.size(); ++i) {
      const auto it = edges_.find(node * 256 + static_cast<uint8_t>(text[i]));
      if (it == edges_.end()) break;
      node = it->second;
      if (node_value_[node] >= 0) {
        best_end = i + 1;
        best_value = node_value_[node];
      }
    }
    if (best_value >= 0) {
      found.push_back({pos, best_end, best_value});
      pos = best_end;
    } else {
      ++pos;
    }
  }
}

absl::Status AddedVocabulary::Init(std::vector<AddedToken> tokens, const Normalizer* normalizer) {
  tokens_ = std::move(tokens);
  // Patterns go in as the reference builds them: special tokens first, then the others.
  for (const bool special_pass : {true, false}) {
    for (size_t i = 0; i < tokens_.size(); ++i) {
      const AddedToken& token = tokens_[i];
      if (token.special != special_pass || token.content.empty()) continue;
      if (!token.normalized) {
        raw_matcher_.Add(token.content, static_cast<int32_t>(i));
        continue;
      }
      std::string pattern = token.content;
      if (normalizer != nullptr) RETURN_IF_ERROR(normalizer->Normalize(pattern));
      normalized_matcher_.Add(pattern, static_cast<int32_t>(i));
    }
  }
  return absl::OkStatus();
}

namespace {

bool EndsWithWordChar(std::string_view text) {
  return !text.empty() && IsWordChar(PrevCodePoint(text, text.size()));
}

bool StartsWithWordChar(std::string_view text) {
  if (text.empty()) return false;
  size_t pos = 0;
  return IsWordChar(NextCodePoint(text, pos));
}

// Start of the whitespace run that ends `text`.
size_t TrailingWhitespaceStart(std::string_view text) {
  size_t end = text.size();
  while (end > 0) {
    size_t start = end - 1;
    while (start > 0 && (static_cast<uint8_t>(text[start]) & 0xC0) == 0x80) --start;
    size_t probe = start;
    if (!IsWhitespace(NextCodePoint(text, probe))) break;
    end = start;
  }
  return end;
}

// Length of the whitespace run that starts `text`.
size_t LeadingWhitespaceLength(std::string_view text) {
  size_t pos = 0;
  while (pos < text.size()) {
    size_t next = pos;
    if (!IsWhitespace(NextCodePoint(text, next))) break;
    pos = next;
  }
  return pos;
}

}  // namespace

void AddedVocabulary::Split(const Piece& piece, const TokenMatcher& matcher, bool parse_special,
                            std::vector<Piece>& out) const {
  const std::string_view text = piece.text;
  auto emit = [&](size_t start, size_t stop, int32_t id) {
    if (stop <= start) return;  // empty pieces are dropped
    Piece sub;
    sub.text.assign(text.substr(start, stop - start));
    sub.at_origin = piece.at_origin && start == 0;
    sub.added_id = id;
    out.push_back(std::move(sub));
  };
  std::vector<TokenMatcher::Found> found;
  matcher.FindAll(text, found);
  size_t start_offset = 0;
  for (const auto& match : found) {
    const AddedToken& token = tokens_[match.value];
    size_t start = match.start;
    size_t stop = match.end;
    if (token.special && !parse_special) continue;
    if (token.single_word) {
      const bool start_space = start == 0 || !EndsWithWordChar(text.substr(0, start));
      const bool stop_space = stop == text.size() || !StartsWithWordChar(text.substr(stop));
      if (!start_space || !stop_space) continue;
    }
    if (token.lstrip) {
      start = std::max(TrailingWhitespaceStart(text.substr(0, start)), start_offset);
    }
    if (token.rstrip) stop += LeadingWhitespaceLength(text.substr(stop));
    if (start_offset < start) emit(start_offset, start, -1);
    emit(start, stop, token.id);
    start_offset = stop;
  }
  if (start_offset < text.size()) emit(start_offset, text.size(), -1);
}

absl::Status AddedVocabulary::ExtractAndNormalize(std::string_view text,
                                                  const Normalizer* normalizer, bool parse_special,
                                                  std::vector<Piece>& pieces) const {
  Piece whole;
  whole.text.assign(text);
  whole.at_origin = true;
  std::vector<Piece> raw;
  if (raw_matcher_.empty()) {
    if (!whole.text.empty()) raw.push_back(std::move(whole));
  } else {
    Split(whole, raw_matcher_, parse_special, raw);
  }
  for (Piece& piece : raw) {
    if (piece.added_id >= 0) {
      pieces.push_back(std::move(piece));
      continue;
    }
    if (normalizer != nullptr) RETURN_IF_ERROR(normalizer->Normalize(piece.text));
    if (piece.text.empty()) continue;
    if (normalized_matcher_.empty()) {
      pieces.push_back(std::move(piece));
    } else {
      Split(piece, normalized_matcher_, parse_special, pieces);
    }
  }
  return absl::OkStatus();
}

}  // namespace moe::tokenizer_internal
