// SIMD kernels of the CPU backend (Google Highway, dispatched at run time to the best
// instruction set the machine has: AVX-512, AVX2, SSE4 or scalar).
#pragma once

#include <cstdint>

#include "engine/model/dtype.h"

namespace moe::cpu {

// out[t * out_stride + r] = dot(x[t * x_stride ...], weight row r) for t in [0, tokens),
// r in [row_begin, row_end). weight: [rows, in] of BF16 or F32 (fp32 accumulation).
// Each weight row is read once per 4 tokens.
void MatMulRows(const float* x, int64_t x_stride, int64_t tokens, const void* weight,
                DType weight_type, int64_t in, int64_t row_begin, int64_t row_end, float* out,
                int64_t out_stride);

float DotF32(const float* a, const float* b, int64_t n);
// y += alpha * x
void AxpyF32(float alpha, const float* x, float* y, int64_t n);

// ---- bf16 activations (an opt-in, lower-precision path; kernels_bf16.cc) ----------------
// Whether this CPU has AVX512-BF16 dot products (vdpbf16ps); the two functions below are
// usable only then (FloatToBf16Rows always).
bool HasBf16DotProduct();
// As MatMulRows for bf16 weights, with x already rounded to bf16 ([tokens, x_stride]): pairs
// of products summed by vdpbf16ps into fp32 accumulators. Each (row, token) output is the
// same computation whatever the batch, as in MatMulRows.
void MatMulRowsBf16(const uint16_t* x, int64_t x_stride, int64_t tokens, const uint16_t* weight,
                    int64_t in, int64_t row_begin, int64_t row_end, float* out, int64_t out_stride);
// out[r][c] = bf16(x[r][c]), round to nearest even. x: [rows, x_stride], out: [rows, out_stride]
void FloatToBf16Rows(const float* x, int64_t x_stride, int64_t rows, int64_t cols, uint16_t* out,
                     int64_t out_stride);

// Name of the instruction set the dispatcher picked, e.g. "AVX3".
const char* SelectedTarget();

}  // namespace moe::cpu
