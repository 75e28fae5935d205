// Helpers shared by the libFuzzer targets.
#pragma once

#include <cstdio>
#include <cstdlib>
#include <string>

namespace moe::fuzz {

// Aborts (a finding for libFuzzer) when `condition` is false.
inline void Check(bool condition, const char* what) {
  if (!condition) {
    std::fprintf(stderr, "check failed: %s\n", what);
    std::abort();
  }
}

// A private temporary directory for this process, made once.
inline const std::string& TempDir() {
  static const std::string dir = [] {
    char pattern[] = "/tmp/moe_fuzz_XXXXXX";
    const char* made = mkdtemp(pattern);
    Check(made != nullptr, "mkdtemp");
    return std::string(made);
  }();
  return dir;
}

inline void WriteFile(const std::string& path, const char* data, size_t size) {
  FILE* file = std::fopen(path.c_str(), "wb");
  Check(file != nullptr, "fopen for writing");
  Check(std::fwrite(data, 1, size, file) == size || size == 0, "fwrite");
  std::fclose(file);
}

}  // namespace moe::fuzz
