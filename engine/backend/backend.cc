#include "engine/backend/backend.h"

#include "absl/strings/str_cat.h"
#include "engine/backend/cpu/cpu_backend.h"

#ifdef MOE_HAVE_CUDA
#include "engine/backend/cuda/cuda_device.h"
#endif

namespace moe {

absl::StatusOr<std::unique_ptr<Backend>> CreateBackend(const std::string& name,
                                                       int32_t num_threads) {
  if (name == "cpu" || name == "auto") {
    // The CUDA backend's kernels are not in this build yet, so "auto" means the CPU.
    return CreateCpuBackend(num_threads);
  }
  if (name == "cuda") {
#ifdef MOE_HAVE_CUDA
    const int devices = cuda::VisibleDeviceCount();
    return absl::UnimplementedError(absl::StrCat(
        "--backend=cuda: this build has the CUDA toolchain (", devices,
        " GPU(s) visible) but no CUDA forward pass yet; supported backends: cpu, auto"));
#else
    return absl::UnimplementedError(
        "--backend=cuda: this build has no CUDA support (nvcc was not found at build time); "
        "supported backends: cpu, auto");
#endif
  }
  return absl::InvalidArgumentError(
      absl::StrCat("unknown backend '", name, "'; supported: auto, cpu, cuda"));
}

}  // namespace moe
