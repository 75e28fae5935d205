// Single-threaded encode/decode throughput of moe::Tokenizer on one text file.
//   tokenizer_bench <model_dir with tokenizer.json> <text file> [repeats]
// Prints one JSON object: MB/s for the first encode (fresh pre-token cache), the best of the
// repeats (warm cache), decode, and the token count.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <sstream>
#include <string>

#include "engine/tokenizer/tokenizer.h"

namespace {

double Seconds(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 3) {
    std::fprintf(stderr, "usage: %s <model_dir> <text_file> [repeats]\n", argv[0]);
    return 2;
  }
  const int repeats = argc > 3 ? std::max(1, std::atoi(argv[3])) : 5;
  std::ifstream in(argv[2], std::ios::binary);
  if (!in) {
    std::fprintf(stderr, "cannot open %s\n", argv[2]);
    return 2;
  }
  std::ostringstream contents;
  contents << in.rdbuf();
  const std::string text = contents.str();

  auto tokenizer = moe::Tokenizer::FromModelDir(argv[1]);
  if (!tokenizer.ok()) {
    std::fprintf(stderr, "%s\n", tokenizer.status().ToString().c_str());
    return 1;
  }
  const moe::EncodeOptions options{.add_special_tokens = false};
  auto start = std::chrono::steady_clock::now();
  auto ids = (*tokenizer)->Encode(text, options);
  const double cold = Seconds(start);
  if (!ids.ok()) {
    std::fprintf(stderr, "%s\n", ids.status().ToString().c_str());
    return 1;
  }
  double warm = 1e30;
  for (int i = 0; i < repeats; ++i) {
    start = std::chrono::steady_clock::now();
    auto again = (*tokenizer)->Encode(text, options);
    warm = std::min(warm, Seconds(start));
    if (!again.ok() || again->size() != ids->size()) return 1;
  }
  double decode = 1e30;
  for (int i = 0; i < repeats; ++i) {
    start = std::chrono::steady_clock::now();
    auto decoded = (*tokenizer)->Decode(*ids);
    decode = std::min(decode, Seconds(start));
    if (!decoded.ok()) return 1;
  }
  const double mb = text.size() / 1e6;
  std::printf(
      "{\"bytes\": %zu, \"tokens\": %zu, \"encode_cold_mb_s\": %.2f, \"encode_warm_mb_s\": %.2f, "
      "\"decode_mb_s\": %.2f}\n",
      text.size(), ids->size(), mb / cold, mb / warm, mb / decode);
  return 0;
}
