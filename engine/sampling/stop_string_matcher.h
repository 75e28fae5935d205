// StopStringMatcher: finds stop strings in a stream of decoded text pieces, across piece
// (token) boundaries, and says which text is safe to emit. Pure string logic: the caller
// decodes tokens (UTF-8 safe) and pushes the pieces in order.
//
// Text that could still be the beginning of a stop string is held back until the next piece
// decides it. When a stop string matches, the text before it is emitted and the match and
// everything after it are dropped. Of several matches the earliest start wins (then the longest).
#pragma once

#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace moe {

class StopStringMatcher {
 public:
  struct Result {
    std::string text;  // safe to emit now (possibly empty)
    // Index into the stop strings of the one that matched; the stream is over after this.
    std::optional<int> matched_stop;
  };

  explicit StopStringMatcher(std::vector<std::string> stop_strings);

  // Appends `piece` to the stream. After a match, further pushes return nothing.
  Result Push(std::string_view piece);
  // Ends the stream for another reason: returns the held-back text.
  std::string Flush();

  bool stopped() const { return stopped_; }
  const std::vector<std::string>& stop_strings() const { return stop_strings_; }
  // Bytes held back now (a prefix of some stop string).
  size_t held_bytes() const { return pending_.size(); }

 private:
  std::vector<std::string> stop_strings_;
  std::string pending_;  // text received but not yet emitted
  bool stopped_ = false;
};

}  // namespace moe
