// Every fixture tokenizer x every corpus entry: ids and decoded text identical to Hugging Face
// `tokenizers` (expected values recorded by tests/reference/make_tokenizer_fixtures.py), and
// streaming decode identical to whole decode.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <memory>
#include <string>
#include <vector>

#include "engine/tokenizer/tokenizer.h"
#include "tests/tokenizer/tokenizer_test_util.h"

namespace moe {
namespace {

using tokenizer_test::LoadCorpus;
using tokenizer_test::ReadJson;
using tokenizer_test::TokenizerDir;

const std::vector<std::string> kTokenizers = {
    "gpt2_bytelevel", "gpt2_prefix_space", "qwen2_split",      "llama3_split",
    "kitchen_sink",   "mixtral_legacy",    "mixtral_metaspace"};

std::vector<int32_t> Ids(const nlohmann::json& array) { return array.get<std::vector<int32_t>>(); }

bool IsValidUtf8(const std::string& text) {
  // Accepts exactly the well-formed sequences (no overlongs, surrogates, > U+10FFFF).
  size_t i = 0;
  const auto* s = reinterpret_cast<const unsigned char*>(text.data());
  while (i < text.size()) {
    const unsigned char c = s[i];
    size_t n;
    unsigned char lo = 0x80, hi = 0xBF;
    if (c < 0x80) {
      ++i;
      continue;
    } else if (c >= 0xC2 && c <= 0xDF) {
      n = 2;
    } else if (c >= 0xE0 && c <= 0xEF) {
      n = 3;
      if (c == 0xE0) lo = 0xA0;
      if (c == 0xED) hi = 0x9F;
    } else if (c >= 0xF0 && c <= 0xF4) {
      n = 4;
      if (c == 0xF0) lo = 0x90;
      if (c == 0xF4) hi = 0x8F;
    } else {
      return false;
    }
    if (i + n > text.size()) return false;
    for (size_t k = 1; k < n; ++k) {
      const unsigned char b = s[i + k];
      if (b < (k == 1 ? lo : 0x80) || b > (k == 1 ? hi : 0xBF)) return false;
    }
    i += n;
  }
  return true;
}

// Streams `ids` one at a time; every emitted piece must be complete UTF-8.
std::string StreamDecode(const Tokenizer& tokenizer, const std::vector<int32_t>& ids,
                         bool skip_special) {
  StreamingDecoder decoder(tokenizer, skip_special);
  std::string text;
  for (const int32_t id : ids) {
    const std::string piece = decoder.Push(id);
    EXPECT_TRUE(IsValidUtf8(piece)) << "partial UTF-8 emitted after id " << id;
    text += piece;
  }
  const std::string tail = decoder.Flush();
  EXPECT_TRUE(IsValidUtf8(tail));
  EXPECT_TRUE(decoder.status().ok()) << decoder.status();
  return text + tail;
}

class TokenizerReferenceTest : public ::testing::TestWithParam<std::string> {
 protected:
  static void SetUpTestSuite() {
    corpus_ = new std::vector<tokenizer_test::CorpusEntry>(LoadCorpus());
  }
  static void TearDownTestSuite() {
    delete corpus_;
    corpus_ = nullptr;
  }

  void SetUp() override {
    auto tokenizer = Tokenizer::FromModelDir(TokenizerDir(GetParam()));
    ASSERT_TRUE(tokenizer.ok()) << tokenizer.status();
    tokenizer_ = std::move(tokenizer).value();
    expected_ = ReadJson(std::string(MOE_SOURCE_DIR) + "/tests/fixtures/tokenizers/expected/" +
                         GetParam() + ".json");
    ASSERT_TRUE(expected_.is_object()) << "missing expected results for " << GetParam();
    ASSERT_EQ(expected_["cases"].size(), corpus_->size());
  }

  static std::vector<tokenizer_test::CorpusEntry>* corpus_;
  std::unique_ptr<Tokenizer> tokenizer_;
  nlohmann::json expected_;
};

std::vector<tokenizer_test::CorpusEntry>* TokenizerReferenceTest::corpus_ = nullptr;

TEST_P(TokenizerReferenceTest, VocabSizeMatches) {
  EXPECT_EQ(tokenizer_->vocab_size(), expected_["vocab_size"].get<int32_t>());
}

TEST_P(TokenizerReferenceTest, EncodeMatchesReference) {
  for (size_t i = 0; i < corpus_->size(); ++i) {
    const auto& entry = (*corpus_)[i];
    const auto& expected = expected_["cases"][i];
    ASSERT_EQ(expected["name"], entry.name);
    auto plain = tokenizer_->Encode(entry.text,
                                    {.add_special_tokens = false, .parse_special_tokens = false});
    ASSERT_TRUE(plain.ok()) << entry.name << ": " << plain.status();
    EXPECT_EQ(*plain, Ids(expected["ids"])) << entry.name;
    auto special =
        tokenizer_->Encode(entry.text, {.add_special_tokens = true, .parse_special_tokens = true});
    ASSERT_TRUE(special.ok()) << entry.name << ": " << special.status();
    EXPECT_EQ(*special, Ids(expected["ids_with_special"])) << entry.name;
  }
}

TEST_P(TokenizerReferenceTest, DecodeMatchesReference) {
  for (const auto& expected : expected_["cases"]) {
    const std::string name = expected["name"];
    const auto ids = Ids(expected["ids"]);
    const auto ids_special = Ids(expected["ids_with_special"]);
    EXPECT_EQ(*tokenizer_->Decode(ids, false), expected["decoded"].get<std::string>()) << name;
    EXPECT_EQ(*tokenizer_->Decode(ids_special, false),
              expected["decoded_with_special"].get<std::string>())
        << name;
    EXPECT_EQ(*tokenizer_->Decode(ids_special, true),
              expected["decoded_skip_special"].get<std::string>())
        << name;
  }
  for (const auto& expected : expected_["random_decode"]) {
    const auto ids = Ids(expected["ids"]);
    EXPECT_EQ(*tokenizer_->Decode(ids, false), expected["decoded"].get<std::string>())
        << expected["ids"].dump();
    EXPECT_EQ(*tokenizer_->Decode(ids, true), expected["decoded_skip_special"].get<std::string>())
        << expected["ids"].dump();
  }
}

TEST_P(TokenizerReferenceTest, StreamingDecodeEqualsWholeDecode) {
  for (const auto& expected : expected_["cases"]) {
    const std::string name = expected["name"];
    for (const char* key : {"ids", "ids_with_special"}) {
      const auto ids = Ids(expected[key]);
      for (const bool skip : {false, true}) {
        EXPECT_EQ(StreamDecode(*tokenizer_, ids, skip), *tokenizer_->Decode(ids, skip))
            << name << " " << key << " skip=" << skip;
      }
    }
  }
  for (const auto& expected : expected_["random_decode"]) {
    const auto ids = Ids(expected["ids"]);
    EXPECT_EQ(StreamDecode(*tokenizer_, ids, false), expected["decoded"].get<std::string>())
        << expected["ids"].dump();
    EXPECT_EQ(StreamDecode(*tokenizer_, ids, true),
              expected["decoded_skip_special"].get<std::string>())
        << expected["ids"].dump();
  }
}

TEST_P(TokenizerReferenceTest, MixedOneMegabyteMatchesReference) {
  const auto& expected = expected_["mixed_1mb"];
  const std::string text = tokenizer_test::MixedText(*corpus_);
  ASSERT_EQ(text.size(), expected["text_bytes"].get<size_t>());
  ASSERT_EQ(tokenizer_test::TextHash(text), expected["text_fnv1a64"].get<std::string>());
  auto ids = tokenizer_->Encode(text, {.add_special_tokens = false});
  ASSERT_TRUE(ids.ok()) << ids.status();
  const auto first_ids = Ids(expected["first_ids"]);
  ASSERT_GE(ids->size(), first_ids.size());
  EXPECT_EQ(std::vector<int32_t>(ids->begin(), ids->begin() + first_ids.size()), first_ids);
  EXPECT_EQ(ids->size(), expected["count"].get<size_t>());
  EXPECT_EQ(tokenizer_test::IdsHash(*ids), expected["ids_fnv1a64"].get<std::string>());
  auto decoded = tokenizer_->Decode(*ids, false);
  ASSERT_TRUE(decoded.ok());
  EXPECT_EQ(tokenizer_test::TextHash(*decoded), expected["decoded_fnv1a64"].get<std::string>());
  EXPECT_EQ(StreamDecode(*tokenizer_, *ids, false), *decoded);
}

INSTANTIATE_TEST_SUITE_P(AllFixtures, TokenizerReferenceTest, ::testing::ValuesIn(kTokenizers),
                         [](const auto& info) { return info.param; });

}  // namespace
}  // namespace moe
