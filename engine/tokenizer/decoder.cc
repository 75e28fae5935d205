#include "engine/tokenizer/decoder.h"

#include <algorithm>
#include <optional>
#include <utility>

#include "absl/strings/str_cat.h"
#include "engine/common/status_macros.h"
#include "engine/tokenizer/components.h"
#include "engine/tokenizer/json_util.h"
#include "engine/tokenizer/pattern.h"
#include "engine/tokenizer/utf8.h"

namespace moe::tokenizer_internal {
namespace {

using nlohmann::json;

// Feeds `chunks` through `stage` and returns its output.
absl::Status PushAll(DecodeStage& stage, std::vector<Chunk>& chunks, std::vector<Chunk>& out) {
  for (Chunk& chunk : chunks) RETURN_IF_ERROR(stage.Push(std::move(chunk), out));
  return absl::OkStatus();
}

// ---- Sequence ------------------------------------------------------------------------------

class SequenceStage : public DecodeStage {
 public:
  explicit SequenceStage(std::vector<std::unique_ptr<DecodeStage>> stages)
      : stages_(std::move(stages)) {}
  absl::Status Push(Chunk chunk, std::vector<Chunk>& out) override {
    std::vector<Chunk> current;
    current.push_back(std::move(chunk));
    return Run(0, current, /*finish=*/false, out);
  }
  absl::Status Finish(std::vector<Chunk>& out) override {
    std::vector<Chunk> current;
    return Run(0, current, /*finish=*/true, out);
  }

 private:
  // Pushes `input` through stages[first..]; when finishing, each stage is finished after its
  // input is in.
  absl::Status Run(size_t first, std::vector<Chunk>& input, bool finish, std::vector<Chunk>& out) {
    std::vector<Chunk> current = std::move(input);
    for (size_t i = first; i < stages_.size(); ++i) {
      std::vector<Chunk> next;
      RETURN_IF_ERROR(PushAll(*stages_[i], current, next));
      if (finish) RETURN_IF_ERROR(stages_[i]->Finish(next));
      current = std::move(next);
    }
    for (Chunk& chunk : current) out.push_back(std::move(chunk));
    return absl::OkStatus();
  }
  std::vector<std::unique_ptr<DecodeStage>> stages_;
};

class SequenceDecoder : public Decoder {
 public:
  explicit SequenceDecoder(std::vector<std::unique_ptr<Decoder>> parts)
      : parts_(std::move(parts)) {}
  absl::Status DecodeChain(std::vector<std::string>& tokens) const override {
    for (const auto& part : parts_) RETURN_IF_ERROR(part->DecodeChain(tokens));
    return absl::OkStatus();
  }
  std::unique_ptr<DecodeStage> MakeStage() const override {
    std::vector<std::unique_ptr<DecodeStage>> stages;
    for (const auto& part : parts_) stages.push_back(part->MakeStage());
    return std::make_unique<SequenceStage>(std::move(stages));
  }

 private:
  std::vector<std::unique_ptr<Decoder>> parts_;
};

// ---- ByteLevel -----------------------------------------------------------------------------

// A token whose characters are all in the byte-level alphabet becomes those bytes; any other
// token contributes its own UTF-8 bytes.
void AppendByteLevelBytes(std::string_view token, std::string& bytes) {
  const size_t start = bytes.size();
  size_t pos = 0;
  while (pos < token.size()) {
    const int byte = ByteFromUnicode(NextCodePoint(token, pos));
    if (byte < 0) {
      bytes.resize(start);
      bytes.append(token);
      return;
    }
    bytes.push_back(static_cast<char>(byte));
  }
}

// Whole tokens in, one growing token of lossy-decoded text out.
class ByteLevelStage : public DecodeStage {
 public:
  absl::Status Push(Chunk chunk, std::vector<Chunk>& out) override {
    token_.append(chunk.text);
    if (!chunk.token_end) return absl::OkStatus();
    std::string bytes;
    AppendByteLevelBytes(token_, bytes);
    token_.clear();
    std::string text;
    AppendUtf8LossyStreaming(bytes, pending_, text);
    if (!text.empty()) out.push_back({std::move(text), false});
    return absl::OkStatus();
  }
  absl::Status Finish(std::vector<Chunk>& out) override {
    std::string text;
    if (!token_.empty()) {
      std::string bytes;
      AppendByteLevelBytes(token_, bytes);
      token_.clear();
      AppendUtf8LossyStreaming(bytes, pending_, text);
    }
    FinishUtf8Lossy(pending_, text);
    out.push_back({std::move(text), true});
    return absl::OkStatus();
  }

 private:
  std::string token_;
  std::string pending_;
};

class ByteLevelDecoder : public Decoder {
 public:
  absl::Status DecodeChain(std::vector<std::string>& tokens) const override {
    std::string bytes;
    for (const std::string& token : tokens) AppendByteLevelBytes(token, bytes);
    std::string text;
    AppendUtf8Lossy(bytes, text);
    tokens.assign(1, std::move(text));
    return absl::OkStatus();
  }
  std::unique_ptr<DecodeStage> MakeStage() const override {
    return std::make_unique<ByteLevelStage>();
  }
};

// ---- ByteFallback --------------------------------------------------------------------------

// "<0xNN>" -> NN (Rust's u8::from_str_radix also takes a leading '+').
std::optional<uint8_t> ParseByteToken(std::string_view token) {
  if (token.size() != 6 || !token.starts_with("<0x") || token.back() != '>') return std::nullopt;
  auto digit = [](char c) -> int {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
  };
  const int high = digit(token[3]);
  const int low = digit(token[4]);
  if (low < 0) return std::nullopt;
  if (high < 0) {
    if (token[3] == '+') return static_cast<uint8_t>(low);
    return std::nullopt;
  }
  return static_cast<uint8_t>(high * 16 + low);
}

// A run of byte tokens becomes its text when it is valid UTF-8, else one U+FFFD per byte.
void FlushByteRun(std::string& run, std::vector<std::string>& out) {
  if (run.empty()) return;
  if (ValidateUtf8(run).ok()) {
    out.push_back(std::move(run));
  } else {
    for (size_t i = 0; i < run.size(); ++i) out.emplace_back(kReplacementUtf8);
  }
  run.clear();
}

class ByteFallbackStage : public DecodeStage {
 public:
  absl::Status Push(Chunk chunk, std::vector<Chunk>& out) override {
    if (passthrough_) {  // the current token is already known not to be a byte token
      passthrough_ = !chunk.token_end;
      out.push_back(std::move(chunk));
      return absl::OkStatus();
    }
    token_.append(chunk.text);
    if (!chunk.token_end) {
      if (token_.size() > 6) {
        EmitRun(out);
        out.push_back({std::move(token_), false});
        token_.clear();
        passthrough_ = true;
      }
      return absl::OkStatus();
    }
    if (const auto byte = ParseByteToken(token_); byte.has_value()) {
      run_.push_back(static_cast<char>(*byte));
    } else {
      EmitRun(out);
      out.push_back({std::move(token_), true});
    }
    token_.clear();
    return absl::OkStatus();
  }
  absl::Status Finish(std::vector<Chunk>& out) override {
    if (!token_.empty()) {
      EmitRun(out);
      out.push_back({std::move(token_), true});
      token_.clear();
    }
    EmitRun(out);
    return absl::OkStatus();
  }

 private:
  void EmitRun(std::vector<Chunk>& out) {
    std::vector<std::string> texts;
    FlushByteRun(run_, texts);
    for (std::string& text : texts) out.push_back({std::move(text), true});
  }
  std::string token_;
  std::string run_;
  bool passthrough_ = false;
};

class ByteFallbackDecoder : public Decoder {
 public:
  absl::Status DecodeChain(std::vector<std::string>& tokens) const override {
    std::vector<std::string> out;
    out.reserve(tokens.size());
    std::string run;
    for (std::string& token : tokens) {
      if (const auto byte = ParseByteToken(token); byte.has_value()) {
        run.push_back(static_cast<char>(*byte));
      } else {
        FlushByteRun(run, out);
        out.push_back(std::move(token));
      }
    }
    FlushByteRun(run, out);
    tokens = std::move(out);
    return absl::OkStatus();
  }
  std::unique_ptr<DecodeStage> MakeStage() const override {
    return std::make_unique<ByteFallbackStage>();
  }
};

// ---- Fuse ----------------------------------------------------------------------------------

class FuseStage : public DecodeStage {
 public:
  absl::Status Push(Chunk chunk, std::vector<Chunk>& out) override {
    if (!chunk.text.empty()) out.push_back({std::move(chunk.text), false});
    return absl::OkStatus();
  }
  absl::Status Finish(std::vector<Chunk>& out) override {
    out.push_back({"", true});
    return absl::OkStatus();
  }
};

class FuseDecoder : public Decoder {
 public:
  absl::Status DecodeChain(std::vector<std::string>& tokens) const override {
    std::string joined;
    for (const std::string& token : tokens) joined.append(token);
    tokens.assign(1, std::move(joined));
    return absl::OkStatus();
  }
  std::unique_ptr<DecodeStage> MakeStage() const override { return std::make_unique<FuseStage>(); }
};

// ---- Replace -------------------------------------------------------------------------------

class ReplaceStage : public DecodeStage {
 public:
  ReplaceStage(const Pattern& pattern, const std::string& content)
      : pattern_(pattern), content_(content) {}
  absl::Status Push(Chunk chunk, std::vector<Chunk>& out) override {
    pending_.append(chunk.text);
    std::string text;
    if (chunk.token_end) {
      RETURN_IF_ERROR(pattern_.ReplaceAll(pending_, content_, text));
      pending_.clear();
      out.push_back({std::move(text), true});
      return absl::OkStatus();
    }
    if (!pattern_.is_literal()) return absl::OkStatus();  // a regex sees whole tokens only
    // Replace every match that is complete; keep a tail that could start one.
    const std::string& literal = pattern_.literal();
    size_t pos = 0;
    if (!literal.empty()) {
      size_t found;
      while ((found = pending_.find(literal, pos)) != std::string::npos) {
        text.append(pending_, pos, found - pos);
        text.append(content_);
        pos = found + literal.size();
      }
    }
    size_t keep_from = pending_.size();
    if (!literal.empty()) {
      const size_t max_keep = std::min(literal.size() - 1, pending_.size() - pos);
      for (size_t keep = max_keep; keep > 0; --keep) {
        if (literal.compare(0, keep, pending_, pending_.size() - keep, keep) == 0) {
          keep_from = pending_.size() - keep;
          break;
        }
      }
    }
    text.append(pending_, pos, keep_from - pos);
    pending_.erase(0, keep_from);
    if (!text.empty()) out.push_back({std::move(text), false});
    return absl::OkStatus();
  }
  absl::Status Finish(std::vector<Chunk>& out) override {
    if (pending_.empty()) return absl::OkStatus();
    std::string text;
    RETURN_IF_ERROR(pattern_.ReplaceAll(pending_, content_, text));
    pending_.clear();
    out.push_back({std::move(text), false});
    return absl::OkStatus();
  }

 private:
  const Pattern& pattern_;
  const std::string& content_;
  std::string pending_;
};

class ReplaceDecoder : public Decoder {
 public:
  ReplaceDecoder(Pattern pattern, std::string content)
      : pattern_(std::move(pattern)), content_(std::move(content)) {}
  absl::Status DecodeChain(std::vector<std::string>& tokens) const override {
    for (std::string& token : tokens) {
      std::string replaced;
      RETURN_IF_ERROR(pattern_.ReplaceAll(token, content_, replaced));
      token = std::move(replaced);
    }
    return absl::OkStatus();
  }
  std::unique_ptr<DecodeStage> MakeStage() const override {
    return std::make_unique<ReplaceStage>(pattern_, content_);
  }

 private:
  Pattern pattern_;
  std::string content_;
};

// ---- Strip ---------------------------------------------------------------------------------

// Removes up to `start` leading and up to `stop` trailing `content` characters of each token.
class StripStage : public DecodeStage {
 public:
  StripStage(char32_t content, size_t start, size_t stop)
      : content_(content), start_(start), stop_(stop) {}
  absl::Status Push(Chunk chunk, std::vector<Chunk>& out) override {
    std::string text;
    size_t pos = 0;
    while (pos < chunk.text.size()) {
      const size_t begin = pos;
      const char32_t c = NextCodePoint(chunk.text, pos);
      const std::string_view encoded(chunk.text.data() + begin, pos - begin);
      if (leading_ < start_) {
        ++leading_;
        if (c == content_) continue;
        leading_ = start_;  // stripping ends at the first other character
      }
      if (stop_ == 0) {
        text.append(encoded);
        continue;
      }
      if (c == content_) {
        held_.append(encoded);
        if (++held_count_ > stop_) {  // more than `stop` in a row: the first is kept
          size_t first = 0;
          NextCodePoint(held_, first);
          text.append(held_, 0, first);
          held_.erase(0, first);
          --held_count_;
        }
      } else {
        text.append(held_);
        held_.clear();
        held_count_ = 0;
        text.append(encoded);
      }
    }
    if (chunk.token_end) {
      held_.clear();  // trailing content characters (at most `stop`) are dropped
      held_count_ = 0;
      leading_ = 0;
    }
    if (!text.empty() || chunk.token_end) out.push_back({std::move(text), chunk.token_end});
    return absl::OkStatus();
  }
  absl::Status Finish(std::vector<Chunk>& out) override {
    held_.clear();
    held_count_ = 0;
    return absl::OkStatus();
  }

 private:
  char32_t content_;
  size_t start_, stop_;
  size_t leading_ = 0;
  std::string held_;
  size_t held_count_ = 0;
};

class StripDecoder : public Decoder {
 public:
  StripDecoder(char32_t content, size_t start, size_t stop)
      : content_(content), start_(start), stop_(stop) {}
  absl::Status DecodeChain(std::vector<std::string>& tokens) const override {
    for (std::string& token : tokens) {
      std::vector<std::pair<size_t, char32_t>> chars;  // (byte offset, code point)
      size_t pos = 0;
      while (pos < token.size()) {
        const size_t begin = pos;
        chars.push_back({begin, NextCodePoint(token, pos)});
      }
      size_t start_cut = 0;
      for (size_t i = 0; i < std::min(start_, chars.size()); ++i) {
        if (chars[i].second != content_) break;
        start_cut = i + 1;
      }
      size_t stop_cut = chars.size();
      for (size_t i = 0; i < std::min(stop_, chars.size()); ++i) {
        const size_t index = chars.size() - i - 1;
        if (chars[index].second != content_) break;
        stop_cut = index;
      }
      stop_cut = std::max(stop_cut, start_cut);
      const size_t begin = start_cut < chars.size() ? chars[start_cut].first : token.size();
      const size_t end = stop_cut < chars.size() ? chars[stop_cut].first : token.size();
      token = token.substr(begin, end - begin);
    }
    return absl::OkStatus();
  }
  std::unique_ptr<DecodeStage> MakeStage() const override {
    return std::make_unique<StripStage>(content_, start_, stop_);
  }

 private:
  char32_t content_;
  size_t start_, stop_;
};

// ---- Metaspace -----------------------------------------------------------------------------

// The replacement character becomes a space, except in the first token, where it is dropped
// (unless prepend_scheme is "never").
void MetaspaceDecode(std::string_view token, bool first, const std::string& replacement,
                     bool drop_in_first, std::string& out) {
  size_t pos = 0;
  while (true) {
    const size_t found = token.find(replacement, pos);
    if (found == std::string_view::npos) break;
    out.append(token.substr(pos, found - pos));
    if (!(first && drop_in_first)) out.push_back(' ');
    pos = found + replacement.size();
  }
  out.append(token.substr(pos));
}

class MetaspaceStage : public DecodeStage {
 public:
  MetaspaceStage(const std::string& replacement, bool drop_in_first)
      : replacement_(replacement), drop_in_first_(drop_in_first) {}
  absl::Status Push(Chunk chunk, std::vector<Chunk>& out) override {
    // The replacement is one character and chunks hold whole characters, so no match spans
    // two chunks.
    std::string text;
    MetaspaceDecode(chunk.text, first_, replacement_, drop_in_first_, text);
    if (chunk.token_end) first_ = false;
    out.push_back({std::move(text), chunk.token_end});
    return absl::OkStatus();
  }
  absl::Status Finish(std::vector<Chunk>& out) override { return absl::OkStatus(); }

 private:
  const std::string& replacement_;
  bool drop_in_first_;
  bool first_ = true;
};

class MetaspaceDecoder : public Decoder {
 public:
  MetaspaceDecoder(std::string replacement, bool drop_in_first)
      : replacement_(std::move(replacement)), drop_in_first_(drop_in_first) {}
  absl::Status DecodeChain(std::vector<std::string>& tokens) const override {
    for (size_t i = 0; i < tokens.size(); ++i) {
      std::string text;
      MetaspaceDecode(tokens[i], i == 0, replacement_, drop_in_first_, text);
      tokens[i] = std::move(text);
    }
    return absl::OkStatus();
  }
  std::unique_ptr<DecodeStage> MakeStage() const override {
    return std::make_unique<MetaspaceStage>(replacement_, drop_in_first_);
  }

 private:
  std::string replacement_;
  bool drop_in_first_;
};

// ---- No decoder ----------------------------------------------------------------------------

class JoinWithSpaceStage : public DecodeStage {
 public:
  absl::Status Push(Chunk chunk, std::vector<Chunk>& out) override {
    std::string text;
    if (at_token_start_ && !first_) text.push_back(' ');
    text.append(chunk.text);
    first_ = false;
    at_token_start_ = chunk.token_end;
    out.push_back({std::move(text), false});
    return absl::OkStatus();
  }
  absl::Status Finish(std::vector<Chunk>& out) override { return absl::OkStatus(); }

 private:
  bool first_ = true;
  bool at_token_start_ = true;
};

constexpr char kSupportedDecoders[] =
    "ByteLevel, Metaspace, Replace, ByteFallback, Fuse, Strip, Sequence";

absl::StatusOr<std::unique_ptr<Decoder>> MakeDecoderImpl(const json& config) {
  ASSIGN_OR_RETURN(const std::string type, GetType(config, "decoder"));
  const std::string where = absl::StrCat("decoder ", type);
  if (type == "Sequence") {
    const auto it = config.find("decoders");
    if (it == config.end() || !it->is_array()) {
      return JsonError(where, "'decoders' must be an array");
    }
    std::vector<std::unique_ptr<Decoder>> parts;
    for (const json& part : *it) {
      ASSIGN_OR_RETURN(auto decoder, MakeDecoderImpl(part));
      parts.push_back(std::move(decoder));
    }
    return std::make_unique<SequenceDecoder>(std::move(parts));
  }
  if (type == "ByteLevel") return std::make_unique<ByteLevelDecoder>();
  if (type == "ByteFallback") return std::make_unique<ByteFallbackDecoder>();
  if (type == "Fuse") return std::make_unique<FuseDecoder>();
  if (type == "Replace") {
    const auto it = config.find("pattern");
    if (it == config.end()) return JsonError(where, "'pattern' is missing");
    ASSIGN_OR_RETURN(Pattern pattern, Pattern::FromJson(*it, where));
    ASSIGN_OR_RETURN(std::string content, GetString(config, "content", where));
    return std::make_unique<ReplaceDecoder>(std::move(pattern), std::move(content));
  }
  if (type == "Strip") {
    ASSIGN_OR_RETURN(const std::string content, GetString(config, "content", where));
    size_t pos = 0;
    if (content.empty()) return JsonError(where, "'content' must be one character");
    const char32_t c = NextCodePoint(content, pos);
    if (pos != content.size()) return JsonError(where, "'content' must be one character");
    ASSIGN_OR_RETURN(const int64_t start, GetInt(config, "start", 0, where));
    ASSIGN_OR_RETURN(const int64_t stop, GetInt(config, "stop", 0, where));
    if (start < 0 || stop < 0) return JsonError(where, "'start' and 'stop' must be >= 0");
    return std::make_unique<StripDecoder>(c, static_cast<size_t>(start), static_cast<size_t>(stop));
  }
  if (type == "Metaspace") {
    ASSIGN_OR_RETURN(const std::string replacement, GetString(config, "replacement", where));
    size_t pos = 0;
    if (replacement.empty() || (NextCodePoint(replacement, pos), pos != replacement.size())) {
      return JsonError(where, "'replacement' must be exactly one character");
    }
    bool drop_in_first = true;
    const auto scheme = config.find("prepend_scheme");
    if (scheme != config.end() && !scheme->is_null()) {
      if (!scheme->is_string()) return JsonError(where, "'prepend_scheme' must be a string");
      const std::string name = scheme->get<std::string>();
      if (name != "always" && name != "first" && name != "never") {
        return JsonError(where, absl::StrCat("prepend_scheme '", name,
                                             "' is not supported; supported: always, first, "
                                             "never"));
      }
      drop_in_first = name != "never";
    } else {
      ASSIGN_OR_RETURN(drop_in_first, GetBool(config, "add_prefix_space", true, where));
    }
    return std::make_unique<MetaspaceDecoder>(replacement, drop_in_first);
  }
  return JsonError("decoder", absl::StrCat("type '", type,
                                           "' is not supported; supported: ", kSupportedDecoders));
}

}  // namespace

absl::StatusOr<std::unique_ptr<Decoder>> MakeDecoder(const json& config) {
  if (config.is_null()) return std::unique_ptr<Decoder>();
  return MakeDecoderImpl(config);
}

std::unique_ptr<DecodeStage> MakeJoinWithSpaceStage() {
  return std::make_unique<JoinWithSpaceStage>();
}

}  // namespace moe::tokenizer_internal
