// Move-only owners of CUDA and cuBLAS resources: streams, events, cuBLAS handles, graphs,
// pinned host buffers and grow-on-demand stream-ordered device scratch. Creation goes through
// Create* functions that return absl::StatusOr; destructors never fail loudly (errors at teardown
// are dropped, as there is nobody left to report them to).
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>
#include <utility>

#include "absl/status/statusor.h"
#include "engine/backend/backend.h"
#include "engine/backend/cuda/cuda_status.h"

namespace moe::cuda {

// A move-only handle with a release function. `Traits` provides `Handle`, `Null()` and
// `Release(Handle)` (ReleasedBy below).
template <typename Traits>
class UniqueHandle {
 public:
  using Handle = typename Traits::Handle;
  UniqueHandle() = default;
  explicit UniqueHandle(Handle handle) : handle_(handle) {}
  UniqueHandle(UniqueHandle&& other) noexcept
      : handle_(std::exchange(other.handle_, Traits::Null())) {}
  UniqueHandle& operator=(UniqueHandle&& other) noexcept {
    if (this != &other) {
      Reset();
      handle_ = std::exchange(other.handle_, Traits::Null());
    }
    return *this;
  }
  UniqueHandle(const UniqueHandle&) = delete;
  UniqueHandle& operator=(const UniqueHandle&) = delete;
  ~UniqueHandle() { Reset(); }

  Handle get() const { return handle_; }
  explicit operator bool() const { return handle_ != Traits::Null(); }
  void Reset() {
    if (handle_ != Traits::Null()) Traits::Release(handle_);
    handle_ = Traits::Null();
  }

 private:
  Handle handle_ = Traits::Null();
};

// Traits of a pointer-like handle released by the function `kRelease`.
template <typename H, auto kRelease>
struct ReleasedBy {
  using Handle = H;
  static Handle Null() { return nullptr; }
  static void Release(Handle h) { kRelease(h); }
};

using Stream = UniqueHandle<ReleasedBy<cudaStream_t, &cudaStreamDestroy>>;
using Event = UniqueHandle<ReleasedBy<cudaEvent_t, &cudaEventDestroy>>;
using CublasHandle = UniqueHandle<ReleasedBy<cublasHandle_t, &cublasDestroy>>;
using Graph = UniqueHandle<ReleasedBy<cudaGraph_t, &cudaGraphDestroy>>;
// An executable graph still running when released is freed when it completes.
using GraphExec = UniqueHandle<ReleasedBy<cudaGraphExec_t, &cudaGraphExecDestroy>>;

inline absl::StatusOr<Stream> CreateStream() {
  cudaStream_t stream = nullptr;
  CUDA_RETURN_IF_ERROR(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  return Stream(stream);
}

inline absl::StatusOr<Event> CreateEvent() {
  cudaEvent_t event = nullptr;
  CUDA_RETURN_IF_ERROR(cudaEventCreateWithFlags(&event, cudaEventDisableTiming));
  return Event(event);
}

inline absl::StatusOr<CublasHandle> CreateCublas(cudaStream_t stream) {
  cublasHandle_t handle = nullptr;
  CUBLAS_RETURN_IF_ERROR(cublasCreate(&handle));
  CublasHandle owned(handle);
  CUBLAS_RETURN_IF_ERROR(cublasSetStream(handle, stream));
  // Full float32 arithmetic for float32 GEMMs (no TF32 unless asked for).
  CUBLAS_RETURN_IF_ERROR(cublasSetMathMode(handle, CUBLAS_DEFAULT_MATH));
  return owned;
}

// Page-locked host memory (cudaHostAlloc), owned by a DeviceBuffer that releases it with
// cudaFreeHost.
inline absl::StatusOr<DeviceBuffer> AllocatePinned(size_t bytes) {
  void* data = nullptr;
  const cudaError_t error = cudaHostAlloc(&data, bytes, cudaHostAllocDefault);
  if (error != cudaSuccess) {
    cudaGetLastError();
    return absl::ResourceExhaustedError(
        absl::StrCat("cuda: cannot allocate ", bytes,
                     " bytes of pinned host memory: ", cudaGetErrorString(error)));
  }
  return DeviceBuffer(data, bytes, [](void* p) { cudaFreeHost(p); });
}

// Device scratch that grows on demand, stream-ordered (cudaMallocAsync / cudaFreeAsync on the
// owning stream), so growing never synchronizes the host. Contents are not preserved on growth.
class Scratch {
 public:
  Scratch() = default;
  Scratch(Scratch&& other) noexcept
      : data_(std::exchange(other.data_, nullptr)),
        bytes_(std::exchange(other.bytes_, 0)),
        stream_(std::exchange(other.stream_, nullptr)) {}
  Scratch& operator=(Scratch&& other) noexcept {
    if (this != &other) {
      Reset();
      data_ = std::exchange(other.data_, nullptr);
      bytes_ = std::exchange(other.bytes_, 0);
      stream_ = std::exchange(other.stream_, nullptr);
    }
    return *this;
  }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  ~Scratch() { Reset(); }

  // Whether Ensure(bytes) would keep the current memory.
  bool Holds(size_t bytes) const { return bytes <= bytes_ && data_ != nullptr; }

  // At least `bytes` (rounded up, grown by 1.5x to amortise) on `stream`.
  absl::Status Ensure(size_t bytes, cudaStream_t stream) {
    if (Holds(bytes)) return absl::OkStatus();
    const size_t grown = std::max<size_t>(256, std::max(bytes, bytes_ + bytes_ / 2));
    Reset();
    void* data = nullptr;
    CUDA_RETURN_IF_ERROR(cudaMallocAsync(&data, grown, stream));
    data_ = data;
    bytes_ = grown;
    stream_ = stream;
    return absl::OkStatus();
  }
  void* data() const { return data_; }
  template <typename T>
  T* as() const {
    return static_cast<T*>(data_);
  }

 private:
  void Reset() {
    if (data_ != nullptr) cudaFreeAsync(data_, stream_);
    data_ = nullptr;
    bytes_ = 0;
  }
  void* data_ = nullptr;
  size_t bytes_ = 0;
  cudaStream_t stream_ = nullptr;
};

}  // namespace moe::cuda
