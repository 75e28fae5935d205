// AVX512-BF16 kernels (vdpbf16ps): bf16 weights x bf16 activations, fp32 accumulation.
// Compiled with per-function target attributes and entered only after a run-time CPUID check,
// so the rest of the build stays generic. Highway 1.0.3 has no wrapper for vdpbf16ps.
#include <algorithm>
#include <cstdint>
#include <cstring>

#include "engine/backend/cpu/kernels.h"
#include "engine/backend/cpu/packed_sweep.h"
#include "engine/backend/cpu/sums_4x4_avx512.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11
#define MOE_HAVE_BF16_KERNELS 1
#include <immintrin.h>
#endif

namespace moe::cpu {

#if MOE_HAVE_BF16_KERNELS

#define MOE_BF16_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))
#define MOE_BF16_INLINE MOE_BF16_TARGET inline __attribute__((always_inline))

namespace {

// 32 bf16 values of p[0, n) (zero past n).
MOE_BF16_INLINE __m512bh LoadBf16(const uint16_t* p, int64_t n) {
  if (n >= 32) return reinterpret_cast<__m512bh>(_mm512_loadu_si512(p));
  const __mmask32 mask = static_cast<__mmask32>((uint64_t{1} << n) - 1);
  return reinterpret_cast<__m512bh>(_mm512_maskz_loadu_epi16(mask, p));
}

constexpr int64_t kRows = PackedMatrix::kBlockRows;
constexpr int64_t kChunk = PackedMatrix::kChunk;  // one vector of bf16

// Chunks [c0, c1) of a packed block (4 rows) through the accumulators of kTokens tokens
// (io: acc[row][token]; every pair sums its products in k order). Pass `pass` of the plan:
// prefetches its share of the stream ahead.
template <int kTokens>
MOE_BF16_INLINE void TileChunks(const uint16_t* x, int64_t x_stride, int64_t in,
                                const uint16_t* block, const BlockPlan& plan, int64_t pass,
                                int64_t c0, int64_t c1, __m512 (&io)[kRows][kTokens]) {
  __m512 acc[kRows][kTokens];  // a local copy, so that the loop keeps it in registers
  for (int r = 0; r < kRows; ++r) {
    for (int t = 0; t < kTokens; ++t) acc[r][t] = io[r][t];
  }
  int64_t countdown = plan.PrefetchCountdown(pass, c0);
  auto step = [&](const __m512bh(&xv)[kTokens], int64_t c) MOE_BF16_TARGET {
    const uint16_t* w = block + c * kRows * kChunk;
    if (countdown-- == 0) {
      countdown = plan.passes - 1;
      const char* ahead = reinterpret_cast<const char*>(w) + plan.lead_bytes;
      for (int64_t b = 0; b < kRows * kChunk * 2; b += 64) PrefetchToL2(ahead + b);
    }
    for (int r = 0; r < kRows; ++r) {
      const __m512bh wv = reinterpret_cast<__m512bh>(_mm512_load_si512(w + r * kChunk));
      for (int t = 0; t < kTokens; ++t) acc[r][t] = _mm512_dpbf16_ps(acc[r][t], wv, xv[t]);
    }
  };
  // Whole chunks, then the masked tail (a masked load inside the loop would make GCC store
  // the accumulators to memory on every step).
  const int64_t whole_end = std::min(c1, in / kChunk);
  int64_t c = c0;
  for (; c < whole_end; ++c) {
    __m512bh xv[kTokens];
    for (int t = 0; t < kTokens; ++t) {
      xv[t] = reinterpret_cast<__m512bh>(_mm512_loadu_si512(x + t * x_stride + c * kChunk));
    }
    step(xv, c);
  }
  if (c < c1) {
    // Past `in`: x masked to zero here, the packed weights are zero.
    __m512bh xv[kTokens];
    for (int t = 0; t < kTokens; ++t) {
      xv[t] = LoadBf16(x + t * x_stride + c * kChunk, in - c * kChunk);
    }
    step(xv, c);
  }
  for (int r = 0; r < kRows; ++r) {
    for (int t = 0; t < kTokens; ++t) io[r][t] = acc[r][t];
  }
}

// out[t * out_stride + r] = the sum of acc[r][t], for the rows [row_lo, row_hi) of the block.
template <int kTokens>
MOE_BF16_INLINE void StoreTile(const __m512 (&acc)[kRows][kTokens], float* out, int64_t out_stride,
                               int64_t row_lo, int64_t row_hi) {
  if constexpr (kTokens == 4) {
    if (row_lo == 0 && row_hi == kRows) {
      StoreSums4x4Avx512(acc, out, out_stride);
      return;
    }
  }
  // All sums first, with constant indices into acc (a variable one would keep the tile in
  // memory, not registers).
  float sums[kRows][kTokens];
  for (int r = 0; r < kRows; ++r) {
    for (int t = 0; t < kTokens; ++t) sums[r][t] = _mm512_reduce_add_ps(acc[r][t]);
  }
  for (int64_t r = row_lo; r < row_hi; ++r) {
    for (int t = 0; t < kTokens; ++t) out[t * out_stride + r] = sums[r][t];
  }
}

// All tokens through one block, as BlockPlan says.
MOE_BF16_INLINE void BlockAllTokens(const uint16_t* x, int64_t x_stride, int64_t tokens, int64_t in,
                                    const uint16_t* block, float* out, int64_t out_stride,
                                    int64_t row_lo, int64_t row_hi) {
  const BlockPlan plan(tokens, (in + kChunk - 1) / kChunk);
  RunBlock(plan, tokens, _mm512_setzero_ps(),
           [&]<int kTokens>(int64_t t, int64_t pass, int64_t c0, int64_t c1,
                            __m512(&acc)[kRows][kTokens]) MOE_BF16_TARGET {
             TileChunks<kTokens>(x + t * x_stride, x_stride, in, block, plan, pass, c0, c1, acc);
             if (c1 == plan.chunks) {
               StoreTile<kTokens>(acc, out + t * out_stride, out_stride, row_lo, row_hi);
             }
           });
}

MOE_BF16_TARGET __attribute__((flatten)) void MatMulRowsBf16Impl(const uint16_t* x,
                                                                 int64_t x_stride, int64_t tokens,
                                                                 const PackedMatrix& weight,
                                                                 int64_t row_begin, int64_t row_end,
                                                                 float* out, int64_t out_stride) {
  const auto* packed = static_cast<const uint16_t*>(weight.data());
  const int64_t in = weight.in(), block_elements = weight.block_elements();
  SweepPackedBlocks(
      tokens, in, row_begin, row_end,
      [&](int64_t t0, int64_t t1, int64_t b, int64_t row_lo, int64_t row_hi) MOE_BF16_TARGET {
        BlockAllTokens(x + t0 * x_stride, x_stride, t1 - t0, in, packed + b * block_elements,
                       out + t0 * out_stride + b * kRows, out_stride, row_lo, row_hi);
      });
}

MOE_BF16_TARGET void FloatToBf16Impl(const float* x, uint16_t* out, int64_t n) {
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    // vcvtne2ps2bf16: round to nearest even; the second operand fills the low half.
    const __m512bh packed =
        _mm512_cvtne2ps_pbh(_mm512_loadu_ps(x + i + 16), _mm512_loadu_ps(x + i));
    _mm512_storeu_si512(out + i, reinterpret_cast<__m512i>(packed));
  }
  for (; i < n; ++i) out[i] = FloatToBf16(x[i]);
}

}  // namespace

bool HasBf16DotProduct() {
  static const bool has = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl");
  }();
  return has;
}

void MatMulRowsBf16(const uint16_t* x, int64_t x_stride, int64_t tokens, const PackedMatrix& weight,
                    int64_t row_begin, int64_t row_end, float* out, int64_t out_stride) {
  MatMulRowsBf16Impl(x, x_stride, tokens, weight, row_begin, row_end, out, out_stride);
}

void FloatToBf16Rows(const float* x, int64_t x_stride, int64_t rows, int64_t cols, uint16_t* out,
                     int64_t out_stride) {
  for (int64_t r = 0; r < rows; ++r) FloatToBf16Impl(x + r * x_stride, out + r * out_stride, cols);
}

#else  // !MOE_HAVE_BF16_KERNELS

bool HasBf16DotProduct() { return false; }

void MatMulRowsBf16(const uint16_t*, int64_t, int64_t, const PackedMatrix&, int64_t, int64_t,
                    float*, int64_t) {}

void FloatToBf16Rows(const float* x, int64_t x_stride, int64_t rows, int64_t cols, uint16_t* out,
                     int64_t out_stride) {
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < cols; ++c) out[r * out_stride + c] = FloatToBf16(x[r * x_stride + c]);
  }
}

#endif  // MOE_HAVE_BF16_KERNELS

}  // namespace moe::cpu
