// libFuzzer target: model output through CompletionText (separate_reasoning and
// parse_tool_calls), the server's reading of generated text. The first byte picks the options
// and a chunk size; the rest is the output.
// Checks: no crash; the output streamed in chunks gives exactly what it gives in one piece
// (text, reasoning_text and tool calls), so no split point changes what a client receives;
// every tool call's arguments are a JSON object.
#include <cstddef>
#include <cstdint>
#include <string_view>

#include "fuzz/fuzz_util.h"
#include "nlohmann/json.hpp"
#include "server/completion_text.h"

namespace {

namespace v1 = ::moe::serving::v1;

v1::GenerateResponse Run(uint8_t options, std::string_view output, size_t chunk) {
  moe::server::CompletionText text(options & 1, options & 2, options & 4);
  v1::GenerateResponse all;
  if (chunk == 0) {
    text.Append(output, true, all);
    return all;
  }
  for (size_t at = 0; at < output.size(); at += chunk) {
    v1::GenerateResponse piece;
    text.Append(output.substr(at, chunk), at + chunk >= output.size(), piece);
    all.mutable_text()->append(piece.text());
    all.mutable_reasoning_text()->append(piece.reasoning_text());
    for (const v1::ToolCall& call : piece.tool_calls()) *all.add_tool_calls() = call;
  }
  if (output.empty()) text.Append("", true, all);
  return all;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using moe::fuzz::Check;
  if (size == 0) return 0;
  const uint8_t options = data[0];
  const size_t chunk = 1 + (options >> 3);  // 1..32 bytes
  const std::string_view output(reinterpret_cast<const char*>(data + 1), size - 1);
  const v1::GenerateResponse whole = Run(options, output, 0);
  const v1::GenerateResponse chunked = Run(options, output, chunk);
  Check(whole.text() == chunked.text(), "chunking does not change the text");
  Check(whole.reasoning_text() == chunked.reasoning_text(),
        "chunking does not change the reasoning");
  Check(whole.tool_calls_size() == chunked.tool_calls_size(),
        "chunking does not change the tool calls");
  for (int i = 0; i < whole.tool_calls_size(); ++i) {
    Check(whole.tool_calls(i).SerializeAsString() == chunked.tool_calls(i).SerializeAsString(),
          "the same tool calls");
    Check(whole.tool_calls(i).index() == i, "tool calls are numbered from 0");
    Check(nlohmann::json::parse(whole.tool_calls(i).arguments(), nullptr, false).is_object(),
          "arguments are a JSON object");
  }
  return 0;
}
