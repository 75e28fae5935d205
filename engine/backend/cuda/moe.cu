// The MoE layer's device pieces: counting sort of the routing by expert (histogram, scan,
// scatter in one block), the grouped bf16 tensor-core GEMM driven by a tile list, and the
// weighted un-permute.
#include <cuda_bf16.h>
#include <mma.h>

#include <algorithm>

#include "engine/backend/cuda/device_utils.cuh"
#include "engine/backend/cuda/kernels.h"

namespace moe::cuda {
namespace {

constexpr int kSortThreads = 1024;

// One block: histogram in shared memory, a serial scan by thread 0 (experts <= a few hundred;
// it also emits the touched-expert and tile lists), then the scatter.
__global__ void __launch_bounds__(kSortThreads) MoeSortKernel(const MoeSortArgs args) {
  extern __shared__ int32_t sort_shared[];
  const int32_t experts = args.experts;
  int32_t* counts = sort_shared;            // [experts]
  int32_t* cursor = sort_shared + experts;  // [experts]
  for (int e = threadIdx.x; e < experts; e += blockDim.x) counts[e] = 0;
  __syncthreads();
  for (int64_t a = threadIdx.x; a < args.assignments; a += blockDim.x) {
    int32_t e = args.expert_ids[a];
    if (e < 0 || e >= experts) {
      *args.error_flag = 1;
      e = 0;
    }
    atomicAdd(&counts[e], 1);
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    int32_t offset = 0, touched = 0, tiles = 0;
    for (int e = 0; e < experts; ++e) {
      args.offsets[e] = offset;
      cursor[e] = offset;
      const int32_t count = counts[e];
      if (count > 0) {
        args.touched[touched++] = e;
        for (int32_t r = 0; r < count; r += kGemmTileRows) {
          args.tile_expert[tiles] = e;
          args.tile_row[tiles] = offset + r;
          ++tiles;
        }
      }
      offset += count;
    }
    args.offsets[experts] = offset;
    *args.num_touched = touched;
    *args.num_tiles = tiles;
  }
  __syncthreads();
  for (int64_t a = threadIdx.x; a < args.assignments; a += blockDim.x) {
    int32_t e = args.expert_ids[a];
    if (e < 0 || e >= experts) e = 0;
    const int32_t row = atomicAdd(&cursor[e], 1);
    args.row_token[row] = static_cast<int32_t>(a / args.top_k);
    args.row_of_assignment[a] = row;
  }
}

// ---- grouped GEMM ------------------------------------------------------------------------------

constexpr int kBM = kGemmTileRows;  // 64
constexpr int kBN = 64;
constexpr int kBK = 32;
constexpr int kPad = 8;
constexpr int kLd = kBK + kPad;    // 40 bf16 per shared row
constexpr int kCLd = kBN + 4;      // 68 floats per epilogue row
constexpr int kGemmThreads = 128;  // 4 warps, 2 x 2, each 32 x 32

using namespace nvcuda;

struct GemmOperands {
  __nv_bfloat16 a_hi[kBM][kLd];
  __nv_bfloat16 a_lo[kBM][kLd];
  __nv_bfloat16 b_gate[kBN][kLd];
  __nv_bfloat16 b_up[kBN][kLd];
};
constexpr size_t kGemmSharedBytes = sizeof(GemmOperands) > sizeof(float) * kBM* kCLd
                                        ? sizeof(GemmOperands)
                                        : sizeof(float) * kBM* kCLd;

template <bool kGateUp, bool kSinglePass>
__global__ void __launch_bounds__(kGemmThreads) GroupedGemmKernel(const GroupedGemmArgs args) {
  __shared__ __align__(128) unsigned char shared_raw[kGemmSharedBytes];
  GemmOperands& ops = *reinterpret_cast<GemmOperands*>(shared_raw);
  float* c_tile = reinterpret_cast<float*>(shared_raw);  // [kBM][kCLd], after the main loop

  const int warp = threadIdx.x / 32;
  const int warp_m = warp / 2, warp_n = warp % 2;
  const int64_t n0 = int64_t{blockIdx.x} * kBN;
  const int64_t k = args.k;
  const int num_tiles = *args.num_tiles;

  for (int tile = blockIdx.y; tile < num_tiles; tile += gridDim.y) {
    const int32_t expert = args.tile_expert[tile];
    const int64_t row0 = args.tile_row[tile];
    const int64_t group_left = args.offsets[expert + 1] - row0;
    const int rows = static_cast<int>(group_left < kBM ? group_left : kBM);
    const uint16_t* w_gate = args.w_gate + expert * args.expert_stride;
    const uint16_t* w_up = kGateUp ? args.w_up + expert * args.expert_stride : nullptr;

    // Each thread loads 4 float4 of A (rows idx / 8, columns (idx % 8) * 4).
    const float* a_src[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int idx = threadIdx.x + i * kGemmThreads;
      const int r = idx / 8;
      const int64_t row = row0 + (r < rows ? r : 0);
      const int64_t in_row = args.row_map != nullptr ? args.row_map[row] : row;
      a_src[i] = r < rows ? args.x + in_row * args.x_stride : nullptr;
    }

    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc_up[kGateUp ? 2 : 1][2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        wmma::fill_fragment(acc[i][j], 0.0f);
        if constexpr (kGateUp) wmma::fill_fragment(acc_up[i][j], 0.0f);
      }
    }

    for (int64_t k0 = 0; k0 < k; k0 += kBK) {
      // A: fp32 -> bf16 hi (+ lo).
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int idx = threadIdx.x + i * kGemmThreads;
        const int r = idx / 8, c = (idx % 8) * 4;
        float4 v = make_float4(0.f, 0.f, 0.f, 0.f);
        if (a_src[i] != nullptr && k0 + c < k) {
          v = *reinterpret_cast<const float4*>(a_src[i] + k0 + c);
        }
        const float values[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const __nv_bfloat16 hi = __float2bfloat16_rn(values[e]);
          ops.a_hi[r][c + e] = hi;
          if constexpr (!kSinglePass) {
            ops.a_lo[r][c + e] = __float2bfloat16_rn(values[e] - __bfloat162float(hi));
          }
        }
      }
      // B: 8 bf16 per uint4, 2 per thread per matrix.
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const int idx = threadIdx.x + i * kGemmThreads;
        const int n = idx / 4, c = (idx % 4) * 8;
        uint4 g = make_uint4(0, 0, 0, 0), u = make_uint4(0, 0, 0, 0);
        if (n0 + n < args.n && k0 + c < k) {
          g = __ldg(reinterpret_cast<const uint4*>(w_gate + (n0 + n) * k + k0 + c));
          if constexpr (kGateUp) {
            u = __ldg(reinterpret_cast<const uint4*>(w_up + (n0 + n) * k + k0 + c));
          }
        }
        *reinterpret_cast<uint4*>(&ops.b_gate[n][c]) = g;
        if constexpr (kGateUp) *reinterpret_cast<uint4*>(&ops.b_up[n][c]) = u;
      }
      __syncthreads();
#pragma unroll
      for (int kk = 0; kk < kBK; kk += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> a_hi[2];
        wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> a_lo[2];
#pragma unroll
        for (int i = 0; i < 2; ++i) {
          wmma::load_matrix_sync(a_hi[i], &ops.a_hi[warp_m * 32 + i * 16][kk], kLd);
          if constexpr (!kSinglePass) {
            wmma::load_matrix_sync(a_lo[i], &ops.a_lo[warp_m * 32 + i * 16][kk], kLd);
          }
        }
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          // B = W^T: W[n][k] in shared is B in column-major order.
          wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::col_major> b;
          wmma::load_matrix_sync(b, &ops.b_gate[warp_n * 32 + j * 16][kk], kLd);
#pragma unroll
          for (int i = 0; i < 2; ++i) {
            wmma::mma_sync(acc[i][j], a_hi[i], b, acc[i][j]);
            if constexpr (!kSinglePass) wmma::mma_sync(acc[i][j], a_lo[i], b, acc[i][j]);
          }
          if constexpr (kGateUp) {
            wmma::load_matrix_sync(b, &ops.b_up[warp_n * 32 + j * 16][kk], kLd);
#pragma unroll
            for (int i = 0; i < 2; ++i) {
              wmma::mma_sync(acc_up[i][j], a_hi[i], b, acc_up[i][j]);
              if constexpr (!kSinglePass) wmma::mma_sync(acc_up[i][j], a_lo[i], b, acc_up[i][j]);
            }
          }
        }
      }
      __syncthreads();
    }

    // Epilogue: fragments (SwiGLU applied elementwise: gate and up fragments share a layout)
    // -> shared -> guarded global stores.
#pragma unroll
    for (int i = 0; i < 2; ++i) {
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        if constexpr (kGateUp) {
#pragma unroll
          for (int e = 0; e < acc[i][j].num_elements; ++e) {
            acc[i][j].x[e] = Silu(acc[i][j].x[e]) * acc_up[i][j].x[e];
          }
        }
        wmma::store_matrix_sync(c_tile + (warp_m * 32 + i * 16) * kCLd + warp_n * 32 + j * 16,
                                acc[i][j], kCLd, wmma::mem_row_major);
      }
    }
    __syncthreads();
    for (int idx = threadIdx.x; idx < kBM * kBN; idx += kGemmThreads) {
      const int r = idx / kBN, c = idx % kBN;
      if (r < rows && n0 + c < args.n) {
        args.out[(row0 + r) * args.out_stride + n0 + c] = c_tile[r * kCLd + c];
      }
    }
    __syncthreads();
  }
}

__global__ void MoeCombineKernel(const float* expert_out, int64_t expert_stride,
                                 const int32_t* row_of_assignment, const float* weights,
                                 int64_t rows, int32_t top_k, int64_t cols, float* out,
                                 int64_t out_stride) {
  const int64_t c = int64_t{blockIdx.x} * blockDim.x + threadIdx.x;
  if (c >= cols) return;
  for (int64_t t = blockIdx.y; t < rows; t += gridDim.y) {
    float acc = out[t * out_stride + c];
    for (int j = 0; j < top_k; ++j) {
      const int64_t a = t * top_k + j;
      acc = fmaf(weights[a], expert_out[int64_t{row_of_assignment[a]} * expert_stride + c], acc);
    }
    out[t * out_stride + c] = acc;
  }
}

}  // namespace

cudaError_t LaunchMoeSort(const MoeSortArgs& args, cudaStream_t stream) {
  const size_t shared = 2 * sizeof(int32_t) * args.experts;
  if (shared > 48 * 1024) {
    const cudaError_t error = cudaFuncSetAttribute(
        MoeSortKernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(shared));
    if (error != cudaSuccess) return error;
  }
  MoeSortKernel<<<1, kSortThreads, shared, stream>>>(args);
  return cudaGetLastError();
}

cudaError_t LaunchGroupedGemm(const GroupedGemmArgs& args, cudaStream_t stream) {
  if (args.n == 0 || args.max_tiles == 0) return cudaSuccess;
  const dim3 grid(CeilDiv(args.n, kBN), std::min(args.max_tiles, 65535));
  if (args.gate_up) {
    if (args.single_pass) {
      GroupedGemmKernel<true, true><<<grid, kGemmThreads, 0, stream>>>(args);
    } else {
      GroupedGemmKernel<true, false><<<grid, kGemmThreads, 0, stream>>>(args);
    }
  } else {
    if (args.single_pass) {
      GroupedGemmKernel<false, true><<<grid, kGemmThreads, 0, stream>>>(args);
    } else {
      GroupedGemmKernel<false, false><<<grid, kGemmThreads, 0, stream>>>(args);
    }
  }
  return cudaGetLastError();
}

cudaError_t LaunchMoeCombine(const float* expert_out, int64_t expert_stride,
                             const int32_t* row_of_assignment, const float* weights, int64_t rows,
                             int32_t top_k, int64_t cols, float* out, int64_t out_stride,
                             cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  const dim3 grid(CeilDiv(cols, 256), static_cast<unsigned int>(std::min<int64_t>(rows, 65535)));
  MoeCombineKernel<<<grid, 256, 0, stream>>>(expert_out, expert_stride, row_of_assignment, weights,
                                             rows, top_k, cols, out, out_stride);
  return cudaGetLastError();
}

}  // namespace moe::cuda
