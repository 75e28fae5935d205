#include "engine/tokenizer/components.h"

#include <utf8proc.h>

#include <array>
#include <cstdlib>
#include <optional>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "engine/common/status_macros.h"
#include "engine/tokenizer/json_util.h"
#include "engine/tokenizer/pattern.h"
#include "engine/tokenizer/utf8.h"

namespace moe::tokenizer_internal {
namespace {

using nlohmann::json;

// ---- Byte-level alphabet -------------------------------------------------------------------

struct ByteLevelAlphabet {
  std::array<std::string, 256> byte_to_text;
  std::array<int16_t, 324> code_point_to_byte;  // the alphabet lives below U+0144
  ByteLevelAlphabet() {
    code_point_to_byte.fill(-1);
    std::array<char32_t, 256> code_points{};
    std::array<bool, 256> printable{};
    for (int b = '!'; b <= '~'; ++b) printable[b] = true;
    for (int b = 0xA1; b <= 0xAC; ++b) printable[b] = true;
    for (int b = 0xAE; b <= 0xFF; ++b) printable[b] = true;
    int next = 0;
    for (int b = 0; b < 256; ++b) {
      code_points[b] =
          printable[b] ? static_cast<char32_t>(b) : static_cast<char32_t>(256 + next++);
    }
    for (int b = 0; b < 256; ++b) {
      AppendUtf8(code_points[b], byte_to_text[b]);
      code_point_to_byte[code_points[b]] = static_cast<int16_t>(b);
    }
  }
};

const ByteLevelAlphabet& Alphabet() {
  static const ByteLevelAlphabet* alphabet = new ByteLevelAlphabet();
  return *alphabet;
}

// ---- Normalizers ---------------------------------------------------------------------------

class SequenceNormalizer : public Normalizer {
 public:
  explicit SequenceNormalizer(std::vector<std::unique_ptr<Normalizer>> parts)
      : parts_(std::move(parts)) {}
  absl::Status Normalize(std::string& text) const override {
    for (const auto& part : parts_) RETURN_IF_ERROR(part->Normalize(text));
    return absl::OkStatus();
  }

 private:
  std::vector<std::unique_ptr<Normalizer>> parts_;
};

class UnicodeNormalizer : public Normalizer {
 public:
  explicit UnicodeNormalizer(int options) : options_(options) {}
  absl::Status Normalize(std::string& text) const override {
    bool ascii = true;
    for (char c : text) {
      if (static_cast<unsigned char>(c) >= 0x80) {
        ascii = false;
        break;
      }
    }
    if (ascii) return absl::OkStatus();
    utf8proc_uint8_t* result = nullptr;
    const utf8proc_ssize_t size =
        utf8proc_map(reinterpret_cast<const utf8proc_uint8_t*>(text.data()),
                     static_cast<utf8proc_ssize_t>(text.size()), &result,
                     static_cast<utf8proc_option_t>(options_));
    if (size < 0) {
      return absl::InternalError(
          absl::StrCat("unicode normalization failed: ", utf8proc_errmsg(size)));
    }
    text.assign(reinterpret_cast<const char*>(result), static_cast<size_t>(size));
    std::free(result);
    return absl::OkStatus();
  }

 private:
  int options_;
};

class PrependNormalizer : public Normalizer {
 public:
  explicit PrependNormalizer(std::string prepend) : prepend_(std::move(prepend)) {}
  absl::Status Normalize(std::string& text) const override {
    if (!text.empty()) text.insert(0, prepend_);
    return absl::OkStatus();
  }

 private:
  std::string prepend_;
};

class ReplaceNormalizer : public Normalizer {
 public:
  ReplaceNormalizer(Pattern pattern, std::string content)
      : pattern_(std::move(pattern)), content_(std::move(content)) {}
  absl::Status Normalize(std::string& text) const override {
    if (pattern_.is_literal() && text.find(pattern_.literal()) == std::string::npos) {
      return absl::OkStatus();
    }
    std::string out;
    out.reserve(text.size() + text.size() / 4);
    RETURN_IF_ERROR(pattern_.ReplaceAll(text, content_, out));
    text = std::move(out);
    return absl::OkStatus();
  }

 private:
  Pattern pattern_;
  std::string content_;
};

class StripNormalizer : public Normalizer {
 public:
  StripNormalizer(bool left, bool right) : left_(left), right_(right) {}
  absl::Status Normalize(std::string& text) const override {
    size_t end = text.size();
    if (right_) {
      while (end > 0) {
        size_t start = end - 1;
        while (start > 0 && (static_cast<uint8_t>(text[start]) & 0xC0) == 0x80) --start;
        size_t probe = start;
        if (!IsWhitespace(NextCodePoint(text, probe))) break;
        end = start;
      }
    }
    size_t begin = 0;
    if (left_) {
      while (begin < end) {
        size_t next = begin;
        if (!IsWhitespace(NextCodePoint(text, next))) break;
        begin = next;
      }
    }
    text = text.substr(begin, end - begin);
    return absl::OkStatus();
  }

 private:
  bool left_, right_;
};

constexpr char kSupportedNormalizers[] = "NFC, NFD, NFKC, NFKD, Prepend, Replace, Strip, Sequence";

absl::StatusOr<std::unique_ptr<Normalizer>> MakeNormalizerImpl(const json& config) {
  ASSIGN_OR_RETURN(const std::string type, GetType(config, "normalizer"));
  const std::string where = absl::StrCat("normalizer ", type);
  if (type == "Sequence") {
    const auto it = config.find("normalizers");
    if (it == config.end() || !it->is_array()) {
      return JsonError(where, "'normalizers' must be an array");
    }
    std::vector<std::unique_ptr<Normalizer>> parts;
    for (const json& part : *it) {
      ASSIGN_OR_RETURN(auto normalizer, MakeNormalizerImpl(part));
      parts.push_back(std::move(normalizer));
    }
    return std::make_unique<SequenceNormalizer>(std::move(parts));
  }
  if (type == "NFC") return std::make_unique<UnicodeNormalizer>(UTF8PROC_STABLE | UTF8PROC_COMPOSE);
  if (type == "NFD") {
    return std::make_unique<UnicodeNormalizer>(UTF8PROC_STABLE | UTF8PROC_DECOMPOSE);
  }
  if (type == "NFKC") {
    return std::make_unique<UnicodeNormalizer>(UTF8PROC_STABLE | UTF8PROC_COMPOSE |
                                               UTF8PROC_COMPAT);
  }
  if (type == "NFKD") {
    return std::make_unique<UnicodeNormalizer>(UTF8PROC_STABLE | UTF8PROC_DECOMPOSE |
                                               UTF8PROC_COMPAT);
  }
  if (type == "Prepend") {
    ASSIGN_OR_RETURN(std::string prepend, GetString(config, "prepend", where));
    return std::make_unique<PrependNormalizer>(std::move(prepend));
  }
  if (type == "Replace") {
    const auto it = config.find("pattern");
    if (it == config.end()) return JsonError(where, "'pattern' is missing");
    ASSIGN_OR_RETURN(Pattern pattern, Pattern::FromJson(*it, where));
    ASSIGN_OR_RETURN(std::string content, GetString(config, "content", where));
    return std::make_unique<ReplaceNormalizer>(std::move(pattern), std::move(content));
  }
  if (type == "Strip") {
    ASSIGN_OR_RETURN(const bool left, GetBool(config, "strip_left", true, where));
    ASSIGN_OR_RETURN(const bool right, GetBool(config, "strip_right", true, where));
    return std::make_unique<StripNormalizer>(left, right);
  }
  return JsonError(
      "normalizer",
      absl::StrCat("type '", type, "' is not supported; supported: ", kSupportedNormalizers));
}

// ---- Splitting with a delimiter behavior (NormalizedString::split) -------------------------

enum class Behavior { kRemoved, kIsolated, kMergedWithPrevious, kMergedWithNext, kContiguous };

struct Span {
  size_t start;
  size_t end;
  bool is_match;
};

// Spans covering `size` bytes from the matches of a pattern (Pattern::find_matches).
void CoverWithMatches(size_t size, const std::vector<Match>& matches, bool invert,
                      std::vector<Span>& spans) {
  spans.clear();
  if (size == 0) {
    spans.push_back({0, 0, false});
    return;
  }
  size_t prev = 0;
  for (const Match& m : matches) {
    if (prev != m.start) spans.push_back({prev, m.start, invert});
    spans.push_back({m.start, m.end, !invert});
    prev = m.end;
  }
  if (prev != size) spans.push_back({prev, size, invert});
}

// Appends to `out` the pieces of `piece` the behavior keeps (empty ones dropped).
void SplitPiece(const Piece& piece, std::vector<Span>& spans, Behavior behavior,
                std::vector<Piece>& out) {
  std::vector<Span> kept;
  kept.reserve(spans.size());
  switch (behavior) {
    case Behavior::kIsolated:
      for (const Span& s : spans) kept.push_back({s.start, s.end, false});
      break;
    case Behavior::kRemoved:
      kept = spans;
      break;
    case Behavior::kContiguous: {
      bool previous_match = false;
      for (const Span& s : spans) {
        if (s.is_match == previous_match && !kept.empty()) {
          kept.back().end = s.end;
        } else {
          kept.push_back({s.start, s.end, false});
        }
        previous_match = s.is_match;
      }
      break;
    }
    case Behavior::kMergedWithPrevious: {
      bool previous_match = false;
      for (const Span& s : spans) {
        if (s.is_match && !previous_match && !kept.empty()) {
          kept.back().end = s.end;
        } else {
          kept.push_back({s.start, s.end, false});
        }
        previous_match = s.is_match;
      }
      break;
    }
    case Behavior::kMergedWithNext: {
      bool previous_match = false;
      for (auto it = spans.rbegin(); it != spans.rend(); ++it) {
        if (it->is_match && !previous_match && !kept.empty()) {
          kept.back().start = it->start;
        } else {
          kept.push_back({it->start, it->end, false});
        }
        previous_match = it->is_match;
      }
      std::reverse(kept.begin(), kept.end());
      break;
    }
  }
  for (const Span& s : kept) {
    if (s.is_match || s.end == s.start) continue;  // removed, or empty
    Piece sub;
    sub.text.assign(piece.text, s.start, s.end - s.start);
    sub.at_origin = piece.at_origin && s.start == 0;
    out.push_back(std::move(sub));
  }
}

// Applies `split` to every unresolved piece.
template <typename SplitFn>
absl::Status ForEachPiece(std::vector<Piece>& pieces, SplitFn split) {
  std::vector<Piece> out;
  out.reserve(pieces.size() * 2);
  for (Piece& piece : pieces) {
    if (piece.added_id >= 0) {
      out.push_back(std::move(piece));
      continue;
    }
    RETURN_IF_ERROR(split(piece, out));
  }
  pieces = std::move(out);
  return absl::OkStatus();
}

absl::StatusOr<Behavior> ParseBehavior(const json& config, std::string_view where) {
  ASSIGN_OR_RETURN(const std::string name, GetString(config, "behavior", where));
  if (name == "Removed") return Behavior::kRemoved;
  if (name == "Isolated") return Behavior::kIsolated;
  if (name == "MergedWithPrevious") return Behavior::kMergedWithPrevious;
  if (name == "MergedWithNext") return Behavior::kMergedWithNext;
  if (name == "Contiguous") return Behavior::kContiguous;
  return JsonError(where, absl::StrCat("behavior '", name,
                                       "' is not supported; supported: Removed, Isolated, "
                                       "MergedWithPrevious, MergedWithNext, Contiguous"));
}

// ---- Pre-tokenizers ------------------------------------------------------------------------

class SequencePreTokenizer : public PreTokenizer {
 public:
  explicit SequencePreTokenizer(std::vector<std::unique_ptr<PreTokenizer>> parts)
      : parts_(std::move(parts)) {}
  absl::Status PreTokenize(std::vector<Piece>& pieces) const override {
    for (const auto& part : parts_) RETURN_IF_ERROR(part->PreTokenize(pieces));
    return absl::OkStatus();
  }

 private:
  std::vector<std::unique_ptr<PreTokenizer>> parts_;
};

class SplitPreTokenizer : public PreTokenizer {
 public:
  SplitPreTokenizer(Pattern pattern, Behavior behavior, bool invert)
      : pattern_(std::move(pattern)), behavior_(behavior), invert_(invert) {}
  absl::Status PreTokenize(std::vector<Piece>& pieces) const override {
    std::vector<Match> matches;
    std::vector<Span> spans;
    return ForEachPiece(pieces, [&](const Piece& piece, std::vector<Piece>& out) {
      matches.clear();
      RETURN_IF_ERROR(pattern_.FindAll(piece.text, matches));
      CoverWithMatches(piece.text.size(), matches, invert_, spans);
      SplitPiece(piece, spans, behavior_, out);
      return absl::OkStatus();
    });
  }

 private:
  Pattern pattern_;
  Behavior behavior_;
  bool invert_;
};

// Spans where every character satisfying `is_match` is its own match.
template <typename Predicate>
void CoverWithCharMatches(std::string_view text, Predicate is_match, std::vector<Span>& spans) {
  spans.clear();
  if (text.empty()) {
    spans.push_back({0, 0, false});
    return;
  }
  size_t last_offset = 0;
  size_t pos = 0;
  while (pos < text.size()) {
    const size_t start = pos;
    const char32_t c = NextCodePoint(text, pos);
    if (is_match(c)) {
      if (last_offset < start) spans.push_back({last_offset, start, false});
      spans.push_back({start, pos, true});
      last_offset = pos;
    }
  }
  if (text.size() > last_offset) spans.push_back({last_offset, text.size(), false});
}

class DigitsPreTokenizer : public PreTokenizer {
 public:
  explicit DigitsPreTokenizer(bool individual) : individual_(individual) {}
  absl::Status PreTokenize(std::vector<Piece>& pieces) const override {
    std::vector<Span> spans;
    return ForEachPiece(pieces, [&](const Piece& piece, std::vector<Piece>& out) {
      CoverWithCharMatches(piece.text, IsNumeric, spans);
      SplitPiece(piece, spans, individual_ ? Behavior::kIsolated : Behavior::kContiguous, out);
      return absl::OkStatus();
    });
  }

 private:
  bool individual_;
};

enum class PrependScheme { kAlways, kFirst, kNever };

absl::StatusOr<PrependScheme> ParsePrependScheme(const json& config, std::string_view where) {
  const auto it = config.find("prepend_scheme");
  if (it != config.end() && !it->is_null()) {
    if (!it->is_string()) return JsonError(where, "'prepend_scheme' must be a string");
    const std::string name = it->get<std::string>();
    if (name == "always") return PrependScheme::kAlways;
    if (name == "first") return PrependScheme::kFirst;
    if (name == "never") return PrependScheme::kNever;
    return JsonError(where, absl::StrCat("prepend_scheme '", name,
                                         "' is not supported; supported: always, first, never"));
  }
  // Files older than tokenizers 0.14 have add_prefix_space instead.
  ASSIGN_OR_RETURN(const bool add_prefix_space, GetBool(config, "add_prefix_space", true, where));
  return add_prefix_space ? PrependScheme::kAlways : PrependScheme::kNever;
}

absl::StatusOr<std::string> ParseReplacement(const json& config, std::string_view where) {
  ASSIGN_OR_RETURN(std::string replacement, GetString(config, "replacement", where));
  size_t pos = 0;
  if (replacement.empty() || (NextCodePoint(replacement, pos), pos != replacement.size())) {
    return JsonError(where, "'replacement' must be exactly one character");
  }
  return replacement;
}

class MetaspacePreTokenizer : public PreTokenizer {
 public:
  MetaspacePreTokenizer(std::string replacement, PrependScheme scheme, bool split)
      : replacement_(std::move(replacement)), scheme_(scheme), split_(split) {}
  absl::Status PreTokenize(std::vector<Piece>& pieces) const override {
    const char32_t replacement_char = [&] {
      size_t pos = 0;
      return NextCodePoint(replacement_, pos);
    }();
    std::vector<Span> spans;
    return ForEachPiece(pieces, [&](Piece& piece, std::vector<Piece>& out) {
      std::string replaced;
      replaced.reserve(piece.text.size() + 8);
      for (char c : piece.text) {
        if (c == ' ') {
          replaced.append(replacement_);
        } else {
          replaced.push_back(c);
        }
      }
      const bool starts_with_replacement = replaced.starts_with(replacement_);
      if (!starts_with_replacement && (scheme_ == PrependScheme::kAlways ||
                                       (scheme_ == PrependScheme::kFirst && piece.at_origin))) {
        replaced.insert(0, replacement_);
      }
      piece.text = std::move(replaced);
      if (!split_) {
        if (!piece.text.empty()) out.push_back(std::move(piece));
        return absl::OkStatus();
      }
      CoverWithCharMatches(
          piece.text, [&](char32_t c) { return c == replacement_char; }, spans);
      SplitPiece(piece, spans, Behavior::kMergedWithNext, out);
      return absl::OkStatus();
    });
  }

 private:
  std::string replacement_;
  PrependScheme scheme_;
  bool split_;
};

constexpr char kGpt2Regex[] =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

class ByteLevelPreTokenizer : public PreTokenizer {
 public:
  ByteLevelPreTokenizer(bool add_prefix_space, std::optional<Pattern> regex)
      : add_prefix_space_(add_prefix_space), regex_(std::move(regex)) {}
  absl::Status PreTokenize(std::vector<Piece>& pieces) const override {
    std::vector<Match> matches;
    std::vector<Span> spans;
    std::vector<Piece> split;
    const ByteLevelAlphabet& alphabet = Alphabet();
    return ForEachPiece(pieces, [&](Piece& piece, std::vector<Piece>& out) {
      if (add_prefix_space_ && !piece.text.starts_with(' ')) piece.text.insert(0, " ");
      split.clear();
      if (regex_.has_value()) {
        matches.clear();
        RETURN_IF_ERROR(regex_->FindAll(piece.text, matches));
        CoverWithMatches(piece.text.size(), matches, /*invert=*/false, spans);
        SplitPiece(piece, spans, Behavior::kIsolated, split);
      } else if (!piece.text.empty()) {
        split.push_back(std::move(piece));
      }
      for (Piece& sub : split) {
        std::string mapped;
        mapped.reserve(sub.text.size() * 2);
        for (char c : sub.text) mapped.append(alphabet.byte_to_text[static_cast<uint8_t>(c)]);
        sub.text = std::move(mapped);
        out.push_back(std::move(sub));
      }
      return absl::OkStatus();
    });
  }

 private:
  bool add_prefix_space_;
  std::optional<Pattern> regex_;
};

constexpr char kSupportedPreTokenizers[] = "ByteLevel, Metaspace, Split, Digits, Sequence";

absl::StatusOr<std::unique_ptr<PreTokenizer>> MakePreTokenizerImpl(const json& config) {
  ASSIGN_OR_RETURN(const std::string type, GetType(config, "pre_tokenizer"));
  const std::string where = absl::StrCat("pre_tokenizer ", type);
  if (type == "Sequence") {
    const auto it = config.find("pretokenizers");
    if (it == config.end() || !it->is_array()) {
      return JsonError(where, "'pretokenizers' must be an array");
    }
    std::vector<std::unique_ptr<PreTokenizer>> parts;
    for (const json& part : *it) {
      ASSIGN_OR_RETURN(auto pre_tokenizer, MakePreTokenizerImpl(part));
      parts.push_back(std::move(pre_tokenizer));
    }
    return std::make_unique<SequencePreTokenizer>(std::move(parts));
  }
  if (type == "Split") {
    const auto it = config.find("pattern");
    if (it == config.end()) return JsonError(where, "'pattern' is missing");
    ASSIGN_OR_RETURN(Pattern pattern, Pattern::FromJson(*it, where));
    ASSIGN_OR_RETURN(const Behavior behavior, ParseBehavior(config, where));
    ASSIGN_OR_RETURN(const bool invert, GetBool(config, "invert", false, where));
    return std::make_unique<SplitPreTokenizer>(std::move(pattern), behavior, invert);
  }
  if (type == "Digits") {
    ASSIGN_OR_RETURN(const bool individual, GetBool(config, "individual_digits", false, where));
    return std::make_unique<DigitsPreTokenizer>(individual);
  }
  if (type == "Metaspace") {
    ASSIGN_OR_RETURN(std::string replacement, ParseReplacement(config, where));
    ASSIGN_OR_RETURN(const PrependScheme scheme, ParsePrependScheme(config, where));
    ASSIGN_OR_RETURN(const bool split, GetBool(config, "split", true, where));
    return std::make_unique<MetaspacePreTokenizer>(std::move(replacement), scheme, split);
  }
  if (type == "ByteLevel") {
    ASSIGN_OR_RETURN(const bool add_prefix_space, GetBool(config, "add_prefix_space", true, where));
    ASSIGN_OR_RETURN(const bool use_regex, GetBool(config, "use_regex", true, where));
    std::optional<Pattern> regex;
    if (use_regex) {
      ASSIGN_OR_RETURN(Pattern pattern, Pattern::Regex(kGpt2Regex, where));
      regex.emplace(std::move(pattern));
    }
    return std::make_unique<ByteLevelPreTokenizer>(add_prefix_space, std::move(regex));
  }
  return JsonError(
      "pre_tokenizer",
      absl::StrCat("type '", type, "' is not supported; supported: ", kSupportedPreTokenizers));
}

// ---- Post-processors -----------------------------------------------------------------------

class TemplatePostProcessor : public PostProcessor {
 public:
  TemplatePostProcessor(std::vector<int32_t> prefix, std::vector<int32_t> suffix)
      : prefix_(std::move(prefix)), suffix_(std::move(suffix)) {}
  void Process(std::vector<int32_t>& ids) const override {
    if (!prefix_.empty()) ids.insert(ids.begin(), prefix_.begin(), prefix_.end());
    ids.insert(ids.end(), suffix_.begin(), suffix_.end());
  }
  void Prefix(std::vector<int32_t>& ids) const override {
    ids.insert(ids.end(), prefix_.begin(), prefix_.end());
  }
  void Suffix(std::vector<int32_t>& ids) const override {
    ids.insert(ids.end(), suffix_.begin(), suffix_.end());
  }

 private:
  std::vector<int32_t> prefix_;
  std::vector<int32_t> suffix_;
};

class SequencePostProcessor : public PostProcessor {
 public:
  explicit SequencePostProcessor(std::vector<std::unique_ptr<PostProcessor>> parts)
      : parts_(std::move(parts)) {}
  void Process(std::vector<int32_t>& ids) const override {
    for (const auto& part : parts_) part->Process(ids);
  }
  void Prefix(std::vector<int32_t>& ids) const override {
    for (auto it = parts_.rbegin(); it != parts_.rend(); ++it) (*it)->Prefix(ids);
  }
  void Suffix(std::vector<int32_t>& ids) const override {
    for (const auto& part : parts_) part->Suffix(ids);
  }

 private:
  std::vector<std::unique_ptr<PostProcessor>> parts_;
};

// A post-processor's token id: an integer naming a token of the vocabulary [0, vocab_size).
absl::StatusOr<int32_t> VocabId(const json& value, int32_t vocab_size, std::string_view where,
                                std::string_view what) {
  if (!value.is_number_integer()) {
    return JsonError(where, absl::StrCat(Sv(what), " has a non-integer id ", value.dump()));
  }
  // JSON parses non-negative integers as unsigned, negative ones as signed.
  const bool inside = value.is_number_unsigned()
                          ? value.get<uint64_t>() < static_cast<uint64_t>(vocab_size)
                          : value.get<int64_t>() >= 0 && value.get<int64_t>() < vocab_size;
  if (!inside) {
    return JsonError(where,
                     absl::StrCat(Sv(what), " has id ", value.dump(),
                                  ", outside the vocabulary (ids 0 to ", vocab_size - 1, ")"));
  }
  return value.get<int32_t>();
}

absl::StatusOr<std::unique_ptr<PostProcessor>> MakeTemplate(const json& config, int32_t vocab_size,
                                                            std::string_view where) {
  const auto single = config.find("single");
  if (single == config.end() || !single->is_array()) {
    return JsonError(where, "'single' must be an array");
  }
  const auto special = config.find("special_tokens");
  std::vector<int32_t> prefix, suffix;
  bool seen_sequence = false;
  for (const json& item : *single) {
    if (!item.is_object() || item.size() != 1) {
      return JsonError(where, absl::StrCat("template item must be {\"SpecialToken\": ...} or "
                                           "{\"Sequence\": ...}, got ",
                                           item.dump()));
    }
    if (item.contains("Sequence")) {
      if (seen_sequence) return JsonError(where, "'single' has more than one $A");
      seen_sequence = true;
      continue;
    }
    const auto token = item.find("SpecialToken");
    if (token == item.end() || !token->is_object()) {
      return JsonError(where, absl::StrCat("unknown template item ", item.dump()));
    }
    ASSIGN_OR_RETURN(const std::string name, GetString(*token, "id", where));
    if (special == config.end() || !special->is_object() || !special->contains(name)) {
      return JsonError(where, absl::StrCat("special token '", name,
                                           "' is used in 'single' but missing from "
                                           "'special_tokens'"));
    }
    const json& entry = (*special)[name];
    const auto ids = entry.find("ids");
    if (ids == entry.end() || !ids->is_array()) {
      return JsonError(where, absl::StrCat("special token '", name, "' needs an 'ids' array"));
    }
    for (const json& id : *ids) {
      ASSIGN_OR_RETURN(const int32_t token_id,
                       VocabId(id, vocab_size, where, absl::StrCat("special token '", name, "'")));
      (seen_sequence ? suffix : prefix).push_back(token_id);
    }
  }
  if (!seen_sequence) return JsonError(where, "'single' has no $A sequence");
  return std::make_unique<TemplatePostProcessor>(std::move(prefix), std::move(suffix));
}

absl::StatusOr<int32_t> PairId(const json& config, std::string_view key, int32_t vocab_size,
                               std::string_view where) {
  const auto it = config.find(key);
  if (it == config.end() || !it->is_array() || it->size() != 2) {
    return JsonError(where, absl::StrCat("'", Sv(key), "' must be [token, id]"));
  }
  return VocabId((*it)[1], vocab_size, where, absl::StrCat("'", Sv(key), "'"));
}

constexpr char kSupportedPostProcessors[] =
    "TemplateProcessing, ByteLevel, RobertaProcessing, BertProcessing, Sequence";

absl::StatusOr<std::unique_ptr<PostProcessor>> MakePostProcessorImpl(const json& config,
                                                                     int32_t vocab_size) {
  ASSIGN_OR_RETURN(const std::string type, GetType(config, "post_processor"));
  const std::string where = absl::StrCat("post_processor ", type);
  if (type == "Sequence") {
    const auto it = config.find("processors");
    if (it == config.end() || !it->is_array()) {
      return JsonError(where, "'processors' must be an array");
    }
    std::vector<std::unique_ptr<PostProcessor>> parts;
    for (const json& part : *it) {
      ASSIGN_OR_RETURN(auto processor, MakePostProcessorImpl(part, vocab_size));
      parts.push_back(std::move(processor));
    }
    return std::make_unique<SequencePostProcessor>(std::move(parts));
  }
  if (type == "TemplateProcessing") return MakeTemplate(config, vocab_size, where);
  if (type == "ByteLevel") {
    return std::make_unique<TemplatePostProcessor>(std::vector<int32_t>{}, std::vector<int32_t>{});
  }
  if (type == "RobertaProcessing" || type == "BertProcessing") {
    ASSIGN_OR_RETURN(const int32_t cls, PairId(config, "cls", vocab_size, where));
    ASSIGN_OR_RETURN(const int32_t sep, PairId(config, "sep", vocab_size, where));
    return std::make_unique<TemplatePostProcessor>(std::vector<int32_t>{cls},
                                                   std::vector<int32_t>{sep});
  }
  return JsonError(
      "post_processor",
      absl::StrCat("type '", type, "' is not supported; supported: ", kSupportedPostProcessors));
}

}  // namespace

absl::StatusOr<std::unique_ptr<Normalizer>> MakeNormalizer(const json& config) {
  if (config.is_null()) return std::unique_ptr<Normalizer>();
  return MakeNormalizerImpl(config);
}

absl::StatusOr<std::unique_ptr<PreTokenizer>> MakePreTokenizer(const json& config) {
  if (config.is_null()) return std::unique_ptr<PreTokenizer>();
  return MakePreTokenizerImpl(config);
}

absl::StatusOr<std::unique_ptr<PostProcessor>> MakePostProcessor(const json& config,
                                                                 int32_t vocab_size) {
  if (config.is_null()) return std::unique_ptr<PostProcessor>();
  return MakePostProcessorImpl(config, vocab_size);
}

std::unique_ptr<PostProcessor> MakeSimpleTemplate(std::vector<int32_t> prefix,
                                                  std::vector<int32_t> suffix) {
  return std::make_unique<TemplatePostProcessor>(std::move(prefix), std::move(suffix));
}

const std::string& ByteToUnicode(uint8_t byte) { return Alphabet().byte_to_text[byte]; }

int ByteFromUnicode(char32_t code_point) {
  if (code_point >= Alphabet().code_point_to_byte.size()) return -1;
  return Alphabet().code_point_to_byte[code_point];
}

}  // namespace moe::tokenizer_internal
