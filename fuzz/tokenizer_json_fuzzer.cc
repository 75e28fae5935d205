// libFuzzer target: tokenizer.json contents through Tokenizer::FromJson. The first byte picks
// whether a tokenizer_config.json follows: when odd, the rest is split at the first "#CONFIG#"
// into tokenizer.json and tokenizer_config.json.
// Checks: no crash; a refusal carries a message; an accepted tokenizer encodes a fixed sample
// (ASCII, accents, CJK, emoji, whitespace runs, special-looking text) to ids in its vocabulary,
// and streaming decode of those ids equals whole decode.
#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "engine/tokenizer/tokenizer.h"
#include "fuzz/fuzz_util.h"

namespace {

constexpr std::string_view kSample =
    "Hello, world! caf\xC3\xA9 \xE4\xBD\xA0\xE5\xA5\xBD \xF0\x9F\x98\x80  \t\n"
    "<s></s><|endoftext|> x=1; 12345";

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  using moe::fuzz::Check;
  const std::string_view rest(reinterpret_cast<const char*>(data + 1), size - 1);
  std::string_view json = rest;
  std::optional<std::string_view> config;
  if (data[0] % 2 == 1) {
    const size_t at = rest.find("#CONFIG#");
    if (at != std::string_view::npos) {
      json = rest.substr(0, at);
      config = rest.substr(at + 8);
    }
  }
  auto tokenizer = moe::Tokenizer::FromJson(json, config);
  if (!tokenizer.ok()) {
    Check(!tokenizer.status().message().empty(), "refusals carry a message");
    return 0;
  }
  const moe::Tokenizer& t = **tokenizer;
  for (bool special : {false, true}) {
    auto ids = t.Encode(kSample, {.add_special_tokens = special, .parse_special_tokens = special});
    if (!ids.ok()) continue;
    for (int32_t id : *ids) Check(id >= 0 && id < t.vocab_size(), "ids inside the vocabulary");
    auto whole = t.Decode(*ids, special);
    Check(whole.ok(), "decoding encoded ids succeeds");
    moe::StreamingDecoder stream(t, special);
    std::string streamed;
    for (int32_t id : *ids) streamed += stream.Push(id);
    streamed += stream.Flush();
    Check(streamed == *whole, "streaming decode == whole decode");
  }
  return 0;
}
