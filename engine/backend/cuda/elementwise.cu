// Elementwise and row-wise kernels of the CUDA backend: embedding, RMSNorm, RoPE, KV write,
// clamp/fill/add, gated add, row gather, SwiGLU, bf16 splitting and the router.
#include <cuda_bf16.h>

#include <algorithm>
#include <cfloat>

#include "engine/backend/cuda/device_utils.cuh"
#include "engine/backend/cuda/kernels.h"

namespace moe::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarpsPerBlock = kThreads / 32;

// Grid over rows x cols elements with a 2-D launch: blockIdx.y = row (grid-stride), x = cols.
dim3 RowGrid(int64_t rows, int64_t cols) {
  const unsigned int x = CeilDiv(cols, kThreads);
  const unsigned int y = static_cast<unsigned int>(std::min<int64_t>(rows, 65535));
  return dim3(std::max(1u, x), std::max(1u, y));
}

#define MOE_FOR_EACH_ROW_COL(rows, cols)                            \
  const int64_t c = int64_t{blockIdx.x} * blockDim.x + threadIdx.x; \
  if (c >= (cols)) return;                                          \
  for (int64_t r = blockIdx.y; r < (rows); r += gridDim.y)

template <typename T>
__global__ void EmbedKernel(const int32_t* ids, int64_t rows, const T* table, int64_t hidden,
                            float* out, int64_t out_stride) {
  MOE_FOR_EACH_ROW_COL(rows, hidden) {
    out[r * out_stride + c] = LoadWeight<T>(table, int64_t{ids[r]} * hidden + c);
  }
}

// One warp per row.
__global__ void RmsNormKernel(const float* x, int64_t x_stride, int64_t rows, int64_t cols,
                              const float* weight, float eps, float* out, int64_t out_stride) {
  const int64_t row = int64_t{blockIdx.x} * kWarpsPerBlock + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= rows) return;
  const float* in = x + row * x_stride;
  float sum = 0.0f;
  for (int64_t c = lane; c < cols; c += 32) sum = fmaf(in[c], in[c], sum);
  sum = WarpSum(sum);
  const float inverse_rms = 1.0f / sqrtf(sum / static_cast<float>(cols) + eps);
  float* dst = out + row * out_stride;
  for (int64_t c = lane; c < cols; c += 32) dst[c] = weight[c] * (in[c] * inverse_rms);
}

// One thread per (row, head, i < half).
__global__ void RopeKernel(float* x, int64_t stride, int64_t rows, int32_t heads, int32_t half,
                           const int32_t* positions, const float* inv_freq) {
  const int64_t index = int64_t{blockIdx.x} * blockDim.x + threadIdx.x;
  const int64_t total = rows * heads * half;
  if (index >= total) return;
  const int32_t i = static_cast<int32_t>(index % half);
  const int64_t head = (index / half) % heads;
  const int64_t row = index / (int64_t{half} * heads);
  const float angle = static_cast<float>(positions[row]) * inv_freq[i];
  const float cos_angle = cosf(angle), sin_angle = sinf(angle);
  float* h = x + row * stride + head * 2 * half;
  const float first = h[i], second = h[i + half];
  h[i] = first * cos_angle - second * sin_angle;
  h[i + half] = second * cos_angle + first * sin_angle;
}

__device__ __forceinline__ void StoreKv(float value, float* to) { *to = value; }
__device__ __forceinline__ void StoreKv(float value, uint16_t* to) {
  *to = __bfloat16_as_ushort(__float2bfloat16_rn(value));  // as the CPU backend's FloatToBf16
}

template <typename T>
__global__ void WriteKvKernel(const float* k, int64_t k_stride, const float* v, int64_t v_stride,
                              int64_t rows, int64_t kv_dim, const int32_t* slots, T* key_pool,
                              T* value_pool) {
  MOE_FOR_EACH_ROW_COL(rows, kv_dim) {
    const int64_t slot = slots[r];
    StoreKv(k[r * k_stride + c], key_pool + slot * kv_dim + c);
    StoreKv(v[r * v_stride + c], value_pool + slot * kv_dim + c);
  }
}

__global__ void ClampKernel(float* x, int64_t stride, int64_t rows, int64_t cols, float limit) {
  MOE_FOR_EACH_ROW_COL(rows, cols) {
    const float v = x[r * stride + c];
    // std::clamp(v, -limit, limit), NaN passing through.
    x[r * stride + c] = v < -limit ? -limit : (limit < v ? limit : v);
  }
}

__global__ void FillKernel(float* x, int64_t stride, int64_t rows, int64_t cols, float value) {
  MOE_FOR_EACH_ROW_COL(rows, cols) { x[r * stride + c] = value; }
}

__global__ void AddKernel(float* residual, int64_t residual_stride, const float* x,
                          int64_t x_stride, int64_t rows, int64_t cols) {
  MOE_FOR_EACH_ROW_COL(rows, cols) { residual[r * residual_stride + c] += x[r * x_stride + c]; }
}

__global__ void AddBiasKernel(float* out, int64_t stride, int64_t rows, int64_t cols,
                              const float* bias) {
  MOE_FOR_EACH_ROW_COL(rows, cols) { out[r * stride + c] += bias[c]; }
}

__global__ void GatherRowsKernel(const float* x, int64_t x_stride, const int32_t* rows_index,
                                 int64_t rows, int64_t cols, float* out, int64_t out_stride) {
  MOE_FOR_EACH_ROW_COL(rows, cols) { out[r * out_stride + c] = x[rows_index[r] * x_stride + c]; }
}

// Whether (value, index) beats (best, best_index) in a scan that keeps the lowest index of the
// largest value and never moves to a NaN.
__device__ __forceinline__ bool BeatsArgMax(float value, int32_t index, float best,
                                            int32_t best_index) {
  return !isnan(value) && (isnan(best) || value > best || (value == best && index < best_index));
}

// One block per row: a strided scan per thread, then warp and block reductions.
__global__ void RowArgMaxKernel(const float* x, int64_t stride, int64_t cols, int32_t* out) {
  __shared__ float warp_best[kWarpsPerBlock];
  __shared__ int32_t warp_index[kWarpsPerBlock];
  const float* row = x + int64_t{blockIdx.x} * stride;
  float best = __int_as_float(0x7fc00000);  // NaN: beaten by any number
  int32_t best_index = INT32_MAX;
  for (int32_t c = threadIdx.x; c < cols; c += blockDim.x) {
    const float value = row[c];
    if (BeatsArgMax(value, c, best, best_index)) {
      best = value;
      best_index = c;
    }
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int offset = 16; offset > 0; offset >>= 1) {
    const float other = __shfl_down_sync(0xffffffffu, best, offset);
    const int32_t other_index = __shfl_down_sync(0xffffffffu, best_index, offset);
    if (BeatsArgMax(other, other_index, best, best_index)) {
      best = other;
      best_index = other_index;
    }
  }
  if (lane == 0) {
    warp_best[warp] = best;
    warp_index[warp] = best_index;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < kWarpsPerBlock; ++w) {
      if (BeatsArgMax(warp_best[w], warp_index[w], best, best_index)) {
        best = warp_best[w];
        best_index = warp_index[w];
      }
    }
    // A NaN in column 0 is never left behind by the scan; all-NaN rows also answer 0.
    out[blockIdx.x] = isnan(row[0]) || best_index == INT32_MAX ? 0 : best_index;
  }
}

__global__ void SiluMulKernel(float* gate, int64_t gate_stride, const float* up, int64_t up_stride,
                              int64_t rows, int64_t cols) {
  MOE_FOR_EACH_ROW_COL(rows, cols) {
    float* g = gate + r * gate_stride + c;
    *g = Silu(*g) * up[r * up_stride + c];
  }
}

__global__ void SplitBf16Kernel(const float* x, int64_t x_stride, int64_t rows, int64_t cols,
                                uint16_t* hi, uint16_t* lo) {
  MOE_FOR_EACH_ROW_COL(rows, cols) {
    const float v = x[r * x_stride + c];
    const __nv_bfloat16 h = __float2bfloat16_rn(v);
    hi[r * cols + c] = __bfloat16_as_ushort(h);
    if (lo != nullptr) {
      lo[r * cols + c] = __bfloat16_as_ushort(__float2bfloat16_rn(v - __bfloat162float(h)));
    }
  }
}

// One warp per row (8 per block); per-block expert sums in shared memory.
template <typename T>
__global__ void AddGatedKernel(const float* x, int64_t x_stride, const T* gate, const float* shared,
                               int64_t shared_stride, float* out, int64_t out_stride, int64_t rows,
                               int64_t cols) {
  const int64_t row = int64_t{blockIdx.x} * kWarpsPerBlock + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= rows) return;
  float dot = 0.0f;
  for (int64_t c = lane; c < cols; c += 32)
    dot = fmaf(x[row * x_stride + c], LoadWeight<T>(gate, c), dot);
  dot = WarpSum(dot);
  const float scale = 1.0f / (1.0f + expf(-dot));
  for (int64_t c = lane; c < cols; c += 32) {
    out[row * out_stride + c] += scale * shared[row * shared_stride + c];
  }
}

// One warp per token; grid-stride over tokens. Shared: [warps][experts] probabilities, then
// [experts + 1] doubles of block sums.
__global__ void RouteKernel(const float* logits, int64_t rows, int32_t experts, int32_t top_k,
                            bool normalize, int32_t* ids, float* weights, double* stats) {
  extern __shared__ unsigned char shared_raw[];
  double* block_stats = reinterpret_cast<double*>(shared_raw);
  float* probabilities =
      reinterpret_cast<float*>(block_stats + experts + 1) + (threadIdx.x / 32) * experts;
  const int lane = threadIdx.x % 32;
  for (int e = threadIdx.x; e <= experts; e += blockDim.x) block_stats[e] = 0.0;
  __syncthreads();
  for (int64_t t = int64_t{blockIdx.x} * kWarpsPerBlock + threadIdx.x / 32; t < rows;
       t += int64_t{gridDim.x} * kWarpsPerBlock) {
    const float* row = logits + t * experts;
    float max_logit = -FLT_MAX;
    for (int e = lane; e < experts; e += 32) max_logit = fmaxf(max_logit, row[e]);
    max_logit = WarpMax(max_logit);
    float total = 0.0f;
    for (int e = lane; e < experts; e += 32) {
      const float p = expf(row[e] - max_logit);
      probabilities[e] = p;
      total += p;
    }
    total = WarpSum(total);
    __syncwarp();
    for (int e = lane; e < experts; e += 32) {
      const float p = probabilities[e] / total;
      probabilities[e] = p;
      atomicAdd(&block_stats[e], static_cast<double>(p));
    }
    if (lane == 0) {
      const double log_sum_exp = max_logit + log(static_cast<double>(total));
      atomicAdd(&block_stats[experts], log_sum_exp * log_sum_exp);
    }
    __syncwarp();
    // Top-k by repeated warp argmax; ties go to the lower id. Chosen entries become -1.
    float chosen_total = 0.0f;
    for (int j = 0; j < top_k; ++j) {
      float best = -2.0f;
      int best_id = experts;
      for (int e = lane; e < experts; e += 32) {
        const float p = probabilities[e];
        if (p > best) {  // ascending e per lane: keeps the lower id on ties
          best = p;
          best_id = e;
        }
      }
#pragma unroll
      for (int offset = 16; offset > 0; offset >>= 1) {
        const float other = __shfl_xor_sync(0xffffffffu, best, offset);
        const int other_id = __shfl_xor_sync(0xffffffffu, best_id, offset);
        if (other > best || (other == best && other_id < best_id)) {
          best = other;
          best_id = other_id;
        }
      }
      __syncwarp();  // every lane has read probabilities[] before lane 0 writes it
      if (lane == 0) {
        ids[t * top_k + j] = best_id;
        weights[t * top_k + j] = best;
        // NaN logits make every comparison false: best_id stays `experts` (past this warp's
        // row); the sort's error flag then reports the id.
        if (best_id < experts) probabilities[best_id] = -1.0f;
        chosen_total += best;
      }
      __syncwarp();
    }
    if (lane == 0 && normalize) {
      for (int j = 0; j < top_k; ++j) weights[t * top_k + j] /= chosen_total;
    }
    __syncwarp();
  }
  __syncthreads();
  for (int e = threadIdx.x; e <= experts; e += blockDim.x) atomicAdd(&stats[e], block_stats[e]);
}

}  // namespace

cudaError_t LaunchEmbed(const int32_t* ids, int64_t rows, const void* table, WeightType type,
                        int64_t hidden, float* out, int64_t out_stride, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  if (type == WeightType::kBF16) {
    EmbedKernel<<<RowGrid(rows, hidden), kThreads, 0, stream>>>(
        ids, rows, static_cast<const uint16_t*>(table), hidden, out, out_stride);
  } else {
    EmbedKernel<<<RowGrid(rows, hidden), kThreads, 0, stream>>>(
        ids, rows, static_cast<const float*>(table), hidden, out, out_stride);
  }
  return cudaGetLastError();
}

cudaError_t LaunchRmsNorm(const float* x, int64_t x_stride, int64_t rows, int64_t cols,
                          const float* weight, float eps, float* out, int64_t out_stride,
                          cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  RmsNormKernel<<<CeilDiv(rows, kWarpsPerBlock), kThreads, 0, stream>>>(
      x, x_stride, rows, cols, weight, eps, out, out_stride);
  return cudaGetLastError();
}

cudaError_t LaunchRope(float* x, int64_t stride, int64_t rows, int32_t heads, int32_t head_dim,
                       const int32_t* positions, const float* inv_freq, cudaStream_t stream) {
  const int64_t total = rows * heads * (head_dim / 2);
  if (total == 0) return cudaSuccess;
  RopeKernel<<<CeilDiv(total, kThreads), kThreads, 0, stream>>>(x, stride, rows, heads,
                                                                head_dim / 2, positions, inv_freq);
  return cudaGetLastError();
}

cudaError_t LaunchWriteKv(const float* k, int64_t k_stride, const float* v, int64_t v_stride,
                          int64_t rows, int64_t kv_dim, const int32_t* slots, void* key_pool,
                          void* value_pool, bool bf16_pools, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  if (bf16_pools) {
    WriteKvKernel<<<RowGrid(rows, kv_dim), kThreads, 0, stream>>>(
        k, k_stride, v, v_stride, rows, kv_dim, slots, static_cast<uint16_t*>(key_pool),
        static_cast<uint16_t*>(value_pool));
  } else {
    WriteKvKernel<<<RowGrid(rows, kv_dim), kThreads, 0, stream>>>(
        k, k_stride, v, v_stride, rows, kv_dim, slots, static_cast<float*>(key_pool),
        static_cast<float*>(value_pool));
  }
  return cudaGetLastError();
}

cudaError_t LaunchClamp(float* x, int64_t stride, int64_t rows, int64_t cols, float limit,
                        cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  ClampKernel<<<RowGrid(rows, cols), kThreads, 0, stream>>>(x, stride, rows, cols, limit);
  return cudaGetLastError();
}

cudaError_t LaunchFill(float* x, int64_t stride, int64_t rows, int64_t cols, float value,
                       cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  FillKernel<<<RowGrid(rows, cols), kThreads, 0, stream>>>(x, stride, rows, cols, value);
  return cudaGetLastError();
}

cudaError_t LaunchAdd(float* residual, int64_t residual_stride, const float* x, int64_t x_stride,
                      int64_t rows, int64_t cols, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  AddKernel<<<RowGrid(rows, cols), kThreads, 0, stream>>>(residual, residual_stride, x, x_stride,
                                                          rows, cols);
  return cudaGetLastError();
}

cudaError_t LaunchAddBias(float* out, int64_t stride, int64_t rows, int64_t cols, const float* bias,
                          cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  AddBiasKernel<<<RowGrid(rows, cols), kThreads, 0, stream>>>(out, stride, rows, cols, bias);
  return cudaGetLastError();
}

cudaError_t LaunchAddGated(const float* x, int64_t x_stride, const void* gate, WeightType type,
                           const float* shared, int64_t shared_stride, float* out,
                           int64_t out_stride, int64_t rows, int64_t cols, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  const unsigned int blocks = CeilDiv(rows, kWarpsPerBlock);
  if (type == WeightType::kBF16) {
    AddGatedKernel<<<blocks, kThreads, 0, stream>>>(x, x_stride, static_cast<const uint16_t*>(gate),
                                                    shared, shared_stride, out, out_stride, rows,
                                                    cols);
  } else {
    AddGatedKernel<<<blocks, kThreads, 0, stream>>>(x, x_stride, static_cast<const float*>(gate),
                                                    shared, shared_stride, out, out_stride, rows,
                                                    cols);
  }
  return cudaGetLastError();
}

cudaError_t LaunchGatherRows(const float* x, int64_t x_stride, const int32_t* rows,
                             int64_t num_rows, int64_t cols, float* out, int64_t out_stride,
                             cudaStream_t stream) {
  if (num_rows == 0) return cudaSuccess;
  GatherRowsKernel<<<RowGrid(num_rows, cols), kThreads, 0, stream>>>(x, x_stride, rows, num_rows,
                                                                     cols, out, out_stride);
  return cudaGetLastError();
}

cudaError_t LaunchRowArgMax(const float* x, int64_t stride, int64_t rows, int64_t cols,
                            int32_t* out, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  if (cols <= 0 || cols > INT32_MAX || rows > INT32_MAX) return cudaErrorInvalidValue;
  RowArgMaxKernel<<<static_cast<unsigned int>(rows), kThreads, 0, stream>>>(x, stride, cols, out);
  return cudaGetLastError();
}

cudaError_t LaunchSiluMul(float* gate, int64_t gate_stride, const float* up, int64_t up_stride,
                          int64_t rows, int64_t cols, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  SiluMulKernel<<<RowGrid(rows, cols), kThreads, 0, stream>>>(gate, gate_stride, up, up_stride,
                                                              rows, cols);
  return cudaGetLastError();
}

cudaError_t LaunchSplitBf16(const float* x, int64_t x_stride, int64_t rows, int64_t cols,
                            uint16_t* hi, uint16_t* lo, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  SplitBf16Kernel<<<RowGrid(rows, cols), kThreads, 0, stream>>>(x, x_stride, rows, cols, hi, lo);
  return cudaGetLastError();
}

cudaError_t LaunchRoute(const float* logits, int64_t rows, int32_t experts, int32_t top_k,
                        bool normalize, int32_t* ids, float* weights, double* stats,
                        cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  const size_t shared = (experts + 1) * sizeof(double) + kWarpsPerBlock * experts * sizeof(float);
  const unsigned int blocks = std::min<unsigned int>(CeilDiv(rows, kWarpsPerBlock), 512);
  if (shared > 48 * 1024) {
    const cudaError_t error = cudaFuncSetAttribute(
        RouteKernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(shared));
    if (error != cudaSuccess) return error;
  }
  RouteKernel<<<blocks, kThreads, shared, stream>>>(logits, rows, experts, top_k, normalize, ids,
                                                    weights, stats);
  return cudaGetLastError();
}

}  // namespace moe::cuda
