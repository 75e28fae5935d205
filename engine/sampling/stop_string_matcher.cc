#include "engine/sampling/stop_string_matcher.h"

#include <algorithm>
#include <utility>

namespace moe {

StopStringMatcher::StopStringMatcher(std::vector<std::string> stop_strings)
    : stop_strings_(std::move(stop_strings)) {
  // Empty stop strings would match everywhere; SamplingParams::Validate refuses them too.
  std::erase_if(stop_strings_, [](const std::string& s) { return s.empty(); });
}

StopStringMatcher::Result StopStringMatcher::Push(std::string_view piece) {
  Result result;
  if (stopped_) return result;
  if (stop_strings_.empty()) {
    result.text.assign(piece);
    return result;
  }
  pending_.append(piece);

  // The earliest (then longest) match anywhere in the pending text. Earlier text was emitted
  // only once no stop string could start in it, so no match can begin before pending_.
  size_t best_pos = std::string::npos;
  int best_index = -1;
  for (int i = 0; i < static_cast<int>(stop_strings_.size()); ++i) {
    const size_t pos = pending_.find(stop_strings_[i]);
    if (pos == std::string::npos) continue;
    if (pos < best_pos ||
        (pos == best_pos && stop_strings_[i].size() > stop_strings_[best_index].size())) {
      best_pos = pos;
      best_index = i;
    }
  }
  if (best_index >= 0) {
    result.text = pending_.substr(0, best_pos);
    result.matched_stop = best_index;
    pending_.clear();
    stopped_ = true;
    return result;
  }

  // Hold back the longest suffix of pending_ that is a proper prefix of some stop string.
  size_t hold = 0;
  for (const std::string& stop : stop_strings_) {
    const size_t longest = std::min(pending_.size(), stop.size() - 1);
    for (size_t len = longest; len > hold; --len) {
      if (pending_.compare(pending_.size() - len, len, stop, 0, len) == 0) {
        hold = len;
        break;
      }
    }
  }
  result.text = pending_.substr(0, pending_.size() - hold);
  pending_.erase(0, pending_.size() - hold);
  return result;
}

std::string StopStringMatcher::Flush() {
  std::string text = std::move(pending_);
  pending_.clear();
  return text;
}

}  // namespace moe
