#include "server/reasoning_splitter.h"

#include <algorithm>

#include "server/stream_markers.h"

namespace moe::server {
namespace {

constexpr std::string_view kWhitespace = " \t\n\r";

}  // namespace

bool PromptOpensReasoning(std::string_view prompt_tail) {
  const size_t end = prompt_tail.find_last_not_of(kWhitespace);
  if (end == std::string_view::npos) return false;
  return prompt_tail.substr(0, end + 1).ends_with(kThinkStart);
}

void ReasoningSplitter::Push(std::string_view text, std::string* answer, std::string* reasoning) {
  held_.append(text);
  std::string_view rest(held_);
  std::string kept;
  while (!rest.empty()) {
    if (state_ == State::kAnswer) {
      answer->append(rest);
      rest = {};
      break;
    }
    if (state_ == State::kBeforeAnswer) {
      const size_t start = rest.find_first_not_of(kWhitespace);
      if (start == std::string_view::npos) {
        kept = std::string(rest);  // only whitespace so far: the block may still come
        break;
      }
      const std::string_view after_space = rest.substr(start);
      if (after_space.starts_with(kThinkStart)) {
        state_ = State::kReasoning;
        rest = after_space.substr(kThinkStart.size());
      } else if (kThinkStart.starts_with(after_space)) {
        kept = std::string(rest);  // "  <thi": wait for the rest
        break;
      } else {
        state_ = State::kAnswer;
      }
      continue;
    }
    // kReasoning
    const size_t end = rest.find(kThinkEnd);
    if (end != std::string_view::npos) {
      reasoning->append(rest.substr(0, end));
      rest = rest.substr(end + kThinkEnd.size());
      state_ = State::kAnswer;
      continue;
    }
    const size_t partial = PartialMarkerSuffix(rest, kThinkEnd);
    reasoning->append(rest.substr(0, rest.size() - partial));
    kept = std::string(rest.substr(rest.size() - partial));
    break;
  }
  held_ = std::move(kept);
}

void ReasoningSplitter::Flush(std::string* answer, std::string* reasoning) {
  (state_ == State::kReasoning ? reasoning : answer)->append(held_);
  held_.clear();
}

}  // namespace moe::server
