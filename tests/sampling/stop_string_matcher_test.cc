#include "engine/sampling/stop_string_matcher.h"

#include <string>
#include <vector>

#include "gtest/gtest.h"

namespace moe {
namespace {

// Pushes the pieces; returns everything emitted (including the final flush when no stop hit).
std::string PushAll(StopStringMatcher& matcher, const std::vector<std::string>& pieces) {
  std::string out;
  for (const std::string& piece : pieces) {
    StopStringMatcher::Result r = matcher.Push(piece);
    out += r.text;
    if (r.matched_stop) return out;
  }
  return out + matcher.Flush();
}

TEST(StopStringMatcherTest, NoStopStringsPassesTextThrough) {
  StopStringMatcher matcher({});
  StopStringMatcher::Result r = matcher.Push("hello");
  EXPECT_EQ(r.text, "hello");
  EXPECT_FALSE(r.matched_stop);
  EXPECT_EQ(matcher.Flush(), "");
}

TEST(StopStringMatcherTest, MatchSpanningSeveralPiecesIsExcluded) {
  StopStringMatcher matcher({"###"});
  std::string out;
  auto r = matcher.Push("answer #");
  EXPECT_EQ(r.text, "answer ");  // "#" held back: could start the stop string
  EXPECT_EQ(matcher.held_bytes(), 1u);
  out += r.text;
  r = matcher.Push("#");
  EXPECT_EQ(r.text, "");
  out += r.text;
  r = matcher.Push("# trailing");
  out += r.text;
  ASSERT_TRUE(r.matched_stop);
  EXPECT_EQ(*r.matched_stop, 0);
  EXPECT_EQ(out, "answer ");
  EXPECT_TRUE(matcher.stopped());
  EXPECT_EQ(matcher.Push("more").text, "");
}

TEST(StopStringMatcherTest, HeldTextIsReleasedWhenItStopsLookingLikeAStop) {
  StopStringMatcher matcher({"<end>"});
  auto r = matcher.Push("a <e");
  EXPECT_EQ(r.text, "a ");
  r = matcher.Push("nx");
  EXPECT_EQ(r.text, "<enx");
  EXPECT_FALSE(r.matched_stop);
}

TEST(StopStringMatcherTest, FlushReturnsHeldTextWhenGenerationEndsOtherwise) {
  StopStringMatcher matcher({"STOP"});
  EXPECT_EQ(matcher.Push("go ST").text, "go ");
  EXPECT_EQ(matcher.Flush(), "ST");
}

TEST(StopStringMatcherTest, EarliestMatchWinsThenLongest) {
  StopStringMatcher earliest({"world", "lo w"});
  EXPECT_EQ(PushAll(earliest, {"hello world"}), "hel");
  StopStringMatcher longest({"ab", "abc"});
  auto r = longest.Push("xabc");
  ASSERT_TRUE(r.matched_stop);
  EXPECT_EQ(*r.matched_stop, 1);
  EXPECT_EQ(r.text, "x");
}

TEST(StopStringMatcherTest, OverlappingPrefixesAreNotMissed) {
  // "aab" inside "aaab": a naive matcher that drops held text on mismatch would miss it.
  StopStringMatcher matcher({"aab"});
  EXPECT_EQ(PushAll(matcher, {"a", "a", "a", "b", "c"}), "a");
}

TEST(StopStringMatcherTest, StopAtTheVeryStartEmitsNothing) {
  StopStringMatcher matcher({"\n\n"});
  EXPECT_EQ(PushAll(matcher, {"\n", "\nrest"}), "");
}

TEST(StopStringMatcherTest, MultiByteUtf8StopString) {
  StopStringMatcher matcher({"終わり"});
  // Pieces are whole characters (the detokenizer guarantees it).
  EXPECT_EQ(PushAll(matcher, {"これで", "終", "わ", "り", "です"}), "これで");
}

TEST(StopStringMatcherTest, EveryWayOfSplittingGivesTheSameOutput) {
  const std::string text = "The answer is 42.\nUser: next";
  const std::vector<std::string> stops = {"\nUser:", "Assistant:"};
  const std::string expected = "The answer is 42.";
  // All splits of the text into two or three pieces.
  for (size_t i = 0; i <= text.size(); ++i) {
    for (size_t j = i; j <= text.size(); ++j) {
      StopStringMatcher matcher(stops);
      EXPECT_EQ(PushAll(matcher, {text.substr(0, i), text.substr(i, j - i), text.substr(j)}),
                expected)
          << i << "," << j;
    }
  }
  // One byte at a time.
  StopStringMatcher matcher(stops);
  std::vector<std::string> bytes;
  for (char c : text) bytes.push_back(std::string(1, c));
  EXPECT_EQ(PushAll(matcher, bytes), expected);
}

}  // namespace
}  // namespace moe
