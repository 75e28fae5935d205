// Small device helpers shared by the backend's .cu files.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace moe::cuda {

__device__ __forceinline__ float Bf16BitsToFloat(uint16_t bits) {
  return __uint_as_float(static_cast<uint32_t>(bits) << 16);
}

// Element `index` of a weight of element type T (uint16_t = bf16 bits, float).
template <typename T>
__device__ __forceinline__ float LoadWeight(const T* data, int64_t index);
template <>
__device__ __forceinline__ float LoadWeight<uint16_t>(const uint16_t* data, int64_t index) {
  return Bf16BitsToFloat(data[index]);
}
template <>
__device__ __forceinline__ float LoadWeight<float>(const float* data, int64_t index) {
  return data[index];
}

__device__ __forceinline__ float WarpSum(float value) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    value += __shfl_xor_sync(0xffffffffu, value, offset);
  }
  return value;
}

__device__ __forceinline__ float WarpMax(float value) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    value = fmaxf(value, __shfl_xor_sync(0xffffffffu, value, offset));
  }
  return value;
}

// x / (1 + exp(-x)), as the CPU backend computes it.
__device__ __forceinline__ float Silu(float x) { return x / (1.0f + expf(-x)); }

inline unsigned int CeilDiv(int64_t a, int64_t b) {
  return static_cast<unsigned int>((a + b - 1) / b);
}

}  // namespace moe::cuda
