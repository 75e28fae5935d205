// Tokenizer behaviour that needs no reference: invalid input, refused components, the config
// file, streaming details, thread safety.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <string>
#include <thread>
#include <vector>

#include "engine/tokenizer/tokenizer.h"
#include "tests/tokenizer/tokenizer_test_util.h"

namespace moe {
namespace {

using ::testing::HasSubstr;
using tokenizer_test::ReadFileOrDie;
using tokenizer_test::TokenizerDir;

std::unique_ptr<Tokenizer> Load(const std::string& name) {
  auto tokenizer = Tokenizer::FromModelDir(TokenizerDir(name));
  EXPECT_TRUE(tokenizer.ok()) << tokenizer.status();
  return tokenizer.ok() ? std::move(tokenizer).value() : nullptr;
}

// A tokenizer.json with a tiny BPE and the given extra top-level fields.
std::string TinyTokenizerJson(const std::string& extra_fields) {
  return R"({"version": "1.0", "added_tokens": [], )" + extra_fields +
         R"("model": {"type": "BPE", "vocab": {"a": 0, "b": 1, "ab": 2, " ": 3},
                      "merges": ["a b"]}})";
}

TEST(TokenizerInvalidInputTest, InvalidUtf8IsAnErrorNamingTheOffset) {
  auto tokenizer = Load("gpt2_bytelevel");
  ASSERT_NE(tokenizer, nullptr);
  struct Case {
    std::string text;
    std::string message;
  };
  const Case cases[] = {
      {std::string("ok \xff rest"), "invalid byte 0xff at byte offset 3"},
      {std::string("abc\xc3"), "truncated 2-byte sequence starting at byte offset 3"},
      {std::string("x\xe2\x82"), "truncated 3-byte sequence starting at byte offset 1"},
      {std::string("\xc0\xaf"), "invalid byte 0xc0 at byte offset 0"},          // overlong
      {std::string("ab\xed\xa0\x80"), "invalid byte 0xa0 at byte offset 3"},    // surrogate
      {std::string("\xf4\x90\x80\x80"), "invalid byte 0x90 at byte offset 1"},  // > U+10FFFF
      {std::string("\xe4\xb8\xad\x80"), "invalid byte 0x80 at byte offset 3"},  // stray cont.
  };
  for (const Case& c : cases) {
    auto ids = tokenizer->Encode(c.text);
    ASSERT_FALSE(ids.ok()) << c.message;
    EXPECT_EQ(ids.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(ids.status().message(), HasSubstr(c.message));
  }
}

TEST(TokenizerInvalidInputTest, UnknownIdsAreSkippedInDecode) {
  auto tokenizer = Load("qwen2_split");
  ASSERT_NE(tokenizer, nullptr);
  const auto hello = tokenizer->Encode("hello", {.add_special_tokens = false});
  ASSERT_TRUE(hello.ok());
  std::vector<int32_t> ids = *hello;
  ids.insert(ids.begin(), -5);
  ids.push_back(1 << 30);
  EXPECT_EQ(*tokenizer->Decode(ids), "hello");
}

TEST(TokenizerLoadTest, RefusesUnsupportedComponentsByName) {
  struct Case {
    std::string fields;
    std::string message;
  };
  const Case cases[] = {
      {R"("pre_tokenizer": {"type": "Whitespace"},)",
       "pre_tokenizer: type 'Whitespace' is not supported; supported: ByteLevel, Metaspace, "
       "Split, Digits, Sequence"},
      {R"("normalizer": {"type": "Lowercase"},)",
       "normalizer: type 'Lowercase' is not supported; supported: NFC"},
      {R"("decoder": {"type": "WordPiece", "prefix": "##"},)",
       "decoder: type 'WordPiece' is not supported"},
      {R"("post_processor": {"type": "Unknown"},)", "post_processor: type 'Unknown'"},
      {R"("pre_tokenizer": {"type": "Split", "pattern": {"Regex": "(unclosed"},
          "behavior": "Isolated", "invert": false},)",
       "does not compile"},
      {R"("pre_tokenizer": {"type": "Split", "pattern": {"String": "x"},
          "behavior": "Sideways", "invert": false},)",
       "behavior 'Sideways' is not supported"},
  };
  for (const Case& c : cases) {
    auto tokenizer = Tokenizer::FromJson(TinyTokenizerJson(c.fields));
    ASSERT_FALSE(tokenizer.ok()) << c.message;
    EXPECT_THAT(tokenizer.status().message(), HasSubstr(c.message));
  }
  auto unigram = Tokenizer::FromJson(R"({"model": {"type": "Unigram", "vocab": []}})");
  ASSERT_FALSE(unigram.ok());
  EXPECT_THAT(unigram.status().message(), HasSubstr("supported: BPE"));
  auto bad_merge =
      Tokenizer::FromJson(R"({"model": {"type": "BPE", "vocab": {"a": 0}, "merges": ["a zz"]}})");
  ASSERT_FALSE(bad_merge.ok());
  EXPECT_THAT(bad_merge.status().message(), HasSubstr("'zz' that is not in the vocab"));
  EXPECT_FALSE(Tokenizer::FromJson("{not json").ok());
  EXPECT_EQ(Tokenizer::FromModelDir("/nonexistent/dir").status().code(),
            absl::StatusCode::kNotFound);
}

// Found by the tokenizer_json fuzzer: a post-processor's ids were taken as given, so Encode
// with special tokens returned ids the model has no embedding row for.
TEST(TokenizerLoadTest, PostProcessorIdsOutsideTheVocabAreRefused) {
  const std::string cases[] = {
      R"("post_processor": {"type": "TemplateProcessing", "single": [{"SpecialToken": {"id":
          "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}], "special_tokens":
          {"<s>": {"id": "<s>", "ids": [7], "tokens": ["<s>"]}}},)",
      R"("post_processor": {"type": "TemplateProcessing", "single": [{"Sequence": {"id": "A",
          "type_id": 0}}, {"SpecialToken": {"id": "</s>", "type_id": 0}}], "special_tokens":
          {"</s>": {"id": "</s>", "ids": [4294967297], "tokens": ["</s>"]}}},)",
      R"("post_processor": {"type": "BertProcessing", "cls": ["a", -1], "sep": ["b", 1]},)",
      R"("post_processor": {"type": "Sequence", "processors": [{"type": "ByteLevel"},
          {"type": "RobertaProcessing", "cls": ["a", 0], "sep": ["b", 4]}]},)",
  };
  for (const std::string& fields : cases) {
    auto tokenizer = Tokenizer::FromJson(TinyTokenizerJson(fields));
    ASSERT_FALSE(tokenizer.ok()) << fields;
    EXPECT_EQ(tokenizer.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(tokenizer.status().message(), HasSubstr("outside the vocabulary (ids 0 to 3)"));
  }
  auto inside = Tokenizer::FromJson(TinyTokenizerJson(
      R"("post_processor": {"type": "BertProcessing", "cls": ["ab", 2], "sep": [" ", 3]},)"));
  ASSERT_TRUE(inside.ok()) << inside.status();
  EXPECT_EQ(*(*inside)->Encode("a"), (std::vector<int32_t>{2, 0, 3}));
}

TEST(TokenizerLoadTest, TinyBpeMergesAndJoinsWithoutDecoder) {
  auto tokenizer = Tokenizer::FromJson(TinyTokenizerJson(""));
  ASSERT_TRUE(tokenizer.ok()) << tokenizer.status();
  auto ids = (*tokenizer)->Encode("abab a");
  ASSERT_TRUE(ids.ok());
  // No pre-tokenizer: the whole text is one word; "a b" merges wherever it can.
  EXPECT_EQ(*ids, (std::vector<int32_t>{2, 2, 3, 0}));
  // Without a decoder, tokens are joined with spaces: "ab" "ab" " " "a".
  EXPECT_EQ(*(*tokenizer)->Decode(*ids), "ab ab   a");
  StreamingDecoder stream(**tokenizer);
  std::string streamed;
  for (int32_t id : *ids) streamed += stream.Push(id);
  streamed += stream.Flush();
  EXPECT_EQ(streamed, "ab ab   a");
}

TEST(TokenizerConfigTest, BosAndEosFromConfig) {
  auto mixtral = Load("mixtral_legacy");
  ASSERT_NE(mixtral, nullptr);
  EXPECT_EQ(mixtral->bos_id(), 1);
  EXPECT_EQ(mixtral->eos_ids(), std::vector<int32_t>{2});
  EXPECT_EQ(mixtral->TokenToId("<s>"), 1);
  EXPECT_EQ(mixtral->IdToToken(2), "</s>");
  EXPECT_TRUE(mixtral->IsSpecial(2));
  EXPECT_FALSE(mixtral->IsSpecial(1000));
  auto qwen = Load("qwen2_split");
  ASSERT_NE(qwen, nullptr);
  EXPECT_EQ(qwen->bos_id(), std::nullopt);
  EXPECT_EQ(qwen->eos_ids(), std::vector<int32_t>{*qwen->TokenToId("<|im_end|>")});
}

TEST(TokenizerConfigTest, LlamaConfigControlsBosAndEos) {
  const std::string dir = TokenizerDir("mixtral_legacy");
  const std::string tokenizer_json = ReadFileOrDie(dir + "/tokenizer.json");
  auto with_eos = Tokenizer::FromJson(
      tokenizer_json, R"({"tokenizer_class": "LlamaTokenizerFast", "bos_token": "<s>",
                          "eos_token": "</s>", "add_bos_token": false, "add_eos_token": true})");
  ASSERT_TRUE(with_eos.ok()) << with_eos.status();
  auto ids = (*with_eos)->Encode("Hello");
  ASSERT_TRUE(ids.ok());
  // transformers 4.57.1: LlamaTokenizerFast(add_bos_token=False, add_eos_token=True) gives
  // [22557, 2] ("▁Hello", "</s>"); with the default config [1, 22557].
  EXPECT_EQ(*ids, (std::vector<int32_t>{22557, 2}));
  auto default_ids = Load("mixtral_legacy")->Encode("Hello");
  ASSERT_TRUE(default_ids.ok());
  EXPECT_EQ(*default_ids, (std::vector<int32_t>{1, 22557}));
  auto missing = Tokenizer::FromJson(
      tokenizer_json, R"({"tokenizer_class": "LlamaTokenizer", "add_bos_token": true})");
  ASSERT_FALSE(missing.ok());
  EXPECT_THAT(missing.status().message(), HasSubstr("bos_token is not set"));
  auto unknown = Tokenizer::FromJson(tokenizer_json, R"({"eos_token": "<nope>"})");
  ASSERT_FALSE(unknown.ok());
  EXPECT_THAT(unknown.status().message(), HasSubstr("'<nope>' is not in the vocabulary"));
}

TEST(TokenizerStreamingTest, HoldsPartialCharactersAndByteRuns) {
  auto tokenizer = Load("mixtral_legacy");
  ASSERT_NE(tokenizer, nullptr);
  // "𝄞" has no token in Mixtral's vocab: it becomes four <0xNN> byte tokens.
  auto ids = tokenizer->Encode("a 𝄞 b", {.add_special_tokens = false});
  ASSERT_TRUE(ids.ok());
  StreamingDecoder stream(*tokenizer);
  std::vector<std::string> pieces;
  for (int32_t id : *ids) pieces.push_back(stream.Push(id));
  pieces.push_back(stream.Flush());
  std::string joined;
  for (const auto& piece : pieces) {
    EXPECT_EQ(piece.find("\xEF\xBF\xBD"), std::string::npos) << "replacement char emitted";
    joined += piece;
  }
  EXPECT_EQ(joined, *tokenizer->Decode(*ids));
  EXPECT_EQ(joined, "a 𝄞 b");
  // An incomplete byte run at the end decodes to one U+FFFD per byte, as in the reference.
  const int32_t e4 = *tokenizer->TokenToId("<0xE4>");
  const int32_t b8 = *tokenizer->TokenToId("<0xB8>");
  StreamingDecoder partial(*tokenizer);
  EXPECT_EQ(partial.Push(e4), "");
  EXPECT_EQ(partial.Push(b8), "");
  EXPECT_EQ(partial.Flush(), "\xEF\xBF\xBD\xEF\xBF\xBD");
}

TEST(TokenizerStreamingTest, ByteLevelNeverSplitsACharacter) {
  auto tokenizer = Load("gpt2_bytelevel");
  ASSERT_NE(tokenizer, nullptr);
  const std::string text = "日本語 👨‍👩‍👧‍👦 done";
  auto ids = tokenizer->Encode(text);
  ASSERT_TRUE(ids.ok());
  StreamingDecoder stream(*tokenizer);
  std::string joined;
  for (int32_t id : *ids) {
    const std::string piece = stream.Push(id);
    ASSERT_EQ(piece.find("\xEF\xBF\xBD"), std::string::npos);
    joined += piece;
  }
  joined += stream.Flush();
  EXPECT_EQ(joined, text);
  // The decoder is reusable after Flush.
  std::string again;
  for (int32_t id : *ids) again += stream.Push(id);
  again += stream.Flush();
  EXPECT_EQ(again, text);
}

TEST(TokenizerSpecialTokensTest, ParsedOnlyOnRequest) {
  auto tokenizer = Load("qwen2_split");
  ASSERT_NE(tokenizer, nullptr);
  const int32_t im_start = *tokenizer->TokenToId("<|im_start|>");
  const std::string text = "<|im_start|>user";
  auto as_text = tokenizer->Encode(text);
  ASSERT_TRUE(as_text.ok());
  EXPECT_THAT(*as_text, ::testing::Not(::testing::Contains(im_start)));
  auto parsed = tokenizer->Encode(text, {.parse_special_tokens = true});
  ASSERT_TRUE(parsed.ok());
  ASSERT_FALSE(parsed->empty());
  EXPECT_EQ(parsed->front(), im_start);
  EXPECT_EQ(*tokenizer->Decode(*parsed, /*skip_special_tokens=*/true), "user");
}

TEST(TokenizerConcurrencyTest, ThreadsShareOneTokenizer) {
  auto tokenizer = Load("llama3_split");
  ASSERT_NE(tokenizer, nullptr);
  const auto corpus = tokenizer_test::LoadCorpus();
  std::vector<std::vector<int32_t>> expected;
  for (const auto& entry : corpus) expected.push_back(*tokenizer->Encode(entry.text));
  std::vector<std::thread> threads;
  std::atomic<int> mismatches{0};
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      for (int round = 0; round < 20; ++round) {
        for (size_t i = 0; i < corpus.size(); ++i) {
          const size_t k = (i + t * 7 + round) % corpus.size();
          auto ids = tokenizer->Encode(corpus[k].text);
          if (!ids.ok() || *ids != expected[k]) ++mismatches;
        }
      }
    });
  }
  for (auto& thread : threads) thread.join();
  EXPECT_EQ(mismatches.load(), 0);
}

}  // namespace
}  // namespace moe
