// CUDA device discovery and device memory ownership. Compiled whenever nvcc is present.
#pragma once

#include <cstddef>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/backend/backend.h"

namespace moe::cuda {

// Number of usable GPUs; 0 when there is no driver or no device (never an error).
int VisibleDeviceCount();

struct DeviceProperties {
  int index = 0;
  std::string name;
  int compute_capability_major = 0;
  int compute_capability_minor = 0;
  size_t total_memory_bytes = 0;
};

absl::StatusOr<std::vector<DeviceProperties>> ListDevices();

// cudaMalloc'd memory owned by a DeviceBuffer (released with cudaFree).
absl::StatusOr<DeviceBuffer> AllocateDevice(size_t bytes);

}  // namespace moe::cuda
