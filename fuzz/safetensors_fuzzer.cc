// libFuzzer target: a checkpoint directory opened with TensorStore::OpenDirectory.
// The first byte picks the layout:
//   even: the rest is model.safetensors (header length, JSON header, data);
//   odd:  the rest is split at "#SHARD#" into model.safetensors.index.json and up to three
//         shards model-0000<i>-of-00003.safetensors (missing ones are absent).
// Checks: no crash or out-of-bounds read; every tensor handed out has
// num_bytes == elements x dtype size and its first and last bytes are readable.
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <string>
#include <string_view>

#include "engine/model/safetensors.h"
#include "fuzz/fuzz_util.h"

namespace {

constexpr std::string_view kSeparator = "#SHARD#";

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  namespace fs = std::filesystem;
  const std::string dir = moe::fuzz::TempDir();
  std::error_code error;
  for (const auto& entry : fs::directory_iterator(dir, error)) fs::remove(entry.path(), error);
  const std::string_view rest(reinterpret_cast<const char*>(data + 1), size - 1);
  if (data[0] % 2 == 0) {
    moe::fuzz::WriteFile(dir + "/model.safetensors", rest.data(), rest.size());
  } else {
    std::string_view remaining = rest;
    for (int part = 0; part < 4; ++part) {
      const size_t at = remaining.find(kSeparator);
      const std::string_view piece = remaining.substr(0, at);
      const std::string name = part == 0
                                   ? "model.safetensors.index.json"
                                   : "model-0000" + std::to_string(part) + "-of-00003.safetensors";
      moe::fuzz::WriteFile(dir + "/" + name, piece.data(), piece.size());
      if (at == std::string_view::npos) break;
      remaining = remaining.substr(at + kSeparator.size());
    }
  }
  absl::StatusOr<moe::TensorStore> store = moe::TensorStore::OpenDirectory(dir);
  if (!store.ok()) {
    moe::fuzz::Check(!store.status().message().empty(), "errors carry a message");
    return 0;
  }
  volatile uint8_t sink = 0;
  for (const auto& [name, tensor] : store->tensors()) {
    moe::fuzz::Check(tensor != nullptr && tensor->name == name, "index names its tensor");
    moe::fuzz::Check(tensor->num_elements() >= 0, "non-negative element count");
    moe::fuzz::Check(tensor->num_bytes == tensor->num_elements() * moe::DTypeSize(tensor->dtype),
                     "byte size == elements x dtype size");
    if (tensor->num_bytes > 0) {
      sink = sink + static_cast<uint8_t>(tensor->data[0]);
      sink = sink + static_cast<uint8_t>(tensor->data[tensor->num_bytes - 1]);
    }
    (void)store->Find(name);
  }
  return 0;
}
