// Shared helpers of the tokenizer tests: fixture paths, the corpus, the 1 MiB mixed text.
#pragma once

#include <cstdint>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "nlohmann/json.hpp"

namespace moe::tokenizer_test {

inline std::string FixturesDir() {
  return std::string(MOE_SOURCE_DIR) + "/tests/fixtures/tokenizers";
}

// Trained tokenizers are committed as folders; the Mixtral ones are extracted by CMake.
inline std::string TokenizerDir(const std::string& name) {
  if (name.starts_with("mixtral")) return std::string(MOE_TOKENIZER_EXTRACTED_DIR) + "/" + name;
  return FixturesDir() + "/" + name;
}

inline std::string ReadFileOrDie(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream contents;
  contents << in.rdbuf();
  return contents.str();
}

inline nlohmann::json ReadJson(const std::string& path) {
  return nlohmann::json::parse(ReadFileOrDie(path), nullptr, /*allow_exceptions=*/false);
}

struct CorpusEntry {
  std::string name;
  std::string text;
};

inline std::vector<CorpusEntry> LoadCorpus() {
  std::vector<CorpusEntry> corpus;
  const nlohmann::json json = ReadJson(FixturesDir() + "/corpus.json");
  if (!json.is_array()) return corpus;
  for (const auto& entry : json) {
    corpus.push_back({entry["name"].get<std::string>(), entry["text"].get<std::string>()});
  }
  return corpus;
}

// About 1 MiB: "<k>: <corpus entry k mod n>\n" until at least 1 MiB (as mixed_text() in
// make_tokenizer_fixtures.py).
inline std::string MixedText(const std::vector<CorpusEntry>& corpus) {
  std::string text;
  for (size_t k = 0; text.size() < (1u << 20); ++k) {
    text += std::to_string(k) + ": " + corpus[k % corpus.size()].text + "\n";
  }
  return text;
}

inline uint64_t Fnv1a64(const void* data, size_t size, uint64_t hash = 0xcbf29ce484222325ULL) {
  const auto* bytes = static_cast<const uint8_t*>(data);
  for (size_t i = 0; i < size; ++i) {
    hash ^= bytes[i];
    hash *= 0x100000001b3ULL;
  }
  return hash;
}

// Hash of the ids as little-endian int32 (x86/ARM are little-endian).
inline std::string IdsHash(const std::vector<int32_t>& ids) {
  char buffer[17];
  snprintf(buffer, sizeof(buffer), "%016llx",
           static_cast<unsigned long long>(Fnv1a64(ids.data(), ids.size() * sizeof(int32_t))));
  return buffer;
}

inline std::string TextHash(const std::string& text) {
  char buffer[17];
  snprintf(buffer, sizeof(buffer), "%016llx",
           static_cast<unsigned long long>(Fnv1a64(text.data(), text.size())));
  return buffer;
}

}  // namespace moe::tokenizer_test
