// Tool calls in a streamed completion, in the format Qwen2.5 / Qwen3 chat templates ask for
// (their system prompt: "return a json object with function name and arguments within
// <tool_call></tool_call> XML tags"):
//   <tool_call>
//   {"name": "get_weather", "arguments": {"city": "Paris"}}
//   </tool_call>
// GenerateRequest.parse_tool_calls: each complete block becomes a GenerateResponse.tool_calls
// entry as soon as its end marker arrives and is left out of the text; the text around the
// blocks streams as usual. A block whose content is not such an object stays in the text
// unchanged, markers included, and so does a block the output never closes.
#pragma once

#include <string>
#include <string_view>
#include <vector>

namespace moe::server {

struct ParsedToolCall {
  std::string name;
  std::string arguments_json;  // the arguments object as compact JSON
};

class ToolCallExtractor {
 public:
  // Appends the text `piece` adds outside tool-call blocks to *text and each block it
  // completes to *calls. Text that may begin a block marker is held back.
  void Push(std::string_view piece, std::string* text, std::vector<ParsedToolCall>* calls);
  // The output ended: held text and an unclosed block go to *text.
  void Flush(std::string* text);

 private:
  bool in_block_ = false;
  std::string held_;     // outside a block: a possible marker start; inside: the block so far
  size_t searched_ = 0;  // inside a block: held_ before this holds no end marker
};

}  // namespace moe::server
