// A completion's output text as its request asked for it: the reasoning apart
// (separate_reasoning, reasoning_splitter.h), then tool calls taken out of the answer
// (parse_tool_calls, tool_call_parser.h), into the GenerateResponse being assembled.
#pragma once

#include <cstdint>
#include <optional>
#include <string_view>

#include "moe/serving/v1/inference.pb.h"
#include "server/reasoning_splitter.h"
#include "server/tool_call_parser.h"

namespace moe::server {

class CompletionText {
 public:
  // `opens_reasoning`: the prompt ended inside a <think> block (PromptOpensReasoning).
  CompletionText(bool separate_reasoning, bool opens_reasoning, bool parse_tool_calls);

  // Adds the next piece of output to `pending`'s text, reasoning_text and tool_calls; with
  // `finished`, also what was held back.
  void Append(std::string_view text, bool finished, serving::v1::GenerateResponse& pending);

 private:
  std::optional<ReasoningSplitter> reasoning_;
  std::optional<ToolCallExtractor> tools_;
  int32_t tool_calls_ = 0;  // returned so far
};

}  // namespace moe::server
