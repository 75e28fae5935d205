// Launchers of the CUDA backend's kernels. Plain C++ (no Abseil) so that the .cu files stay
// quick to compile; every launcher enqueues on `stream` and returns cudaGetLastError().
//
// Conventions: activations are float32 row-major with a row stride in elements; weights are
// bf16 (uint16_t bits) or float32, row-major [out_features, in_features]; 1-D weights (norms,
// biases) are always float32 on the device.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace moe::cuda {

enum class WeightType : int { kBF16 = 0, kF32 = 1 };

// ---- elementwise.cu -----------------------------------------------------------------------------

// out[t] = table[ids[t]]; table: [vocab, hidden]
cudaError_t LaunchEmbed(const int32_t* ids, int64_t rows, const void* table, WeightType type,
                        int64_t hidden, float* out, int64_t out_stride, cudaStream_t stream);
// out[r] = x[r] / sqrt(mean(x[r]^2) + eps) * weight; in place allowed. weight: f32 [cols]
cudaError_t LaunchRmsNorm(const float* x, int64_t x_stride, int64_t rows, int64_t cols,
                          const float* weight, float eps, float* out, int64_t out_stride,
                          cudaStream_t stream);
// Rotate-half RoPE in place on x [rows, heads * head_dim] at positions[rows];
// inv_freq: f32 [head_dim / 2].
cudaError_t LaunchRope(float* x, int64_t stride, int64_t rows, int32_t heads, int32_t head_dim,
                       const int32_t* positions, const float* inv_freq, cudaStream_t stream);
// pool[slots[t]] = k[t], v[t]; pools: [slots, kv_dim]
// Pools of float, or of bf16 bits (bf16_pools: each value rounded to nearest even).
cudaError_t LaunchWriteKv(const float* k, int64_t k_stride, const float* v, int64_t v_stride,
                          int64_t rows, int64_t kv_dim, const int32_t* slots, void* key_pool,
                          void* value_pool, bool bf16_pools, cudaStream_t stream);
cudaError_t LaunchClamp(float* x, int64_t stride, int64_t rows, int64_t cols, float limit,
                        cudaStream_t stream);
cudaError_t LaunchFill(float* x, int64_t stride, int64_t rows, int64_t cols, float value,
                       cudaStream_t stream);
// residual += x
cudaError_t LaunchAdd(float* residual, int64_t residual_stride, const float* x, int64_t x_stride,
                      int64_t rows, int64_t cols, cudaStream_t stream);
// out[r] += bias
cudaError_t LaunchAddBias(float* out, int64_t stride, int64_t rows, int64_t cols, const float* bias,
                          cudaStream_t stream);
// out[t] += sigmoid(x[t] . gate) * shared[t]; gate: [cols] of `type`
cudaError_t LaunchAddGated(const float* x, int64_t x_stride, const void* gate, WeightType type,
                           const float* shared, int64_t shared_stride, float* out,
                           int64_t out_stride, int64_t rows, int64_t cols, cudaStream_t stream);
// out[i] = x[rows[i]]
cudaError_t LaunchGatherRows(const float* x, int64_t x_stride, const int32_t* rows,
                             int64_t num_rows, int64_t cols, float* out, int64_t out_stride,
                             cudaStream_t stream);
// out[r] = the lowest index of the largest value of x[r] (a NaN wins only in column 0), as
// ArgMax in engine/common/argmax.h. cols < 2^31.
cudaError_t LaunchRowArgMax(const float* x, int64_t stride, int64_t rows, int64_t cols,
                            int32_t* out, cudaStream_t stream);
// gate = silu(gate) * up, in place on gate. Both [rows, cols].
cudaError_t LaunchSiluMul(float* gate, int64_t gate_stride, const float* up, int64_t up_stride,
                          int64_t rows, int64_t cols, cudaStream_t stream);
// hi = bf16(x), lo = bf16(x - hi) (round to nearest even), dense [rows, cols]; lo may be null.
// x = hi + lo + e with |e| <= 2^-17 |x| (normal range).
cudaError_t LaunchSplitBf16(const float* x, int64_t x_stride, int64_t rows, int64_t cols,
                            uint16_t* hi, uint16_t* lo, cudaStream_t stream);
// Router over logits [rows, experts]: softmax, top-k (ties to the lower id), optional
// renormalisation. stats [experts + 1] doubles: += probability per expert, and at [experts]
// += logsumexp(logits)^2 per token (atomics; order of summation unspecified).
cudaError_t LaunchRoute(const float* logits, int64_t rows, int32_t experts, int32_t top_k,
                        bool normalize, int32_t* ids, float* weights, double* stats,
                        cudaStream_t stream);

// ---- gemv.cu: weight-streaming matrix products for few rows
// ---------------------------------------

// out[row, n] = sum_k x[in_row(row), k] * W_g[n, k] (+ bias[n])            (gate_up == false)
// out[row, n] = silu(x . W_g[n]) * (x . W_u[n])                              (gate_up == true)
// for the rows of every group g (rows [offsets[e], offsets[e+1]) of expert e = touched[g]), with
// W_g = w_gate + e * expert_stride. Without groups (offsets == nullptr), one group of `rows` rows
// and expert 0. in_row(row) = row_map ? row_map[row] : row. Each weight is read once per chunk of
// up to 8 rows of a group: the decode path.
struct GroupedGemvArgs {
  const float* x = nullptr;
  int64_t x_stride = 0;
  const int32_t* row_map = nullptr;
  const int32_t* offsets = nullptr;      // [experts + 1] (device)
  const int32_t* touched = nullptr;      // [max_groups] expert of each group (device)
  const int32_t* num_touched = nullptr;  // [1] (device)
  int32_t max_groups = 1;
  int32_t max_group_rows = 0;  // upper bound of any group's rows when known (1: decode), else 0
  int64_t rows = 0;            // without groups
  const void* w_gate = nullptr;
  const void* w_up = nullptr;
  int64_t expert_stride = 0;  // elements between experts' matrices
  WeightType type = WeightType::kBF16;
  const float* bias = nullptr;  // [n] f32 (not with gate_up)
  int64_t n = 0;
  int64_t k = 0;
  float* out = nullptr;
  int64_t out_stride = 0;
  bool gate_up = false;
};
cudaError_t LaunchGroupedGemv(const GroupedGemvArgs& args, cudaStream_t stream);

// ---- moe.cu: routing sort, grouped tensor-core GEMM, combine
// -------------------------------------

inline constexpr int kGemmTileRows = 64;  // rows of a grouped-GEMM tile

// Counting sort of the assignments (token t, choice j) -> a = t * top_k + j by expert:
// offsets [experts + 1], row_token [assignments] (grouped row -> token), row_of_assignment
// [assignments], touched [experts] / num_touched [1] (experts with rows, ascending),
// tile_expert / tile_row [assignments / kGemmTileRows + experts] / num_tiles [1] (64-row tiles
// of every touched expert). Ids outside [0, experts) set *error_flag = 1 and are routed to
// expert 0 with their weight unchanged (the step's result is then reported as an error).
struct MoeSortArgs {
  const int32_t* expert_ids = nullptr;  // [assignments]
  int64_t assignments = 0;
  int32_t top_k = 1;
  int32_t experts = 0;
  int32_t* offsets = nullptr;
  int32_t* row_token = nullptr;
  int32_t* row_of_assignment = nullptr;
  int32_t* touched = nullptr;
  int32_t* num_touched = nullptr;
  int32_t* tile_expert = nullptr;
  int32_t* tile_row = nullptr;
  int32_t* num_tiles = nullptr;
  int32_t* error_flag = nullptr;
};
cudaError_t LaunchMoeSort(const MoeSortArgs& args, cudaStream_t stream);

// The grouped bf16 tensor-core GEMM (WMMA m16n16k16, fp32 accumulation) for many rows per
// expert; same semantics as LaunchGroupedGemv with bf16 weights, driven by the tile list of
// LaunchMoeSort (max_tiles = its upper bound). Activations are split on the fly into
// bf16 hi + lo parts (two MMAs per tile) unless `single_pass`, which rounds them to bf16 once.
struct GroupedGemmArgs {
  const float* x = nullptr;
  int64_t x_stride = 0;
  const int32_t* row_map = nullptr;
  const int32_t* offsets = nullptr;
  const int32_t* tile_expert = nullptr;
  const int32_t* tile_row = nullptr;
  const int32_t* num_tiles = nullptr;
  int32_t max_tiles = 0;
  const uint16_t* w_gate = nullptr;
  const uint16_t* w_up = nullptr;
  int64_t expert_stride = 0;
  int64_t n = 0;
  int64_t k = 0;
  float* out = nullptr;
  int64_t out_stride = 0;
  bool gate_up = false;
  bool single_pass = false;
};
cudaError_t LaunchGroupedGemm(const GroupedGemmArgs& args, cudaStream_t stream);

// out[t] += sum_j weights[t, j] * expert_out[row_of_assignment[t * top_k + j]], in choice order.
cudaError_t LaunchMoeCombine(const float* expert_out, int64_t expert_stride,
                             const int32_t* row_of_assignment, const float* weights, int64_t rows,
                             int32_t top_k, int64_t cols, float* out, int64_t out_stride,
                             cudaStream_t stream);

// ---- attention.cu
// ----------------------------------------------------------------------------------

// A piece of work of the paged attention kernel: tokens [token_begin, token_begin + num_tokens)
// of one sequence, and query heads [head_begin, head_begin + num_heads) within each KV head's
// group. rows = num_tokens * num_heads <= kAttentionTileRows.
struct AttentionTile {
  int32_t sequence;
  int32_t token_begin;
  int32_t num_tokens;
  int32_t head_begin;
  int32_t num_heads;
};
inline constexpr int kAttentionTileRows = 32;
inline constexpr int kAttentionMaxHeadDim = 256;

struct AttentionArgs {
  const float* q = nullptr;  // [tokens, heads * head_dim]
  int64_t q_stride = 0;
  float* out = nullptr;
  int64_t out_stride = 0;
  const void* key_pool = nullptr;    // [blocks * block_size, kv_heads * head_dim]
  const void* value_pool = nullptr;  // same
  bool bf16_kv = false;              // pools of bf16 bits, not float
  const AttentionTile* tiles = nullptr;
  int32_t num_tiles = 0;
  const int32_t* positions = nullptr;            // [tokens]
  const int32_t* block_tables = nullptr;         // all sequences' block tables, concatenated
  const int32_t* block_table_offsets = nullptr;  // [sequences]
  int32_t num_heads = 0;
  int32_t num_kv_heads = 0;
  int32_t head_dim = 0;
  int32_t block_size = 0;
  float scale = 1.0f;
  int32_t sliding_window = 0;
  int32_t splits = 1;          // key-range splits (flash-decoding)
  int32_t keys_per_split = 0;  // multiple of the kernel's key chunk
  int64_t tokens = 0;
  float* partial = nullptr;  // [splits, tokens, heads, head_dim + 2] scratch
};
// Bytes of dynamic shared memory the main kernel needs for `head_dim`.
size_t AttentionSharedBytes(int32_t head_dim);
// Raises the kernel's dynamic shared-memory limit (call once per device for the largest
// head_dim in use).
cudaError_t ConfigureAttention(int32_t head_dim);
cudaError_t LaunchPagedAttention(const AttentionArgs& args, cudaStream_t stream);

}  // namespace moe::cuda
