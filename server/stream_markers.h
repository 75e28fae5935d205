// Finding markers ("<think>", "<tool_call>") in text that arrives in pieces.
#pragma once

#include <algorithm>
#include <string_view>

namespace moe::server {

// Length of the longest suffix of `text` that is a proper prefix of `marker`: what must be
// held back because the next piece may complete the marker.
inline size_t PartialMarkerSuffix(std::string_view text, std::string_view marker) {
  for (size_t n = std::min(text.size(), marker.size() - 1); n > 0; --n) {
    if (text.substr(text.size() - n) == marker.substr(0, n)) return n;
  }
  return 0;
}

}  // namespace moe::server
