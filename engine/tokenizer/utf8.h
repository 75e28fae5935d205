// UTF-8 helpers for the tokenizer: validation with positions, code point iteration, the
// character classes the Hugging Face `tokenizers` library uses (Rust's definitions), and
// lossy decoding identical to Rust's String::from_utf8_lossy.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"

namespace moe::tokenizer_internal {

// Debian's Abseil has its own string_view type: convert for StrCat and hash-map lookups.
inline absl::string_view Sv(std::string_view s) { return absl::string_view(s.data(), s.size()); }

inline constexpr char32_t kReplacementChar = 0xFFFD;
inline constexpr std::string_view kReplacementUtf8 = "\xEF\xBF\xBD";

// OK, or InvalidArgument naming the byte offset and the offending byte.
absl::Status ValidateUtf8(std::string_view text, std::string_view what = "text");

// Length of the (valid) UTF-8 sequence that starts with `lead`; 1 for invalid lead bytes.
inline size_t Utf8SequenceLength(uint8_t lead) {
  if (lead < 0x80) return 1;
  if ((lead & 0xE0) == 0xC0) return 2;
  if ((lead & 0xF0) == 0xE0) return 3;
  if ((lead & 0xF8) == 0xF0) return 4;
  return 1;
}

// Decodes the code point at `text[pos]` of a valid UTF-8 string and advances `pos`.
char32_t NextCodePoint(std::string_view text, size_t& pos);

// Decodes the code point that ends right before `end` in a valid UTF-8 string.
char32_t PrevCodePoint(std::string_view text, size_t end);

void AppendUtf8(char32_t code_point, std::string& out);

// Rust's char::is_whitespace (Unicode White_Space); also regex `\s`.
bool IsWhitespace(char32_t c);
// Rust regex `\w` (Unicode): letters, marks, decimal digits, connector punctuation, joiners.
bool IsWordChar(char32_t c);
// Rust's char::is_numeric: general categories Nd, Nl, No.
bool IsNumeric(char32_t c);

// Outcome of looking at one UTF-8 sequence at the start of `bytes`.
struct Utf8Step {
  enum Kind { kValid, kInvalid, kIncomplete } kind;
  // kValid: sequence length; kInvalid: length of the maximal invalid subpart (>= 1) to
  // replace by one U+FFFD; kIncomplete: all remaining bytes are a valid but unfinished prefix.
  size_t length;
};
Utf8Step InspectUtf8(const uint8_t* bytes, size_t size);

// Rust's String::from_utf8_lossy: each maximal invalid subpart becomes one U+FFFD.
void AppendUtf8Lossy(std::string_view bytes, std::string& out);

// Streaming form of AppendUtf8Lossy: converts what is decidable and leaves in `pending` the
// trailing bytes of an unfinished sequence (at most 3). Feeding all bytes in pieces and then
// calling FinishUtf8Lossy gives exactly AppendUtf8Lossy of the whole.
void AppendUtf8LossyStreaming(std::string_view bytes, std::string& pending, std::string& out);
void FinishUtf8Lossy(std::string& pending, std::string& out);

}  // namespace moe::tokenizer_internal
