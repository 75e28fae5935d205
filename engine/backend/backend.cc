#include "engine/backend/backend.h"

#include "absl/strings/str_cat.h"
#include "engine/backend/cpu/cpu_backend.h"

#ifdef MOE_HAVE_CUDA
#include "engine/backend/cuda/cuda_backend.h"
#include "engine/backend/cuda/cuda_device.h"
#endif

namespace moe {

absl::StatusOr<std::unique_ptr<Backend>> CreateBackend(const std::string& name,
                                                       int32_t num_threads) {
  if (name == "cpu") return CreateCpuBackend(num_threads);
  if (name == "auto") {
#ifdef MOE_HAVE_CUDA
    // The GPU when one is visible (device_description() then starts with "auto: GPU found").
    if (cuda::VisibleDeviceCount() > 0) {
      cuda::CudaBackendOptions options = cuda::CudaBackendOptionsFromEnv();
      options.selected_by_auto = true;
      return cuda::CreateCudaBackend(options);
    }
#endif
    return CreateCpuBackend(num_threads);
  }
  if (name == "cuda") {
#ifdef MOE_HAVE_CUDA
    return cuda::CreateCudaBackend(cuda::CudaBackendOptionsFromEnv());
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
