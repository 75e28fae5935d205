// libFuzzer target: encode and decode arbitrary bytes with the fixture tokenizers.
// The first input byte picks the tokenizer and the mode; the rest is the text (possibly
// invalid UTF-8) or, in id mode, little-endian int32 ids (possibly unknown or negative).
// Checks: no crash; invalid UTF-8 is an InvalidArgument error; streaming decode equals whole
// decode and emits valid UTF-8; byte-level tokenizers without a normalizer round-trip.
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "engine/tokenizer/tokenizer.h"

namespace {

struct Fixture {
  const char* dir;
  bool lossless;  // decode(encode(text)) == text for valid UTF-8
};

constexpr Fixture kFixtures[] = {
    {"tests/fixtures/tokenizers/gpt2_bytelevel", false},  // rstrip added token
    {"tests/fixtures/tokenizers/qwen2_split", false},
    {"tests/fixtures/tokenizers/llama3_split", true},
    {"tests/fixtures/tokenizers/kitchen_sink", false},
};
constexpr size_t kNumFixtures = sizeof(kFixtures) / sizeof(kFixtures[0]);

std::vector<std::unique_ptr<moe::Tokenizer>>& Tokenizers() {
  static auto* tokenizers = [] {
    auto* list = new std::vector<std::unique_ptr<moe::Tokenizer>>();
    for (const Fixture& fixture : kFixtures) {
      auto tokenizer =
          moe::Tokenizer::FromModelDir(std::string(MOE_SOURCE_DIR) + "/" + fixture.dir);
      if (!tokenizer.ok()) {
        std::fprintf(stderr, "%s\n", tokenizer.status().ToString().c_str());
        std::abort();
      }
      list->push_back(std::move(tokenizer).value());
    }
    return list;
  }();
  return *tokenizers;
}

void Check(bool condition, const char* what) {
  if (!condition) {
    std::fprintf(stderr, "check failed: %s\n", what);
    std::abort();
  }
}

void CheckStreaming(const moe::Tokenizer& tokenizer, const std::vector<int32_t>& ids,
                    bool skip_special) {
  auto whole = tokenizer.Decode(ids, skip_special);
  Check(whole.ok(), "Decode ok");
  moe::StreamingDecoder stream(tokenizer, skip_special);
  std::string streamed;
  for (int32_t id : ids) streamed += stream.Push(id);
  streamed += stream.Flush();
  Check(streamed == *whole, "streaming decode == whole decode");
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  const uint8_t selector = data[0];
  const size_t index = selector % kNumFixtures;
  const moe::Tokenizer& tokenizer = *Tokenizers()[index];
  const bool id_mode = (selector / kNumFixtures) % 2 == 1;
  const bool parse_special = (selector / (2 * kNumFixtures)) % 2 == 1;
  const std::string_view rest(reinterpret_cast<const char*>(data + 1), size - 1);

  if (id_mode) {
    std::vector<int32_t> ids(rest.size() / 4);
    if (!ids.empty()) std::memcpy(ids.data(), rest.data(), ids.size() * 4);
    for (int32_t& id : ids) {
      // Mostly valid ids, sometimes out of range.
      if (id >= 0 && (id & 0x40000000) == 0) id %= tokenizer.vocab_size() + 3;
    }
    CheckStreaming(tokenizer, ids, false);
    CheckStreaming(tokenizer, ids, true);
    return 0;
  }
  auto ids =
      tokenizer.Encode(rest, {.add_special_tokens = true, .parse_special_tokens = parse_special});
  if (!ids.ok()) {
    Check(ids.status().code() == absl::StatusCode::kInvalidArgument, "invalid input status");
    return 0;
  }
  for (int32_t id : *ids) Check(id >= 0 && id < tokenizer.vocab_size(), "id in range");
  CheckStreaming(tokenizer, *ids, false);
  if (kFixtures[index].lossless && !parse_special) {
    auto plain = tokenizer.Encode(rest, {.add_special_tokens = false});
    Check(plain.ok(), "plain encode ok");
    auto decoded = tokenizer.Decode(*plain, false);
    Check(decoded.ok() && *decoded == rest, "byte-level round trip");
  }
  return 0;
}
