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

// One packed block of 4 rows x kTokens tokens over all of k; every (row, token) pair has its
// own accumulator over k in the same order, so a token's result never depends on the tile.
// Writes the rows [row_lo, row_hi) of the block: out[t * out_stride + r].
template <int kTokens, bool kPrefetch = false>
MOE_BF16_INLINE void Tile(const uint16_t* x, int64_t x_stride, int64_t in, const uint16_t* block,
                          float* out, int64_t out_stride, int64_t row_lo, int64_t row_hi) {
  __m512 acc[kRows][kTokens];
  for (int r = 0; r < kRows; ++r) {
    for (int t = 0; t < kTokens; ++t) acc[r][t] = _mm512_setzero_ps();
  }
  for (int64_t k = 0; k < in; k += kChunk) {
    // Past `in`: x masked to zero here, the packed weights are zero.
    __m512bh xv[kTokens];
    for (int t = 0; t < kTokens; ++t) xv[t] = LoadBf16(x + t * x_stride + k, in - k);
    const uint16_t* w = block + (k / kChunk) * kRows * kChunk;
    if (kPrefetch) {
      const char* ahead = reinterpret_cast<const char*>(w) + kStreamPrefetchBytes;
      for (int64_t b = 0; b < kRows * kChunk * 2; b += 64) _mm_prefetch(ahead + b, _MM_HINT_T0);
    }
    for (int r = 0; r < kRows; ++r) {
      const __m512bh wv = reinterpret_cast<__m512bh>(_mm512_load_si512(w + r * kChunk));
      for (int t = 0; t < kTokens; ++t) acc[r][t] = _mm512_dpbf16_ps(acc[r][t], wv, xv[t]);
    }
  }
  if constexpr (kTokens == 4) {
    if (row_lo == 0 && row_hi == kRows) {
      StoreSums4x4Avx512(acc, out, out_stride);
      return;
    }
  }
  // Constant indices into acc (a variable one would keep the tile in memory, not registers).
  for (int r = 0; r < kRows; ++r) {
    if (r < row_lo || r >= row_hi) continue;
    for (int t = 0; t < kTokens; ++t) out[t * out_stride + r] = _mm512_reduce_add_ps(acc[r][t]);
  }
}

// All tokens through one block: tiles of 4 tokens, then 1-3. The first tile reads the block
// from memory and prefetches the stream kStreamPrefetchBytes ahead; the others find it in L1.
MOE_BF16_INLINE void BlockAllTokens(const uint16_t* x, int64_t x_stride, int64_t tokens, int64_t in,
                                    const uint16_t* block, float* out, int64_t out_stride,
                                    int64_t row_lo, int64_t row_hi) {
  int64_t t = 0;
  for (; t + 4 <= tokens; t += 4) {
    if (t == 0) {
      Tile<4, true>(x, x_stride, in, block, out, out_stride, row_lo, row_hi);
    } else {
      Tile<4>(x + t * x_stride, x_stride, in, block, out + t * out_stride, out_stride, row_lo,
              row_hi);
    }
  }
  const uint16_t* xt = x + t * x_stride;
  float* ot = out + t * out_stride;
  switch (tokens - t) {
    case 3:
      Tile<3, true>(xt, x_stride, in, block, ot, out_stride, row_lo, row_hi);
      break;
    case 2:
      Tile<2, true>(xt, x_stride, in, block, ot, out_stride, row_lo, row_hi);
      break;
    case 1:
      Tile<1, true>(xt, x_stride, in, block, ot, out_stride, row_lo, row_hi);
      break;
    default:
      break;
  }
}

MOE_BF16_TARGET void MatMulRowsBf16Impl(const uint16_t* x, int64_t x_stride, int64_t tokens,
                                        const PackedMatrix& weight, int64_t row_begin,
                                        int64_t row_end, float* out, int64_t out_stride) {
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
