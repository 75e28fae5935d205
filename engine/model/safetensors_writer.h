// Writes safetensors files (used by the synthetic-model tool and by tests).
#pragma once

#include <cstdint>
#include <fstream>
#include <span>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "engine/model/dtype.h"

namespace moe {

struct TensorSpec {
  std::string name;
  DType dtype = DType::kBF16;
  std::vector<int64_t> shape;

  int64_t num_bytes() const;
};

struct TensorToWrite {
  std::string name;
  DType dtype = DType::kBF16;
  std::vector<int64_t> shape;
  std::vector<uint8_t> bytes;  // exactly elements x DTypeSize(dtype)
};

// The header block: 8-byte little-endian length + JSON padded to a multiple of 8 bytes.
std::string SafetensorsHeader(const std::vector<TensorSpec>& specs);

// Streams a file tensor by tensor, so a checkpoint never has to fit in memory twice.
class SafetensorsStreamWriter {
 public:
  static absl::StatusOr<SafetensorsStreamWriter> Create(const std::string& path,
                                                        std::vector<TensorSpec> specs);
  // Appends the data of the next tensor in spec order; its size must match the spec.
  absl::Status Append(std::span<const uint8_t> bytes);
  // Checks that every tensor was written and flushes.
  absl::Status Finish();

 private:
  std::string path_;
  std::vector<TensorSpec> specs_;
  size_t next_ = 0;
  std::ofstream file_;
};

std::string SerializeSafetensors(const std::vector<TensorToWrite>& tensors);
absl::Status WriteSafetensors(const std::string& path, const std::vector<TensorToWrite>& tensors);

}  // namespace moe
