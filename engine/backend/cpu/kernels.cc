// Highway's foreach_target re-includes this file once per instruction set.
#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "engine/backend/cpu/kernels.cc"
#include "hwy/foreach_target.h"  // IWYU pragma: keep
// After foreach_target:
#include <algorithm>

#include "engine/backend/cpu/kernels.h"
#include "engine/backend/cpu/sums_4x4_avx512.h"
#include "hwy/cache_control.h"
#include "hwy/highway.h"

HWY_BEFORE_NAMESPACE();
namespace moe::cpu {
namespace HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

using DF = hn::ScalableTag<float>;

// Loads Lanes(df) weights starting at p as float32.
struct Bf16Weights {
  static HWY_INLINE hn::Vec<DF> Load(DF df, const uint16_t* p) {
    const hn::Rebind<uint16_t, DF> d16;
    const hn::RebindToUnsigned<DF> d32;
    return hn::BitCast(df, hn::ShiftLeft<16>(hn::PromoteTo(d32, hn::LoadU(d16, p))));
  }
};
struct F32Weights {
  static HWY_INLINE hn::Vec<DF> Load(DF df, const float* p) { return hn::LoadU(df, p); }
};

// A tile of kRows weight rows x kTokens tokens: kRows * kTokens accumulators.
#undef MOE_HAVE_SUMS_4X4  // re-decided in each target's pass
#if HWY_TARGET == HWY_AVX3 || HWY_TARGET == HWY_AVX3_DL
#define MOE_HAVE_SUMS_4X4 1
// out[t * out_stride + r] = SumOfLanes(acc[r][t]) for a 4x4 tile, bit for bit (GCC's
// _mm512_reduce_add_ps tree: halves, quarters, pairs, then the last pair; additions are
// commutative, so only the grouping matters), as 15 shuffles + 15 adds for all 16 sums
// instead of ~7 dependent operations each.
HWY_INLINE void StoreSums4x4(const hn::Vec<DF> (&acc)[4][4], float* out, int64_t out_stride) {
  __m512 raw[4][4];
  for (int r = 0; r < 4; ++r) {
    for (int t = 0; t < 4; ++t) raw[r][t] = acc[r][t].raw;
  }
  StoreSums4x4Avx512(raw, out, out_stride);
}
#endif

// kPrefetchRows > 0: prefetch the weights kPrefetchRows rows ahead (the tile after next in
// a decode sweep), keeping more cache-line fills in flight than the hardware prefetcher does.
template <int kRows, int kTokens, class Loader, typename W, int kPrefetchRows = 0>
HWY_INLINE void Tile(const float* x, int64_t x_stride, const W* w, int64_t in, float* out,
                     int64_t out_stride) {
  const DF df;
  const int64_t lanes = static_cast<int64_t>(hn::Lanes(df));
  hn::Vec<DF> acc[kRows][kTokens];
  for (int r = 0; r < kRows; ++r) {
    for (int t = 0; t < kTokens; ++t) acc[r][t] = hn::Zero(df);
  }
  // The tile's rows are one contiguous run of kRows * in weights; the prefetch pointer walks
  // the run kPrefetchRows rows ahead at the same pace, one cache line at a time.
  constexpr size_t kStepBytes = kRows * hn::MaxLanes(df) * sizeof(W);
  const char* prefetch = reinterpret_cast<const char*>(w + kPrefetchRows * in);
  int64_t k = 0;
  for (; k + lanes <= in; k += lanes) {
    if constexpr (kPrefetchRows > 0) {
      for (size_t b = 0; b < kStepBytes; b += 64) hwy::Prefetch(prefetch + b);
      prefetch += kStepBytes;
    }
    hn::Vec<DF> xv[kTokens];
    for (int t = 0; t < kTokens; ++t) xv[t] = hn::LoadU(df, x + t * x_stride + k);
    for (int r = 0; r < kRows; ++r) {
      const hn::Vec<DF> wv = Loader::Load(df, w + r * in + k);
      for (int t = 0; t < kTokens; ++t) acc[r][t] = hn::MulAdd(wv, xv[t], acc[r][t]);
    }
  }
  if (k < in) {
    // Tail: zero-padded copies through the same vector FMAs, so that bf16 and f32 weights
    // holding the same values give bit-identical results (no scalar contraction choices).
    HWY_ALIGN W w_tail[kRows][hn::MaxLanes(df)] = {};
    HWY_ALIGN float x_tail[kTokens][hn::MaxLanes(df)] = {};
    for (int64_t i = k; i < in; ++i) {
      for (int r = 0; r < kRows; ++r) w_tail[r][i - k] = w[r * in + i];
      for (int t = 0; t < kTokens; ++t) x_tail[t][i - k] = x[t * x_stride + i];
    }
    for (int r = 0; r < kRows; ++r) {
      const hn::Vec<DF> wv = Loader::Load(df, w_tail[r]);
      for (int t = 0; t < kTokens; ++t) {
        acc[r][t] = hn::MulAdd(wv, hn::Load(df, x_tail[t]), acc[r][t]);
      }
    }
  }
#if MOE_HAVE_SUMS_4X4
  if constexpr (kRows == 4 && kTokens == 4) {
    StoreSums4x4(acc, out, out_stride);
    return;
  }
#endif
  for (int r = 0; r < kRows; ++r) {
    for (int t = 0; t < kTokens; ++t) {
      out[t * out_stride + r] = hn::GetLane(hn::SumOfLanes(df, acc[r][t]));
    }
  }
}

template <int kRows, class Loader, typename W, int kPrefetchRows = 0>
HWY_INLINE void RowsAllTokens(const float* x, int64_t x_stride, int64_t tokens, const W* w,
                              int64_t in, float* out, int64_t out_stride) {
  // Only the first token tile prefetches: the later ones find the rows in L1/L2.
  int64_t t = 0;
  if (tokens >= 4) {
    Tile<kRows, 4, Loader, W, kPrefetchRows>(x, x_stride, w, in, out, out_stride);
    t = 4;
  }
  for (; t + 4 <= tokens; t += 4) {
    Tile<kRows, 4, Loader, W, 0>(x + t * x_stride, x_stride, w, in, out + t * out_stride,
                                 out_stride);
  }
  const float* xt = x + t * x_stride;
  float* ot = out + t * out_stride;
  switch (tokens - t) {
    case 3:
      Tile<kRows, 3, Loader, W, kPrefetchRows>(xt, x_stride, w, in, ot, out_stride);
      break;
    case 2:
      Tile<kRows, 2, Loader, W, kPrefetchRows>(xt, x_stride, w, in, ot, out_stride);
      break;
    case 1:
      Tile<kRows, 1, Loader, W, kPrefetchRows>(xt, x_stride, w, in, ot, out_stride);
      break;
    default:
      break;
  }
}

// Decode sweep: rows one at a time (a single sequential stream per thread reached 0.8-0.9 of
// the measured read bandwidth, against 0.6-0.7 for 4 or 8 interleaved rows), with software
// prefetch 8 rows (16-45 KiB) ahead. Measured with moe-bench-decode's "decode kernel" line.
constexpr int kDecodeRows = 1;
constexpr int kDecodePrefetchRows = 8;

template <class Loader, typename W>
void MatMulRowsTyped(const float* x, int64_t x_stride, int64_t tokens, const W* weight, int64_t in,
                     int64_t row_begin, int64_t row_end, float* out, int64_t out_stride) {
  // Every (row, token) output is the same dot product whatever tile computes it (lanes along
  // k, one accumulator, SumOfLanes), so the result of a token never depends on the batch.
  if (tokens < 4) {
    // Decode: bound by reading weights; stream the rows in order, prefetching ahead within
    // this thread's range (never past it: the next range belongs to another thread).
    int64_t r = row_begin;
    for (; r + kDecodeRows + kDecodePrefetchRows <= row_end; r += kDecodeRows) {
      RowsAllTokens<kDecodeRows, Loader, W, kDecodePrefetchRows>(
          x, x_stride, tokens, weight + r * in, in, out + r, out_stride);
    }
    for (; r + 4 <= row_end; r += 4) {
      RowsAllTokens<4, Loader>(x, x_stride, tokens, weight + r * in, in, out + r, out_stride);
    }
    for (; r < row_end; ++r) {
      RowsAllTokens<1, Loader>(x, x_stride, tokens, weight + r * in, in, out + r, out_stride);
    }
    return;
  }
  // Batched decode and prefill: bound by FMAs. Tiles of 4 rows x 4 tokens (16 accumulators,
  // each weight vector widened once per 4 tokens, each x vector loaded once per 4 rows).
  // Blocked so that a block of tokens (x: ~512 KiB) stays in L2 while a block of rows is
  // swept over it, and each 4-row tile stays in L1 while it meets every token of the block.
  const int64_t x_row_bytes = in * static_cast<int64_t>(sizeof(float));
  const int64_t token_block = std::max<int64_t>(4, (int64_t{512} << 10) / x_row_bytes / 4 * 4);
  const int64_t row_block = 32;
  for (int64_t t0 = 0; t0 < tokens; t0 += token_block) {
    const int64_t t1 = std::min(tokens, t0 + token_block);
    const float* xb = x + t0 * x_stride;
    float* ob = out + t0 * out_stride;
    for (int64_t r0 = row_begin; r0 < row_end; r0 += row_block) {
      const int64_t r1 = std::min(row_end, r0 + row_block);
      int64_t r = r0;
      if (t0 == 0) {  // first sweep over these rows: from memory, prefetched
        for (; r + 4 <= r1 && r + 4 + kDecodePrefetchRows <= row_end; r += 4) {
          RowsAllTokens<4, Loader, W, kDecodePrefetchRows>(xb, x_stride, t1 - t0, weight + r * in,
                                                           in, ob + r, out_stride);
        }
      }
      for (; r + 4 <= r1; r += 4) {
        RowsAllTokens<4, Loader>(xb, x_stride, t1 - t0, weight + r * in, in, ob + r, out_stride);
      }
      for (; r < r1; ++r) {
        RowsAllTokens<1, Loader>(xb, x_stride, t1 - t0, weight + r * in, in, ob + r, out_stride);
      }
    }
  }
}

void MatMulRowsImpl(const float* x, int64_t x_stride, int64_t tokens, const void* weight,
                    DType weight_type, int64_t in, int64_t row_begin, int64_t row_end, float* out,
                    int64_t out_stride) {
  if (weight_type == DType::kBF16) {
    MatMulRowsTyped<Bf16Weights>(x, x_stride, tokens, static_cast<const uint16_t*>(weight), in,
                                 row_begin, row_end, out, out_stride);
  } else {
    MatMulRowsTyped<F32Weights>(x, x_stride, tokens, static_cast<const float*>(weight), in,
                                row_begin, row_end, out, out_stride);
  }
}

float DotF32Impl(const float* a, const float* b, int64_t n) {
  const DF df;
  const int64_t lanes = static_cast<int64_t>(hn::Lanes(df));
  hn::Vec<DF> acc0 = hn::Zero(df), acc1 = hn::Zero(df);
  int64_t i = 0;
  for (; i + 2 * lanes <= n; i += 2 * lanes) {
    acc0 = hn::MulAdd(hn::LoadU(df, a + i), hn::LoadU(df, b + i), acc0);
    acc1 = hn::MulAdd(hn::LoadU(df, a + i + lanes), hn::LoadU(df, b + i + lanes), acc1);
  }
  for (; i + lanes <= n; i += lanes) {
    acc0 = hn::MulAdd(hn::LoadU(df, a + i), hn::LoadU(df, b + i), acc0);
  }
  float sum = hn::GetLane(hn::SumOfLanes(df, hn::Add(acc0, acc1)));
  for (; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

void AxpyF32Impl(float alpha, const float* x, float* y, int64_t n) {
  const DF df;
  const int64_t lanes = static_cast<int64_t>(hn::Lanes(df));
  const hn::Vec<DF> va = hn::Set(df, alpha);
  int64_t i = 0;
  for (; i + lanes <= n; i += lanes) {
    hn::StoreU(hn::MulAdd(va, hn::LoadU(df, x + i), hn::LoadU(df, y + i)), df, y + i);
  }
  for (; i < n; ++i) y[i] += alpha * x[i];
}

const char* SelectedTargetImpl() { return hwy::TargetName(HWY_TARGET); }

}  // namespace HWY_NAMESPACE
}  // namespace moe::cpu
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace moe::cpu {

HWY_EXPORT(MatMulRowsImpl);
HWY_EXPORT(DotF32Impl);
HWY_EXPORT(AxpyF32Impl);
HWY_EXPORT(SelectedTargetImpl);

void MatMulRows(const float* x, int64_t x_stride, int64_t tokens, const void* weight,
                DType weight_type, int64_t in, int64_t row_begin, int64_t row_end, float* out,
                int64_t out_stride) {
  HWY_DYNAMIC_DISPATCH(MatMulRowsImpl)
  (x, x_stride, tokens, weight, weight_type, in, row_begin, row_end, out, out_stride);
}

float DotF32(const float* a, const float* b, int64_t n) {
  return HWY_DYNAMIC_DISPATCH(DotF32Impl)(a, b, n);
}

void AxpyF32(float alpha, const float* x, float* y, int64_t n) {
  HWY_DYNAMIC_DISPATCH(AxpyF32Impl)(alpha, x, y, n);
}

const char* SelectedTarget() { return HWY_DYNAMIC_DISPATCH(SelectedTargetImpl)(); }

}  // namespace moe::cpu
#endif  // HWY_ONCE
