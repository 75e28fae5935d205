#include "engine/backend/backend.h"

#include "absl/strings/str_cat.h"
#include "engine/backend/cpu/cpu_backend.h"

#ifdef MOE_HAVE_CUDA
#include "engine/backend/cuda/cuda_backend.h"
#include "engine/backend/cuda/cuda_device.h"
#endif

namespace moe {

absl::StatusOr<std::unique_ptr<Backend>> CreateBackend(const std::string& name,
                                                       const BackendOptions& options) {
  const CpuBackendOptions cpu_options{.num_threads = options.num_threads,
                                      .bf16_activations = options.cpu_bf16_activations};
  if (name == "cpu") return CreateCpuBackend(cpu_options);
  if (options.cpu_bf16_activations) {
    return absl::InvalidArgumentError(
        absl::StrCat("bf16 activations need the cpu backend; got backend '", name, "'"));
  }
  if (name == "auto") {
#ifdef MOE_HAVE_CUDA
    // The GPU when one is visible (device_description() then starts with "auto: GPU found").
    if (cuda::VisibleDeviceCount() > 0) {
      cuda::CudaBackendOptions cuda_options = cuda::CudaBackendOptionsFromEnv();
      cuda_options.selected_by_auto = true;
      return cuda::CreateCudaBackend(cuda_options);
    }
#endif
    return CreateCpuBackend(cpu_options);
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
