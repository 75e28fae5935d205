// Paged attention over block tables: one kernel for prefill chunks and decode tokens.
//
// A block takes one AttentionTile (up to 32 query rows = tokens x heads of one KV-head group of
// one sequence), one KV head and one split of the key range. It walks the keys in chunks of 32
// positions through the block table (K and V chunks staged in shared memory, read once for all
// the tile's rows), keeps an online softmax per row in float32 and writes an unnormalised
// partial (acc, max, sum). A second kernel merges the splits (flash-decoding) and normalises.
#include <algorithm>
#include <cfloat>

#include "engine/backend/cuda/device_utils.cuh"
#include "engine/backend/cuda/kernels.h"

namespace moe::cuda {
namespace {

constexpr int kRows = kAttentionTileRows;  // 32
constexpr int kKeys = 32;                  // keys per chunk (= warp size: one lane per key)
constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

__global__ void __launch_bounds__(kThreads) PagedAttentionKernel(const AttentionArgs args) {
  extern __shared__ float attention_shared[];
  const int d_size = args.head_dim;
  float* q_s = attention_shared;                         // [kRows][D]
  float* k_s = q_s + kRows * d_size;                     // [kKeys][D + 1]
  float* v_s = k_s + kKeys * (d_size + 1);               // [kKeys][D]
  float* p_s = v_s + kKeys * d_size;                     // [kRows][kKeys]
  float* acc_s = p_s + kRows * kKeys;                    // [kRows][D]
  float* m_s = acc_s + kRows * d_size;                   // [kRows]
  float* l_s = m_s + kRows;                              // [kRows]
  float* alpha_s = l_s + kRows;                          // [kRows]
  int* pos_s = reinterpret_cast<int*>(alpha_s + kRows);  // [kRows]

  const AttentionTile tile = args.tiles[blockIdx.x];
  const int kv_head = blockIdx.y;
  const int split = blockIdx.z;
  const int group = args.num_heads / args.num_kv_heads;
  const int rows = tile.num_tokens * tile.num_heads;
  const int64_t kv_dim = int64_t{args.num_kv_heads} * d_size;
  const int32_t* block_table = args.block_tables + args.block_table_offsets[tile.sequence];

  const int32_t first_position = args.positions[tile.token_begin];
  const int32_t last_position = args.positions[tile.token_begin + tile.num_tokens - 1];
  int32_t begin = args.sliding_window > 0 ? max(0, first_position - args.sliding_window + 1) : 0;
  int32_t end = last_position + 1;
  begin = max(begin, split * args.keys_per_split);
  end = min(end, (split + 1) * args.keys_per_split);

  // Rows: r -> token tile.token_begin + r / num_heads, head kv_head * group + head_begin + r %
  // num_heads.
  for (int idx = threadIdx.x; idx < rows * d_size; idx += kThreads) {
    const int r = idx / d_size, d = idx % d_size;
    const int64_t token = tile.token_begin + r / tile.num_heads;
    const int head = kv_head * group + tile.head_begin + r % tile.num_heads;
    q_s[r * d_size + d] = args.q[token * args.q_stride + int64_t{head} * d_size + d];
    acc_s[r * d_size + d] = 0.0f;
  }
  for (int r = threadIdx.x; r < kRows; r += kThreads) {
    m_s[r] = -FLT_MAX;
    l_s[r] = 0.0f;
    pos_s[r] = r < rows ? args.positions[tile.token_begin + r / tile.num_heads] : -1;
  }
  __syncthreads();

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int32_t chunk = begin; chunk < end; chunk += kKeys) {
    for (int idx = threadIdx.x; idx < kKeys * d_size; idx += kThreads) {
      const int j = idx / d_size, d = idx % d_size;
      const int32_t p = chunk + j;
      float key = 0.0f, value = 0.0f;
      if (p < end) {
        const int64_t slot =
            int64_t{block_table[p / args.block_size]} * args.block_size + p % args.block_size;
        const int64_t offset = slot * kv_dim + int64_t{kv_head} * d_size + d;
        if (args.bf16_kv) {
          key = LoadWeight(static_cast<const uint16_t*>(args.key_pool), offset);
          value = LoadWeight(static_cast<const uint16_t*>(args.value_pool), offset);
        } else {
          key = LoadWeight(static_cast<const float*>(args.key_pool), offset);
          value = LoadWeight(static_cast<const float*>(args.value_pool), offset);
        }
      }
      k_s[j * (d_size + 1) + d] = key;
      v_s[j * d_size + d] = value;
    }
    __syncthreads();
    // Scores and online softmax: a warp per row, a lane per key.
    for (int r = warp; r < rows; r += kWarps) {
      const int32_t p = chunk + lane;
      const int32_t position = pos_s[r];
      const int32_t lowest =
          args.sliding_window > 0 ? position - args.sliding_window + 1 : INT32_MIN;
      const bool valid = p < end && p <= position && p >= lowest;
      float score = -FLT_MAX;
      if (valid) {
        float dot = 0.0f;
        const float* q_row = q_s + r * d_size;
        const float* k_row = k_s + lane * (d_size + 1);
        for (int d = 0; d < d_size; ++d) dot = fmaf(q_row[d], k_row[d], dot);
        score = dot * args.scale;
      }
      const float chunk_max = WarpMax(valid ? score : -FLT_MAX);
      const float old_max = m_s[r];
      const float new_max = fmaxf(old_max, chunk_max);
      const bool any = __any_sync(0xffffffffu, valid);
      const float probability = valid ? expf(score - new_max) : 0.0f;
      const float chunk_sum = WarpSum(probability);
      p_s[r * kKeys + lane] = probability;
      __syncwarp();  // every lane has read m_s[r] before lane 0 writes it
      if (lane == 0) {
        const float alpha =
            any && old_max != -FLT_MAX ? expf(old_max - new_max) : (any ? 0.0f : 1.0f);
        alpha_s[r] = alpha;
        l_s[r] = l_s[r] * alpha + chunk_sum;
        if (any) m_s[r] = new_max;
      }
    }
    __syncthreads();
    for (int idx = threadIdx.x; idx < rows * d_size; idx += kThreads) {
      const int r = idx / d_size, d = idx % d_size;
      float acc = acc_s[idx] * alpha_s[r];
      const float* p_row = p_s + r * kKeys;
#pragma unroll 8
      for (int j = 0; j < kKeys; ++j) acc = fmaf(p_row[j], v_s[j * d_size + d], acc);
      acc_s[idx] = acc;
    }
    __syncthreads();
  }

  // Partial: [split][token][head][D + 2] = (acc[D], max, sum).
  for (int idx = threadIdx.x; idx < rows * (d_size + 2); idx += kThreads) {
    const int r = idx / (d_size + 2), d = idx % (d_size + 2);
    const int64_t token = tile.token_begin + r / tile.num_heads;
    const int head = kv_head * group + tile.head_begin + r % tile.num_heads;
    float value;
    if (d < d_size) {
      value = acc_s[r * d_size + d];
    } else if (d == d_size) {
      value = l_s[r] > 0.0f ? m_s[r] : -FLT_MAX;
    } else {
      value = l_s[r];
    }
    args.partial[((split * args.tokens + token) * args.num_heads + head) * (d_size + 2) + d] =
        value;
  }
}

// out[token, head] = sum_s e^(m_s - M) acc_s / sum_s e^(m_s - M) l_s. One block per (token, head).
__global__ void AttentionCombineKernel(const AttentionArgs args) {
  const int64_t token = blockIdx.x;
  const int head = blockIdx.y;
  const int d_size = args.head_dim;
  const int64_t split_stride = args.tokens * args.num_heads * (d_size + 2);
  const float* base = args.partial + (token * args.num_heads + head) * (d_size + 2);
  float max_all = -FLT_MAX;
  for (int s = 0; s < args.splits; ++s) max_all = fmaxf(max_all, base[s * split_stride + d_size]);
  float total = 0.0f;
  for (int s = 0; s < args.splits; ++s) {
    const float* part = base + s * split_stride;
    if (part[d_size + 1] > 0.0f) total += expf(part[d_size] - max_all) * part[d_size + 1];
  }
  for (int d = threadIdx.x; d < d_size; d += blockDim.x) {
    float acc = 0.0f;
    for (int s = 0; s < args.splits; ++s) {
      const float* part = base + s * split_stride;
      if (part[d_size + 1] > 0.0f) acc += expf(part[d_size] - max_all) * part[d];
    }
    args.out[token * args.out_stride + int64_t{head} * d_size + d] =
        total > 0.0f ? acc / total : 0.0f;
  }
}

}  // namespace

size_t AttentionSharedBytes(int32_t head_dim) {
  return sizeof(float) * (kRows * head_dim + kKeys * (head_dim + 1) + kKeys * head_dim +
                          kRows * kKeys + kRows * head_dim + 4 * kRows);
}

cudaError_t ConfigureAttention(int32_t head_dim) {
  return cudaFuncSetAttribute(PagedAttentionKernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                              static_cast<int>(AttentionSharedBytes(head_dim)));
}

cudaError_t LaunchPagedAttention(const AttentionArgs& args, cudaStream_t stream) {
  if (args.num_tiles == 0 || args.tokens == 0) return cudaSuccess;
  const dim3 grid(args.num_tiles, args.num_kv_heads, args.splits);
  PagedAttentionKernel<<<grid, kThreads, AttentionSharedBytes(args.head_dim), stream>>>(args);
  cudaError_t error = cudaGetLastError();
  if (error != cudaSuccess) return error;
  const dim3 combine_grid(static_cast<unsigned int>(args.tokens), args.num_heads);
  AttentionCombineKernel<<<combine_grid, std::min(128, std::max(32, args.head_dim)), 0, stream>>>(
      args);
  return cudaGetLastError();
}

}  // namespace moe::cuda
