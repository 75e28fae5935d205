#include "engine/backend/cuda/cuda_device.h"

#include "engine/backend/cuda/cuda_status.h"

namespace moe::cuda {

int VisibleDeviceCount() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no driver" error
    return 0;
  }
  return count;
}

absl::StatusOr<std::vector<DeviceProperties>> ListDevices() {
  std::vector<DeviceProperties> devices;
  const int count = VisibleDeviceCount();
  for (int index = 0; index < count; ++index) {
    cudaDeviceProp properties;
    CUDA_RETURN_IF_ERROR(cudaGetDeviceProperties(&properties, index));
    devices.push_back(
        {index, properties.name, properties.major, properties.minor, properties.totalGlobalMem});
  }
  return devices;
}

absl::StatusOr<DeviceBuffer> AllocateDevice(size_t bytes) {
  void* data = nullptr;
  CUDA_RETURN_IF_ERROR(cudaMalloc(&data, bytes));
  return DeviceBuffer(data, bytes, [](void* p) { cudaFree(p); });
}

}  // namespace moe::cuda
