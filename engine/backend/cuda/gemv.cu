// Weight-streaming products for few rows (decode): every warp owns kColsPerWarp output
// features and streams their weight rows with 16-byte loads, multiplying each weight vector
// with up to 8 activation rows held in registers, so a weight is read once per 8 rows of a
// group. Arithmetic is float32 (bf16 weights widened exactly), as on the CPU backend.
#include <algorithm>

#include "engine/backend/cuda/device_utils.cuh"
#include "engine/backend/cuda/kernels.h"

namespace moe::cuda {
namespace {

constexpr int kGemvThreads = 128;
constexpr int kGemvWarps = kGemvThreads / 32;
constexpr int kColsPerWarp = 4;
constexpr int kColsPerBlock = kGemvWarps * kColsPerWarp;
constexpr int kMaxChunkRows = 8;

// 16 bytes of weights as floats.
template <typename T>
struct Vec;
template <>
struct Vec<uint16_t> {
  static constexpr int kSize = 8;
  __device__ __forceinline__ static void Load(const uint16_t* p, float (&out)[8]) {
    const uint4 raw = __ldg(reinterpret_cast<const uint4*>(p));
    const uint32_t words[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      out[2 * i] = __uint_as_float(words[i] << 16);
      out[2 * i + 1] = __uint_as_float(words[i] & 0xffff0000u);
    }
  }
};
template <>
struct Vec<float> {
  static constexpr int kSize = 4;
  __device__ __forceinline__ static void Load(const float* p, float (&out)[4]) {
    const float4 raw = __ldg(reinterpret_cast<const float4*>(p));
    out[0] = raw.x;
    out[1] = raw.y;
    out[2] = raw.z;
    out[3] = raw.w;
  }
};

template <int N>
__device__ __forceinline__ void LoadActivations(const float* p, float (&out)[N]) {
#pragma unroll
  for (int i = 0; i < N; i += 4) {
    const float4 raw = __ldg(reinterpret_cast<const float4*>(p + i));
    out[i] = raw.x;
    out[i + 1] = raw.y;
    out[i + 2] = raw.z;
    out[i + 3] = raw.w;
  }
}

// Rows [row_begin, row_begin + count) (count <= R) of the group, columns [n0, n0 + 4) of this
// warp.
template <typename T, int R, bool kGateUp>
__device__ __forceinline__ void GemvChunk(const GroupedGemvArgs& args, const T* w_gate,
                                          const T* w_up, int64_t row_begin, int count, int64_t n0) {
  constexpr int V = Vec<T>::kSize;
  const int lane = threadIdx.x % 32;
  const float* x_rows[R];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int64_t row = row_begin + (r < count ? r : 0);
    const int64_t in_row = args.row_map != nullptr ? args.row_map[row] : row;
    x_rows[r] = args.x + in_row * args.x_stride;
  }
  float acc[R][kColsPerWarp] = {};
  float acc_up[kGateUp ? R : 1][kColsPerWarp] = {};
  const int64_t k = args.k;
  for (int64_t k0 = int64_t{lane} * V; k0 < k; k0 += 32 * V) {
    float x[R][V];
#pragma unroll
    for (int r = 0; r < R; ++r) LoadActivations<V>(x_rows[r] + k0, x[r]);
#pragma unroll
    for (int c = 0; c < kColsPerWarp; ++c) {
      const int64_t n = min(n0 + c, args.n - 1);  // clamped; results of n >= args.n are dropped
      float w[V];
      Vec<T>::Load(w_gate + n * k + k0, w);
#pragma unroll
      for (int r = 0; r < R; ++r) {
#pragma unroll
        for (int i = 0; i < V; ++i) acc[r][c] = fmaf(x[r][i], w[i], acc[r][c]);
      }
      if constexpr (kGateUp) {
        Vec<T>::Load(w_up + n * k + k0, w);
#pragma unroll
        for (int r = 0; r < R; ++r) {
#pragma unroll
          for (int i = 0; i < V; ++i) acc_up[r][c] = fmaf(x[r][i], w[i], acc_up[r][c]);
        }
      }
    }
  }
#pragma unroll
  for (int r = 0; r < R; ++r) {
#pragma unroll
    for (int c = 0; c < kColsPerWarp; ++c) {
      float value = WarpSum(acc[r][c]);
      if constexpr (kGateUp) value = Silu(value) * WarpSum(acc_up[r][c]);
      const int64_t n = n0 + c;
      if (lane == 0 && r < count && n < args.n) {
        if constexpr (!kGateUp) {
          if (args.bias != nullptr) value += args.bias[n];
        }
        args.out[(row_begin + r) * args.out_stride + n] = value;
      }
    }
  }
}

// kSingleRow: rows one at a time (R = 1 only), which keeps the register count, and so the
// occupancy, of the batch-1 decode path low; otherwise chunks of up to 8 rows.
template <typename T, bool kGateUp, bool kSingleRow>
__global__ void __launch_bounds__(kGemvThreads) GroupedGemvKernel(const GroupedGemvArgs args) {
  int64_t first = 0, last = args.rows;
  int64_t expert = 0;
  if (args.offsets != nullptr) {
    if (static_cast<int>(blockIdx.y) >= *args.num_touched) return;
    expert = args.touched[blockIdx.y];
    first = args.offsets[expert];
    last = args.offsets[expert + 1];
  }
  const int64_t n0 = int64_t{blockIdx.x} * kColsPerBlock + (threadIdx.x / 32) * kColsPerWarp;
  if (n0 >= args.n) return;
  const T* w_gate = static_cast<const T*>(args.w_gate) + expert * args.expert_stride;
  const T* w_up =
      kGateUp ? static_cast<const T*>(args.w_up) + expert * args.expert_stride : nullptr;
  if constexpr (kSingleRow) {
    for (int64_t row = first; row < last; ++row) {
      GemvChunk<T, 1, kGateUp>(args, w_gate, w_up, row, 1, n0);
    }
  } else {
    for (int64_t row = first; row < last; row += kMaxChunkRows) {
      const int count = static_cast<int>(last - row < kMaxChunkRows ? last - row : kMaxChunkRows);
      if (count == 1) {
        GemvChunk<T, 1, kGateUp>(args, w_gate, w_up, row, count, n0);
      } else if (count == 2) {
        GemvChunk<T, 2, kGateUp>(args, w_gate, w_up, row, count, n0);
      } else if (count <= 4) {
        GemvChunk<T, 4, kGateUp>(args, w_gate, w_up, row, count, n0);
      } else {
        GemvChunk<T, 8, kGateUp>(args, w_gate, w_up, row, count, n0);
      }
    }
  }
}

// Fallback for shapes the vector path cannot take (k not a multiple of the vector width or
// misaligned rows): one thread per (row, n), any layout.
template <typename T>
__global__ void GroupedGemvScalarKernel(const GroupedGemvArgs args) {
  int64_t first = 0, last = args.rows;
  int64_t expert = 0;
  if (args.offsets != nullptr) {
    if (static_cast<int>(blockIdx.y) >= *args.num_touched) return;
    expert = args.touched[blockIdx.y];
    first = args.offsets[expert];
    last = args.offsets[expert + 1];
  }
  const int64_t n = int64_t{blockIdx.x} * blockDim.x + threadIdx.x;
  if (n >= args.n) return;
  const T* w_gate = static_cast<const T*>(args.w_gate) + expert * args.expert_stride + n * args.k;
  const T* w_up = args.gate_up
                      ? static_cast<const T*>(args.w_up) + expert * args.expert_stride + n * args.k
                      : nullptr;
  for (int64_t row = first; row < last; ++row) {
    const int64_t in_row = args.row_map != nullptr ? args.row_map[row] : row;
    const float* x = args.x + in_row * args.x_stride;
    float gate = 0.0f, up = 0.0f;
    for (int64_t i = 0; i < args.k; ++i) {
      gate = fmaf(x[i], LoadWeight<T>(w_gate, i), gate);
      if (w_up != nullptr) up = fmaf(x[i], LoadWeight<T>(w_up, i), up);
    }
    float value;
    if (args.gate_up) {
      value = Silu(gate) * up;
    } else {
      value = gate + (args.bias != nullptr ? args.bias[n] : 0.0f);
    }
    args.out[row * args.out_stride + n] = value;
  }
}

bool Aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

}  // namespace

cudaError_t LaunchGroupedGemv(const GroupedGemvArgs& args, cudaStream_t stream) {
  if (args.n == 0 || (args.offsets == nullptr && args.rows == 0)) return cudaSuccess;
  const int vector = args.type == WeightType::kBF16 ? 8 : 4;
  const int64_t element = args.type == WeightType::kBF16 ? 2 : 4;
  const bool vectorizable = args.k % vector == 0 && args.x_stride % 4 == 0 && Aligned16(args.x) &&
                            Aligned16(args.w_gate) &&
                            (args.w_up == nullptr || Aligned16(args.w_up)) &&
                            (args.expert_stride * element) % 16 == 0;
  const unsigned int groups = args.offsets != nullptr ? std::max(1, args.max_groups) : 1;
  if (vectorizable) {
    const dim3 grid(CeilDiv(args.n, kColsPerBlock), groups);
    const bool single_row = args.offsets != nullptr ? args.max_group_rows == 1 : args.rows == 1;
#define MOE_LAUNCH_GEMV(T, GATE_UP)                                                \
  if (single_row) {                                                                \
    GroupedGemvKernel<T, GATE_UP, true><<<grid, kGemvThreads, 0, stream>>>(args);  \
  } else {                                                                         \
    GroupedGemvKernel<T, GATE_UP, false><<<grid, kGemvThreads, 0, stream>>>(args); \
  }
    if (args.type == WeightType::kBF16) {
      if (args.gate_up) {
        MOE_LAUNCH_GEMV(uint16_t, true)
      } else {
        MOE_LAUNCH_GEMV(uint16_t, false)
      }
    } else {
      if (args.gate_up) {
        MOE_LAUNCH_GEMV(float, true)
      } else {
        MOE_LAUNCH_GEMV(float, false)
      }
    }
#undef MOE_LAUNCH_GEMV
  } else {
    const dim3 grid(CeilDiv(args.n, 128), groups);
    if (args.type == WeightType::kBF16) {
      GroupedGemvScalarKernel<uint16_t><<<grid, 128, 0, stream>>>(args);
    } else {
      GroupedGemvScalarKernel<float><<<grid, 128, 0, stream>>>(args);
    }
  }
  return cudaGetLastError();
}

}  // namespace moe::cuda
