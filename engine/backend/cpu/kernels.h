// SIMD kernels of the CPU backend (Google Highway, dispatched at run time to the best
// instruction set the machine has: AVX-512, AVX2, SSE4 or scalar).
#pragma once

#include <cstdint>
#include <cstdlib>
#include <memory>

#include "absl/status/statusor.h"
#include "engine/model/dtype.h"

namespace moe::cpu {

// A weight matrix [rows, in] laid out for the matmul kernels: rows in blocks of kBlockRows,
// each block's rows interleaved in chunks of kChunk along k, so that a tile of 4 rows is one
// sequential stream. (A tile over the checkpoint's row-major layout reads 4 streams 2-6 KiB
// apart, and reached about half the read bandwidth of one stream; a single-row stream needs
// 4x the horizontal sums.) Zero padded: [ceil(rows / 4), ceil(in / 32), 4, 32] of BF16 or F32.
class PackedMatrix {
 public:
  static constexpr int64_t kBlockRows = 4;
  static constexpr int64_t kChunk = 32;  // k per chunk: one AVX-512 vector of bf16

  // weights: [rows, in] row-major, BF16, F16 or F32; F16 is widened to F32 (exactly).
  static absl::StatusOr<PackedMatrix> Pack(const void* weights, DType type, int64_t rows,
                                           int64_t in);

  PackedMatrix() = default;
  DType type() const { return type_; }  // kBF16 or kF32
  int64_t rows() const { return rows_; }
  int64_t in() const { return in_; }
  int64_t blocks() const { return (rows_ + kBlockRows - 1) / kBlockRows; }
  int64_t chunks() const { return (in_ + kChunk - 1) / kChunk; }
  // Elements of one block: [chunks, 4, 32].
  int64_t block_elements() const { return chunks() * kBlockRows * kChunk; }
  size_t bytes() const { return blocks() * block_elements() * DTypeSize(type_); }
  const void* data() const { return data_.get(); }

 private:
  struct Free {
    void operator()(void* p) const { std::free(p); }
  };
  std::unique_ptr<void, Free> data_;  // 64-byte aligned
  DType type_ = DType::kF32;
  int64_t rows_ = 0, in_ = 0;
};

// out[t * out_stride + r] = dot(x[t * x_stride ...], weight row r) for t in [0, tokens),
// r in [row_begin, row_end) (any range; threads split the rows). fp32 accumulation; each
// weight block is read once per 4 tokens. Every (row, token) output is the same computation
// whatever the tile, the batch or the row range, so a token's result never depends on them.
void MatMulRows(const float* x, int64_t x_stride, int64_t tokens, const PackedMatrix& weight,
                int64_t row_begin, int64_t row_end, float* out, int64_t out_stride);

float DotF32(const float* a, const float* b, int64_t n);
// y += alpha * x
void AxpyF32(float alpha, const float* x, float* y, int64_t n);
// Grouped-query attention over a paged KV cache, for `heads` query heads that share one key /
// value head: q [heads, dim]; rows[p] is the element offset in keys (values) of the p-th of n
// key (value) vectors of length dim. Each cached vector is read once for all the heads.
// scores[h * n + p] = DotF32(q + h * dim, keys + rows[p], dim), bit for bit.
void DotRows(const float* q, int64_t heads, const float* keys, const int64_t* rows, int64_t n,
             int64_t dim, float* scores);
// out[h * dim + d] = sum over p in order of weights[h * n + p] * (values + rows[p])[d]: the same
// bits as AxpyF32 into a zeroed row once per position, with the accumulators in registers.
void WeightedSumRows(const float* weights, int64_t heads, const float* values, const int64_t* rows,
                     int64_t n, int64_t dim, float* out);
// The same two for a bf16 KV cache: bit for bit the float overloads on the rows widened to
// float32 (bf16 -> float32 is exact).
void DotRows(const float* q, int64_t heads, const uint16_t* keys, const int64_t* rows, int64_t n,
             int64_t dim, float* scores);
void WeightedSumRows(const float* weights, int64_t heads, const uint16_t* values,
                     const int64_t* rows, int64_t n, int64_t dim, float* out);
// x = softmax(x * scale) in place (max subtracted; vectorised exp, within 2 ulp of std::exp).
void ScaledSoftmax(float* x, int64_t n, float scale);
// out[i] = silu(gate[i]) * up[i] (SwiGLU), vectorised exp (within 2 ulp of std::exp); out may
// alias gate. Each element's value depends only on its inputs.
void SiluMul(const float* gate, const float* up, float* out, int64_t n);

// ---- bf16 activations (an opt-in, lower-precision path; kernels_bf16.cc) ----------------
// Whether this CPU has AVX512-BF16 dot products (vdpbf16ps); MatMulRowsBf16 is usable only
// then (FloatToBf16Rows always).
bool HasBf16DotProduct();
// As MatMulRows for BF16 weights, with x already rounded to bf16 ([tokens, x_stride]): pairs
// of products summed by vdpbf16ps into fp32 accumulators. Batch-invariant as MatMulRows.
void MatMulRowsBf16(const uint16_t* x, int64_t x_stride, int64_t tokens, const PackedMatrix& weight,
                    int64_t row_begin, int64_t row_end, float* out, int64_t out_stride);
// out[r][c] = bf16(x[r][c]), round to nearest even. x: [rows, x_stride], out: [rows, out_stride]
void FloatToBf16Rows(const float* x, int64_t x_stride, int64_t rows, int64_t cols, uint16_t* out,
                     int64_t out_stride);

// Name of the instruction set the dispatcher picked, e.g. "AVX3".
const char* SelectedTarget();

}  // namespace moe::cpu
