// CompletionText: how a request's output options fill a GenerateResponse - the reasoning in
// reasoning_text, tool calls numbered across responses, what is held back across pieces.
#include "server/completion_text.h"

#include <string>

#include "gtest/gtest.h"

namespace moe::server {
namespace {

namespace v1 = ::moe::serving::v1;

TEST(CompletionTextTest, PlainOutputIsTextAsItComes) {
  CompletionText text(false, false, false);
  v1::GenerateResponse pending;
  text.Append("<think>a</think> <tool_call>{\"name\": \"f\"}</tool_call>", false, pending);
  EXPECT_EQ(pending.text(), "<think>a</think> <tool_call>{\"name\": \"f\"}</tool_call>");
  EXPECT_EQ(pending.reasoning_text(), "");
  EXPECT_EQ(pending.tool_calls_size(), 0);
}

TEST(CompletionTextTest, ReasoningThenToolCallsNumberedAcrossResponses) {
  CompletionText text(true, /*opens_reasoning=*/true, true);
  v1::GenerateResponse first;
  // A tool call written while reasoning is reasoning, not a call.
  text.Append("maybe <tool_call>{\"name\": \"x\"}</tool_call></think>\nCalling.<tool_c", false,
              first);
  EXPECT_EQ(first.reasoning_text(), "maybe <tool_call>{\"name\": \"x\"}</tool_call>");
  EXPECT_EQ(first.text(), "\nCalling.");
  EXPECT_EQ(first.tool_calls_size(), 0);
  v1::GenerateResponse second;
  text.Append("all>{\"name\": \"a\", \"arguments\": {\"k\": 1}}</tool_call><tool_call>", false,
              second);
  ASSERT_EQ(second.tool_calls_size(), 1);
  EXPECT_EQ(second.tool_calls(0).index(), 0);
  EXPECT_EQ(second.tool_calls(0).name(), "a");
  EXPECT_EQ(second.tool_calls(0).arguments(), "{\"k\":1}");
  EXPECT_EQ(second.text(), "");
  v1::GenerateResponse last;
  text.Append("{\"name\": \"b\"}</tool_call> Done. <tool", true, last);
  ASSERT_EQ(last.tool_calls_size(), 1);
  EXPECT_EQ(last.tool_calls(0).index(), 1);
  EXPECT_EQ(last.tool_calls(0).name(), "b");
  EXPECT_EQ(last.tool_calls(0).arguments(), "{}");
  EXPECT_EQ(last.text(), " Done. <tool");  // held back, then flushed at the end
}

}  // namespace
}  // namespace moe::server
