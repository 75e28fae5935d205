// ReasoningSplitter: the same answer and reasoning whatever the chunking of the output, and
// the edge cases of where a <think> block counts.
#include "server/reasoning_splitter.h"

#include <string>
#include <utility>
#include <vector>

#include "gtest/gtest.h"

namespace moe::server {
namespace {

struct Split {
  std::string answer;
  std::string reasoning;
  bool operator==(const Split&) const = default;
};

Split SplitInChunks(const std::vector<std::string>& chunks, bool starts_in_reasoning) {
  ReasoningSplitter splitter(starts_in_reasoning);
  Split out;
  for (const std::string& chunk : chunks) splitter.Push(chunk, &out.answer, &out.reasoning);
  splitter.Flush(&out.answer, &out.reasoning);
  return out;
}

// Every way of cutting `text` in two and in single bytes gives `expected`.
void ExpectEveryChunkingGives(const std::string& text, bool starts_in_reasoning,
                              const Split& expected) {
  SCOPED_TRACE(text);
  EXPECT_EQ(SplitInChunks({text}, starts_in_reasoning), expected);
  for (size_t cut = 0; cut <= text.size(); ++cut) {
    EXPECT_EQ(SplitInChunks({text.substr(0, cut), text.substr(cut)}, starts_in_reasoning), expected)
        << "cut at " << cut;
  }
  std::vector<std::string> bytes;
  for (char c : text) bytes.emplace_back(1, c);
  EXPECT_EQ(SplitInChunks(bytes, starts_in_reasoning), expected);
}

TEST(ReasoningSplitterTest, ABlockAtTheStartIsReasoning) {
  ExpectEveryChunkingGives("<think>\nThe router picks two.\n</think>\n\nTwo experts.", false,
                           {"\n\nTwo experts.", "\nThe router picks two.\n"});
  ExpectEveryChunkingGives("\n <think>a</think>b", false, {"b", "a"});
}

TEST(ReasoningSplitterTest, WithoutABlockEverythingIsAnswer) {
  ExpectEveryChunkingGives("Two experts.", false, {"Two experts.", ""});
  ExpectEveryChunkingGives("<thin", false, {"<thin", ""});
  ExpectEveryChunkingGives("  \n", false, {"  \n", ""});
  // Later blocks, and an end marker outside a block, are answer text.
  ExpectEveryChunkingGives("A <think>x</think> B", false, {"A <think>x</think> B", ""});
  ExpectEveryChunkingGives("</think>x", false, {"</think>x", ""});
}

TEST(ReasoningSplitterTest, APromptThatOpenedTheBlockStartsInReasoning) {
  ExpectEveryChunkingGives("plan</think>answer <think>not again</think>", true,
                           {"answer <think>not again</think>", "plan"});
  // Unfinished reasoning (max_tokens reached inside the block), a partial end marker included.
  ExpectEveryChunkingGives("still thinking </thi", true, {"", "still thinking </thi"});
}

TEST(ReasoningSplitterTest, PromptOpensReasoningLooksAtTheEndOfThePrompt) {
  EXPECT_TRUE(PromptOpensReasoning("<|im_start|>assistant\n<think>\n"));
  EXPECT_TRUE(PromptOpensReasoning("<think>"));
  EXPECT_FALSE(PromptOpensReasoning("<|im_start|>assistant\n<think>\n\n</think>\n\n"));
  EXPECT_FALSE(PromptOpensReasoning("<|im_start|>assistant\n"));
  EXPECT_FALSE(PromptOpensReasoning(""));
}

}  // namespace
}  // namespace moe::server
