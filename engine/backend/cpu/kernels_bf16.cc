// AVX512-BF16 kernels (vdpbf16ps): bf16 weights x bf16 activations, fp32 accumulation.
// Compiled with per-function target attributes and entered only after a run-time CPUID check,
// so the rest of the build stays generic. Highway 1.0.3 has no wrapper for vdpbf16ps.
#include <algorithm>
#include <cstdint>
#include <cstring>

#include "engine/backend/cpu/kernels.h"
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

// A tile of kRows weight rows x kTokens tokens; every (row, token) pair has its own
// accumulator over k in the same order, so a token's result never depends on the tile.
// kPrefetchRows > 0: prefetch the weights that many rows ahead (one line per row per step).
template <int kRows, int kTokens, int kPrefetchRows = 0>
MOE_BF16_INLINE void Tile(const uint16_t* x, int64_t x_stride, const uint16_t* w, int64_t in,
                          float* out, int64_t out_stride) {
  __m512 acc[kRows][kTokens];
  for (int r = 0; r < kRows; ++r) {
    for (int t = 0; t < kTokens; ++t) acc[r][t] = _mm512_setzero_ps();
  }
  int64_t k = 0;
  for (; k + 32 <= in; k += 32) {
    __m512bh xv[kTokens];
    for (int t = 0; t < kTokens; ++t) {
      xv[t] = reinterpret_cast<__m512bh>(_mm512_loadu_si512(x + t * x_stride + k));
    }
    if constexpr (kPrefetchRows > 0) {
      for (int r = 0; r < kRows; ++r) {
        _mm_prefetch(reinterpret_cast<const char*>(w + (r + kPrefetchRows) * in + k), _MM_HINT_T0);
      }
    }
    for (int r = 0; r < kRows; ++r) {
      const __m512bh wv = reinterpret_cast<__m512bh>(_mm512_loadu_si512(w + r * in + k));
      for (int t = 0; t < kTokens; ++t) acc[r][t] = _mm512_dpbf16_ps(acc[r][t], wv, xv[t]);
    }
  }
  if (k < in) {  // tail: zero-filled masked loads
    const int64_t n = in - k;
    __m512bh xv[kTokens];
    for (int t = 0; t < kTokens; ++t) xv[t] = LoadBf16(x + t * x_stride + k, n);
    for (int r = 0; r < kRows; ++r) {
      const __m512bh wv = LoadBf16(w + r * in + k, n);
      for (int t = 0; t < kTokens; ++t) acc[r][t] = _mm512_dpbf16_ps(acc[r][t], wv, xv[t]);
    }
  }
  if constexpr (kRows == 4 && kTokens == 4) {
    StoreSums4x4Avx512(acc, out, out_stride);
  } else {
    for (int r = 0; r < kRows; ++r) {
      for (int t = 0; t < kTokens; ++t) out[t * out_stride + r] = _mm512_reduce_add_ps(acc[r][t]);
    }
  }
}

template <int kRows, int kPrefetchRows = 0>
MOE_BF16_INLINE void RowsAllTokens(const uint16_t* x, int64_t x_stride, int64_t tokens,
                                   const uint16_t* w, int64_t in, float* out, int64_t out_stride) {
  int64_t t = 0;
  for (; t + 4 <= tokens; t += 4) {
    if (t == 0) {  // only the first token tile reads the rows from memory
      Tile<kRows, 4, kPrefetchRows>(x, x_stride, w, in, out, out_stride);
    } else {
      Tile<kRows, 4>(x + t * x_stride, x_stride, w, in, out + t * out_stride, out_stride);
    }
  }
  const uint16_t* xt = x + t * x_stride;
  float* ot = out + t * out_stride;
  switch (tokens - t) {
    case 3:
      Tile<kRows, 3, kPrefetchRows>(xt, x_stride, w, in, ot, out_stride);
      break;
    case 2:
      Tile<kRows, 2, kPrefetchRows>(xt, x_stride, w, in, ot, out_stride);
      break;
    case 1:
      Tile<kRows, 1, kPrefetchRows>(xt, x_stride, w, in, ot, out_stride);
      break;
    default:
      break;
  }
}

MOE_BF16_TARGET void MatMulRowsBf16Impl(const uint16_t* x, int64_t x_stride, int64_t tokens,
                                        const uint16_t* weight, int64_t in, int64_t row_begin,
                                        int64_t row_end, float* out, int64_t out_stride) {
  // Same blocking as the fp32 kernel: a token block of x (~256 KiB of bf16) stays in L2
  // while blocks of 32 rows sweep over it.
  const int64_t x_row_bytes = in * static_cast<int64_t>(sizeof(uint16_t));
  const int64_t token_block = std::max<int64_t>(4, (int64_t{256} << 10) / x_row_bytes / 4 * 4);
  const int64_t row_block = tokens < 4 ? row_end - row_begin : 32;
  for (int64_t t0 = 0; t0 < tokens; t0 += token_block) {
    const int64_t t1 = std::min(tokens, t0 + token_block);
    const uint16_t* xb = x + t0 * x_stride;
    float* ob = out + t0 * out_stride;
    for (int64_t r0 = row_begin; r0 < row_end; r0 += row_block) {
      const int64_t r1 = std::min(row_end, r0 + row_block);
      int64_t r = r0;
      if (t1 - t0 < 4) {
        // Decode: one row at a time, one sequential stream (as in the fp32 kernel).
        for (; r + 1 + 8 <= r1; ++r) {
          RowsAllTokens<1, 8>(xb, x_stride, t1 - t0, weight + r * in, in, ob + r, out_stride);
        }
      }
      if (t0 == 0) {  // first sweep over these rows: from memory, prefetched
        for (; r + 4 <= r1 && r + 4 + 8 <= row_end; r += 4) {
          RowsAllTokens<4, 8>(xb, x_stride, t1 - t0, weight + r * in, in, ob + r, out_stride);
        }
      }
      for (; r + 4 <= r1; r += 4) {
        RowsAllTokens<4>(xb, x_stride, t1 - t0, weight + r * in, in, ob + r, out_stride);
      }
      for (; r < r1; ++r) {
        RowsAllTokens<1>(xb, x_stride, t1 - t0, weight + r * in, in, ob + r, out_stride);
      }
    }
  }
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

void MatMulRowsBf16(const uint16_t* x, int64_t x_stride, int64_t tokens, const uint16_t* weight,
                    int64_t in, int64_t row_begin, int64_t row_end, float* out,
                    int64_t out_stride) {
  MatMulRowsBf16Impl(x, x_stride, tokens, weight, in, row_begin, row_end, out, out_stride);
}

void FloatToBf16Rows(const float* x, int64_t x_stride, int64_t rows, int64_t cols, uint16_t* out,
                     int64_t out_stride) {
  for (int64_t r = 0; r < rows; ++r) FloatToBf16Impl(x + r * x_stride, out + r * out_stride, cols);
}

#else  // !MOE_HAVE_BF16_KERNELS

bool HasBf16DotProduct() { return false; }

void MatMulRowsBf16(const uint16_t*, int64_t, int64_t, const uint16_t*, int64_t, int64_t, int64_t,
                    float*, int64_t) {}

void FloatToBf16Rows(const float* x, int64_t x_stride, int64_t rows, int64_t cols, uint16_t* out,
                     int64_t out_stride) {
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < cols; ++c) out[r * out_stride + c] = FloatToBf16(x[r * x_stride + c]);
  }
}

#endif  // MOE_HAVE_BF16_KERNELS

}  // namespace moe::cpu
