// CUDA and cuBLAS errors become absl::Status through one macro family (after ggml-cuda's
// CUDA_CHECK_GEN): CUDA_RETURN_IF_ERROR(cudaMalloc(...)), CUBLAS_RETURN_IF_ERROR(...).
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace moe::cuda {

inline absl::Status CudaStatus(cudaError_t error, const char* expression, const char* file,
                               int line) {
  if (error == cudaSuccess) return absl::OkStatus();
  const absl::StatusCode code = error == cudaErrorMemoryAllocation
                                    ? absl::StatusCode::kResourceExhausted
                                    : absl::StatusCode::kInternal;
  return absl::Status(
      code, absl::StrCat("CUDA error ", cudaGetErrorName(error), " (", cudaGetErrorString(error),
                         ") in ", expression, " at ", file, ":", line));
}

inline absl::Status CublasStatus(cublasStatus_t status, const char* expression, const char* file,
                                 int line) {
  if (status == CUBLAS_STATUS_SUCCESS) return absl::OkStatus();
  return absl::InternalError(absl::StrCat("cuBLAS error ", cublasGetStatusName(status), " (",
                                          cublasGetStatusString(status), ") in ", expression,
                                          " at ", file, ":", line));
}

}  // namespace moe::cuda

#define MOE_GPU_CHECK_GEN(to_status, expr)                                         \
  do {                                                                             \
    ::absl::Status moe_gpu_status_ = to_status((expr), #expr, __FILE__, __LINE__); \
    if (!moe_gpu_status_.ok()) return moe_gpu_status_;                             \
  } while (0)

#define CUDA_RETURN_IF_ERROR(expr) MOE_GPU_CHECK_GEN(::moe::cuda::CudaStatus, expr)
#define CUBLAS_RETURN_IF_ERROR(expr) MOE_GPU_CHECK_GEN(::moe::cuda::CublasStatus, expr)
