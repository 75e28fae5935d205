#include "server/tool_call_parser.h"

#include <algorithm>
#include <optional>

#include "nlohmann/json.hpp"
#include "server/json_nesting.h"
#include "server/stream_markers.h"

namespace moe::server {
namespace {

constexpr std::string_view kStart = "<tool_call>";
constexpr std::string_view kEnd = "</tool_call>";

// Deeper JSON is not a tool call (and would recurse in the serializer).
constexpr int kMaxToolCallNesting = 64;

// {"name": string, "arguments": object (or a JSON text of one)} -> the call.
std::optional<ParsedToolCall> ParseBlock(std::string_view content) {
  if (JsonNesting(content) > kMaxToolCallNesting) return {};
  const nlohmann::json call = nlohmann::json::parse(content, nullptr, /*allow_exceptions=*/false);
  if (!call.is_object() || !call.contains("name") || !call["name"].is_string()) return {};
  nlohmann::json arguments =
      call.contains("arguments") ? call["arguments"] : nlohmann::json::object();
  if (arguments.is_string()) {
    const std::string text = arguments.get<std::string>();
    if (JsonNesting(text) > kMaxToolCallNesting) return {};
    arguments = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
  }
  if (!arguments.is_object()) return {};
  return ParsedToolCall{call["name"].get<std::string>(),
                        arguments.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace)};
}

}  // namespace

void ToolCallExtractor::Push(std::string_view piece, std::string* text,
                             std::vector<ParsedToolCall>* calls) {
  held_.append(piece);
  while (true) {
    if (!in_block_) {
      const size_t start = held_.find(kStart);
      if (start == std::string::npos) {
        const size_t partial = PartialMarkerSuffix(held_, kStart);
        text->append(held_, 0, held_.size() - partial);
        held_.erase(0, held_.size() - partial);
        return;
      }
      text->append(held_, 0, start);
      held_.erase(0, start);  // the block, marker included, until it closes
      in_block_ = true;
    }
    const size_t end = held_.find(kEnd, std::max(kStart.size(), searched_));
    if (end == std::string::npos) {
      // Next time, search only where a marker could end in newly appended text.
      searched_ = held_.size() >= kEnd.size() ? held_.size() - kEnd.size() + 1 : 0;
      return;
    }
    searched_ = 0;
    const std::string_view block = std::string_view(held_).substr(0, end + kEnd.size());
    const std::optional<ParsedToolCall> call =
        ParseBlock(block.substr(kStart.size(), end - kStart.size()));
    if (call.has_value()) {
      calls->push_back(*call);
    } else {
      text->append(block);
    }
    held_.erase(0, block.size());
    in_block_ = false;
  }
}

void ToolCallExtractor::Flush(std::string* text) {
  text->append(held_);
  held_.clear();
  in_block_ = false;
  searched_ = 0;
}

}  // namespace moe::server
