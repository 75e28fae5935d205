#include "server/completion_text.h"

#include <string>
#include <utility>
#include <vector>

namespace moe::server {

CompletionText::CompletionText(bool separate_reasoning, bool opens_reasoning,
                               bool parse_tool_calls) {
  if (separate_reasoning) reasoning_.emplace(opens_reasoning);
  if (parse_tool_calls) tools_.emplace();
}

void CompletionText::Append(std::string_view text, bool finished,
                            serving::v1::GenerateResponse& pending) {
  std::string answer;
  std::string* answer_out = tools_.has_value() ? &answer : pending.mutable_text();
  if (reasoning_.has_value()) {
    reasoning_->Push(text, answer_out, pending.mutable_reasoning_text());
    if (finished) reasoning_->Flush(answer_out, pending.mutable_reasoning_text());
  } else {
    answer_out->append(text);
  }
  if (!tools_.has_value()) return;
  std::vector<ParsedToolCall> calls;
  tools_->Push(answer, pending.mutable_text(), &calls);
  if (finished) tools_->Flush(pending.mutable_text());
  for (ParsedToolCall& call : calls) {
    serving::v1::ToolCall* out = pending.add_tool_calls();
    out->set_index(tool_calls_++);
    out->set_name(std::move(call.name));
    out->set_arguments(std::move(call.arguments_json));
  }
}

}  // namespace moe::server
