// Bracket nesting of a JSON text, counted without parsing: checked before a client's or the
// model's JSON is parsed, so that no deeply nested value reaches recursive code (the chat
// template evaluator, nlohmann's serializer).
#pragma once

#include <algorithm>
#include <string_view>

namespace moe::server {

// The deepest nesting of [ and { outside strings.
inline int JsonNesting(std::string_view text) {
  int depth = 0, deepest = 0;
  bool in_string = false;
  for (size_t i = 0; i < text.size(); ++i) {
    const char c = text[i];
    if (in_string) {
      if (c == '\\') {
        ++i;
      } else if (c == '"') {
        in_string = false;
      }
    } else if (c == '"') {
      in_string = true;
    } else if (c == '[' || c == '{') {
      deepest = std::max(deepest, ++depth);
    } else if (c == ']' || c == '}') {
      --depth;
    }
  }
  return deepest;
}

}  // namespace moe::server
