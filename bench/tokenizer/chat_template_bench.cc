// Render time of moe::ChatTemplate, single-threaded: one template, one context (a JSON file
// of template variables, as chat_template.h's Render takes them).
//   chat_template_bench <template.jinja> <context.json> [repeats]
// Prints one JSON object: parse time, the best and the median render time over the repeats,
// and the rendered size. bench_chat_template.py runs it beside transformers' renderer.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "engine/tokenizer/chat_template.h"
#include "nlohmann/json.hpp"

namespace {

double Seconds(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

bool ReadFile(const char* path, std::string* out) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return false;
  std::ostringstream contents;
  contents << in.rdbuf();
  *out = contents.str();
  return true;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 3) {
    std::fprintf(stderr, "usage: %s <template.jinja> <context.json> [repeats]\n", argv[0]);
    return 2;
  }
  const int repeats = argc > 3 ? std::max(1, std::atoi(argv[3])) : 200;
  std::string source, context_text;
  if (!ReadFile(argv[1], &source) || !ReadFile(argv[2], &context_text)) {
    std::fprintf(stderr, "cannot read %s or %s\n", argv[1], argv[2]);
    return 2;
  }
  const auto context =
      nlohmann::ordered_json::parse(context_text, nullptr, /*allow_exceptions=*/false);
  if (!context.is_object()) {
    std::fprintf(stderr, "%s: not a JSON object\n", argv[2]);
    return 2;
  }
  const auto parse_start = std::chrono::steady_clock::now();
  absl::StatusOr<moe::ChatTemplate> parsed = moe::ChatTemplate::Parse(source);
  const double parse_s = Seconds(parse_start);
  if (!parsed.ok()) {
    std::fprintf(stderr, "%s\n", parsed.status().ToString().c_str());
    return 1;
  }
  std::vector<double> times;
  size_t rendered_bytes = 0;
  for (int i = 0; i < repeats; ++i) {
    const auto start = std::chrono::steady_clock::now();
    absl::StatusOr<std::string> rendered = parsed->Render(context);
    times.push_back(Seconds(start));
    if (!rendered.ok()) {
      std::fprintf(stderr, "%s\n", rendered.status().ToString().c_str());
      return 1;
    }
    rendered_bytes = rendered->size();
  }
  std::sort(times.begin(), times.end());
  std::printf(
      "{\"parse_us\": %.1f, \"render_best_us\": %.1f, \"render_median_us\": %.1f, "
      "\"rendered_bytes\": %zu}\n",
      parse_s * 1e6, times.front() * 1e6, times[times.size() / 2] * 1e6, rendered_bytes);
  return 0;
}
