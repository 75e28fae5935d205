#include "engine/tokenizer/utf8.h"

#include <utf8proc.h>

#include "absl/strings/str_format.h"

namespace moe::tokenizer_internal {

Utf8Step InspectUtf8(const uint8_t* bytes, size_t size) {
  const uint8_t lead = bytes[0];
  if (lead < 0x80) return {Utf8Step::kValid, 1};
  size_t need;
  uint8_t second_low = 0x80, second_high = 0xBF;
  if (lead >= 0xC2 && lead <= 0xDF) {
    need = 2;
  } else if (lead >= 0xE0 && lead <= 0xEF) {
    need = 3;
    if (lead == 0xE0) second_low = 0xA0;
    if (lead == 0xED) second_high = 0x9F;
  } else if (lead >= 0xF0 && lead <= 0xF4) {
    need = 4;
    if (lead == 0xF0) second_low = 0x90;
    if (lead == 0xF4) second_high = 0x8F;
  } else {
    return {Utf8Step::kInvalid, 1};
  }
  for (size_t i = 1; i < need; ++i) {
    if (i >= size) return {Utf8Step::kIncomplete, size};
    const uint8_t low = i == 1 ? second_low : 0x80;
    const uint8_t high = i == 1 ? second_high : 0xBF;
    if (bytes[i] < low || bytes[i] > high) return {Utf8Step::kInvalid, i};
  }
  return {Utf8Step::kValid, need};
}

absl::Status ValidateUtf8(std::string_view text, std::string_view what) {
  const auto* bytes = reinterpret_cast<const uint8_t*>(text.data());
  size_t pos = 0;
  while (pos < text.size()) {
    // ASCII fast path, 8 bytes at a time.
    while (pos + 8 <= text.size()) {
      uint64_t word;
      __builtin_memcpy(&word, bytes + pos, 8);
      if (word & 0x8080808080808080ULL) break;
      pos += 8;
    }
    if (pos >= text.size()) break;
    const Utf8Step step = InspectUtf8(bytes + pos, text.size() - pos);
    if (step.kind == Utf8Step::kValid) {
      pos += step.length;
      continue;
    }
    if (step.kind == Utf8Step::kIncomplete) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "%s is not valid UTF-8: truncated %d-byte sequence starting at byte offset %d (byte "
          "0x%02x)",
          Sv(what), Utf8SequenceLength(bytes[pos]), pos, bytes[pos]));
    }
    const size_t bad =
        pos + (step.length == 1 && (bytes[pos] < 0xC2 || bytes[pos] > 0xF4) ? 0 : step.length);
    return absl::InvalidArgumentError(absl::StrFormat(
        "%s is not valid UTF-8: invalid byte 0x%02x at byte offset %d", Sv(what), bytes[bad], bad));
  }
  return absl::OkStatus();
}

char32_t NextCodePoint(std::string_view text, size_t& pos) {
  const auto* p = reinterpret_cast<const uint8_t*>(text.data()) + pos;
  const uint8_t lead = p[0];
  if (lead < 0x80) {
    pos += 1;
    return lead;
  }
  if ((lead & 0xE0) == 0xC0) {
    pos += 2;
    return (char32_t(lead & 0x1F) << 6) | (p[1] & 0x3F);
  }
  if ((lead & 0xF0) == 0xE0) {
    pos += 3;
    return (char32_t(lead & 0x0F) << 12) | (char32_t(p[1] & 0x3F) << 6) | (p[2] & 0x3F);
  }
  pos += 4;
  return (char32_t(lead & 0x07) << 18) | (char32_t(p[1] & 0x3F) << 12) |
         (char32_t(p[2] & 0x3F) << 6) | (p[3] & 0x3F);
}

char32_t PrevCodePoint(std::string_view text, size_t end) {
  size_t start = end - 1;
  while (start > 0 && (static_cast<uint8_t>(text[start]) & 0xC0) == 0x80) --start;
  return NextCodePoint(text, start);
}

void AppendUtf8(char32_t c, std::string& out) {
  if (c < 0x80) {
    out.push_back(static_cast<char>(c));
  } else if (c < 0x800) {
    out.push_back(static_cast<char>(0xC0 | (c >> 6)));
    out.push_back(static_cast<char>(0x80 | (c & 0x3F)));
  } else if (c < 0x10000) {
    out.push_back(static_cast<char>(0xE0 | (c >> 12)));
    out.push_back(static_cast<char>(0x80 | ((c >> 6) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | (c & 0x3F)));
  } else {
    out.push_back(static_cast<char>(0xF0 | (c >> 18)));
    out.push_back(static_cast<char>(0x80 | ((c >> 12) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | ((c >> 6) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | (c & 0x3F)));
  }
}

bool IsWhitespace(char32_t c) {
  if (c <= 0x7F) return c == ' ' || (c >= 0x09 && c <= 0x0D);
  switch (c) {
    case 0x85:
    case 0xA0:
    case 0x1680:
    case 0x2028:
    case 0x2029:
    case 0x202F:
    case 0x205F:
    case 0x3000:
      return true;
    default:
      return c >= 0x2000 && c <= 0x200A;
  }
}

bool IsWordChar(char32_t c) {
  if (c < 0x80) {
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_';
  }
  if (c == 0x200C || c == 0x200D) return true;  // Join_Control
  switch (utf8proc_category(static_cast<utf8proc_int32_t>(c))) {
    case UTF8PROC_CATEGORY_LU:
    case UTF8PROC_CATEGORY_LL:
    case UTF8PROC_CATEGORY_LT:
    case UTF8PROC_CATEGORY_LM:
    case UTF8PROC_CATEGORY_LO:
    case UTF8PROC_CATEGORY_MN:
    case UTF8PROC_CATEGORY_MC:
    case UTF8PROC_CATEGORY_ME:
    case UTF8PROC_CATEGORY_ND:
    case UTF8PROC_CATEGORY_NL:
    case UTF8PROC_CATEGORY_PC:
      return true;
    default:
      return false;
  }
}

bool IsNumeric(char32_t c) {
  if (c < 0x80) return c >= '0' && c <= '9';
  switch (utf8proc_category(static_cast<utf8proc_int32_t>(c))) {
    case UTF8PROC_CATEGORY_ND:
    case UTF8PROC_CATEGORY_NL:
    case UTF8PROC_CATEGORY_NO:
      return true;
    default:
      return false;
  }
}

namespace {

// Converts from `bytes[pos]`; stops before a trailing unfinished sequence when `streaming`.
size_t LossyConvert(std::string_view bytes, bool streaming, std::string& out) {
  const auto* p = reinterpret_cast<const uint8_t*>(bytes.data());
  size_t pos = 0;
  size_t run_start = 0;  // start of the current run of valid bytes not yet copied
  while (pos < bytes.size()) {
    if (p[pos] < 0x80) {
      ++pos;
      continue;
    }
    const Utf8Step step = InspectUtf8(p + pos, bytes.size() - pos);
    if (step.kind == Utf8Step::kValid) {
      pos += step.length;
      continue;
    }
    out.append(bytes.data() + run_start, pos - run_start);
    if (step.kind == Utf8Step::kIncomplete) {
      if (streaming) return pos;
      out.append(kReplacementUtf8);
      return bytes.size();
    }
    out.append(kReplacementUtf8);
    pos += step.length;
    run_start = pos;
  }
  out.append(bytes.data() + run_start, pos - run_start);
  return pos;
}

}  // namespace

void AppendUtf8Lossy(std::string_view bytes, std::string& out) {
  LossyConvert(bytes, /*streaming=*/false, out);
}

void AppendUtf8LossyStreaming(std::string_view bytes, std::string& pending, std::string& out) {
  if (!pending.empty()) {
    pending.append(bytes);
    std::string joined = std::move(pending);
    pending.clear();
    const size_t used = LossyConvert(joined, /*streaming=*/true, out);
    pending.assign(joined, used, std::string::npos);
    return;
  }
  const size_t used = LossyConvert(bytes, /*streaming=*/true, out);
  pending.assign(bytes.substr(used));
}

void FinishUtf8Lossy(std::string& pending, std::string& out) {
  if (!pending.empty()) AppendUtf8Lossy(pending, out);
  pending.clear();
}

}  // namespace moe::tokenizer_internal
