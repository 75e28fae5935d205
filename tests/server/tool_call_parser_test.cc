// ToolCallExtractor: the same text and calls whatever the chunking of the output; what counts
// as a tool call and what stays text.
#include "server/tool_call_parser.h"

#include <string>
#include <vector>

#include "gtest/gtest.h"

namespace moe::server {
namespace {

struct Extracted {
  std::string text;
  std::vector<std::string> calls;  // "name arguments"
  bool operator==(const Extracted&) const = default;
};

Extracted ExtractInChunks(const std::vector<std::string>& chunks) {
  ToolCallExtractor extractor;
  Extracted out;
  std::vector<ParsedToolCall> calls;
  for (const std::string& chunk : chunks) extractor.Push(chunk, &out.text, &calls);
  extractor.Flush(&out.text);
  for (const ParsedToolCall& call : calls)
    out.calls.push_back(call.name + " " + call.arguments_json);
  return out;
}

void ExpectEveryChunkingGives(const std::string& output, const Extracted& expected) {
  SCOPED_TRACE(output);
  EXPECT_EQ(ExtractInChunks({output}), expected);
  for (size_t cut = 0; cut <= output.size(); ++cut) {
    EXPECT_EQ(ExtractInChunks({output.substr(0, cut), output.substr(cut)}), expected)
        << "cut at " << cut;
  }
  std::vector<std::string> bytes;
  for (char c : output) bytes.emplace_back(1, c);
  EXPECT_EQ(ExtractInChunks(bytes), expected);
}

TEST(ToolCallExtractorTest, BlocksBecomeCallsAndTheTextAroundThemStays) {
  ExpectEveryChunkingGives(
      "Checking.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": "
      "\"Paris\", \"days\": [1, 2]}}\n</tool_call>\n<tool_call>\n{\"name\": \"now\", "
      "\"arguments\": \"{\\\"tz\\\": \\\"UTC\\\"}\"}\n</tool_call>",
      {"Checking.\n\n",
       {"get_weather {\"city\":\"Paris\",\"days\":[1,2]}", "now {\"tz\":\"UTC\"}"}});
  // Without arguments: an empty object.
  ExpectEveryChunkingGives("<tool_call>{\"name\": \"ping\"}</tool_call>", {"", {"ping {}"}});
}

TEST(ToolCallExtractorTest, WhatIsNotACallStaysText) {
  ExpectEveryChunkingGives("No tools here. <tool", {"No tools here. <tool", {}});
  // Not JSON, no name, arguments not an object: the block stays as it was.
  for (const std::string& block : std::vector<std::string>{
           "<tool_call>get_weather(Paris)</tool_call>",
           "<tool_call>{\"arguments\": {}}</tool_call>",
           "<tool_call>{\"name\": \"f\", \"arguments\": [1]}</tool_call>",
           "<tool_call>" + std::string(100, '[') + std::string(100, ']') + "</tool_call>"}) {
    ExpectEveryChunkingGives("a" + block + "b", {"a" + block + "b", {}});
  }
  // A block the output never closes (max_tokens reached inside it).
  ExpectEveryChunkingGives("x<tool_call>{\"name\": \"f\", \"argu",
                           {"x<tool_call>{\"name\": \"f\", \"argu", {}});
}

}  // namespace
}  // namespace moe::server
