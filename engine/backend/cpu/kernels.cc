// Highway's foreach_target re-includes this file once per instruction set.
#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "engine/backend/cpu/kernels.cc"
#include "hwy/foreach_target.h"  // IWYU pragma: keep
// After foreach_target:
#include <algorithm>
#include <limits>

#include "engine/backend/cpu/kernels.h"
#include "engine/backend/cpu/packed_sweep.h"
#include "engine/backend/cpu/sums_4x4_avx512.h"
#include "hwy/cache_control.h"
#include "hwy/highway.h"
// After highway.h:
#include "hwy/contrib/math/math-inl.h"

HWY_BEFORE_NAMESPACE();
namespace moe::cpu {
namespace HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

// At most 16 lanes, so that a packed chunk of 32 weights is a whole number of vectors.
using DF = hn::CappedTag<float, 16>;

// Load: Lanes(df) stored values (weights or cached K/V) starting at p, as float32 (bf16 widens
// exactly); Scalar: one of them.
struct Bf16Loader {
  using Type = uint16_t;
  static HWY_INLINE hn::Vec<DF> Load(DF df, const uint16_t* p) {
    const hn::Rebind<uint16_t, DF> d16;
    const hn::RebindToUnsigned<DF> d32;
    return hn::BitCast(df, hn::ShiftLeft<16>(hn::PromoteTo(d32, hn::LoadU(d16, p))));
  }
  static HWY_INLINE float Scalar(const uint16_t* p) { return Bf16ToFloat(*p); }
};
struct F32Loader {
  using Type = float;
  static HWY_INLINE hn::Vec<DF> Load(DF df, const float* p) { return hn::LoadU(df, p); }
  static HWY_INLINE float Scalar(const float* p) { return *p; }
};

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

constexpr int64_t kRows = PackedMatrix::kBlockRows;
constexpr int64_t kChunk = PackedMatrix::kChunk;

// Chunks [c0, c1) of a packed block (4 rows) through the accumulators of kTokens tokens
// (io: acc[row][token]; each sums its products in k order, lanes along k). Pass `pass` of
// the plan: prefetches its share of the stream ahead.
template <int kTokens, class Loader>
HWY_INLINE void TileChunks(const float* x, int64_t x_stride, int64_t in,
                           const typename Loader::Type* block, const BlockPlan& plan, int64_t pass,
                           int64_t c0, int64_t c1, hn::Vec<DF> (&io)[kRows][kTokens]) {
  const DF df;
  const int64_t lanes = static_cast<int64_t>(hn::Lanes(df));
  hn::Vec<DF> acc[kRows][kTokens];  // a local copy, so that the loop keeps it in registers
  for (int r = 0; r < kRows; ++r) {
    for (int t = 0; t < kTokens; ++t) acc[r][t] = io[r][t];
  }
  auto step = [&](const hn::Vec<DF>(&xv)[kTokens], const typename Loader::Type* w) HWY_ATTR {
    for (int r = 0; r < kRows; ++r) {
      const hn::Vec<DF> wv = Loader::Load(df, w + r * kChunk);
      for (int t = 0; t < kTokens; ++t) acc[r][t] = hn::MulAdd(wv, xv[t], acc[r][t]);
    }
  };
  int64_t countdown = plan.PrefetchCountdown(pass, c0);
  const int64_t k_end = std::min(c1 * kChunk, in);
  int64_t k = c0 * kChunk;
  for (; k + lanes <= k_end; k += lanes) {
    hn::Vec<DF> xv[kTokens];
    for (int t = 0; t < kTokens; ++t) xv[t] = hn::LoadU(df, x + t * x_stride + k);
    // Chunk k / 32, lane group (k % 32) / lanes of every row.
    const typename Loader::Type* chunk = block + (k / kChunk) * kRows * kChunk;
    if (k % kChunk == 0 && countdown-- == 0) {
      countdown = plan.passes - 1;
      const char* ahead = reinterpret_cast<const char*>(chunk) + plan.lead_bytes;
      for (size_t b = 0; b < kRows * kChunk * sizeof(*chunk); b += 64) PrefetchToL2(ahead + b);
    }
    step(xv, chunk + k % kChunk);
  }
  if (k < k_end) {
    // Tail of the block: x copied zero padded (the packed weights are zero past `in`), through
    // the same vector FMAs, so that bf16 and f32 weights holding the same values give the
    // same bits.
    HWY_ALIGN float x_tail[kTokens][hn::MaxLanes(df)] = {};
    hn::Vec<DF> xv[kTokens];
    for (int t = 0; t < kTokens; ++t) {
      for (int64_t i = k; i < in; ++i) x_tail[t][i - k] = x[t * x_stride + i];
      xv[t] = hn::Load(df, x_tail[t]);
    }
    step(xv, block + (k / kChunk) * kRows * kChunk + k % kChunk);
  }
  for (int r = 0; r < kRows; ++r) {
    for (int t = 0; t < kTokens; ++t) io[r][t] = acc[r][t];
  }
}

// out[t * out_stride + r] = the sum of acc[r][t], for the rows [row_lo, row_hi) of the block.
template <int kTokens>
HWY_INLINE void StoreTile(const hn::Vec<DF> (&acc)[kRows][kTokens], float* out, int64_t out_stride,
                          int64_t row_lo, int64_t row_hi) {
#if MOE_HAVE_SUMS_4X4
  if constexpr (kTokens == 4) {
    if (row_lo == 0 && row_hi == kRows) {
      StoreSums4x4(acc, out, out_stride);
      return;
    }
  }
#endif
  const DF df;
  // Constant indices into acc (a variable one would keep the tile in memory, not registers).
  for (int r = 0; r < kRows; ++r) {
    if (r < row_lo || r >= row_hi) continue;
    for (int t = 0; t < kTokens; ++t) {
      out[t * out_stride + r] = hn::GetLane(hn::SumOfLanes(df, acc[r][t]));
    }
  }
}

// All tokens through one block, as BlockPlan says.
template <class Loader>
HWY_INLINE void BlockAllTokens(const float* x, int64_t x_stride, int64_t tokens, int64_t in,
                               const typename Loader::Type* block, float* out, int64_t out_stride,
                               int64_t row_lo, int64_t row_hi) {
  const BlockPlan plan(tokens, (in + kChunk - 1) / kChunk);
  RunBlock(plan, tokens, hn::Zero(DF()),
           [&]<int kTokens>(int64_t t, int64_t pass, int64_t c0, int64_t c1,
                            hn::Vec<DF>(&acc)[kRows][kTokens]) HWY_ATTR {
             TileChunks<kTokens, Loader>(x + t * x_stride, x_stride, in, block, plan, pass, c0, c1,
                                         acc);
             if (c1 == plan.chunks) {
               StoreTile<kTokens>(acc, out + t * out_stride, out_stride, row_lo, row_hi);
             }
           });
}

// Flattened: RunBlock's tile calls come from a header compiled without this target, so GCC
// inlines them only when told to (out of line, the 4-token tile's accumulators went through
// memory on every call: prefill 5% slower).
template <class Loader>
__attribute__((flatten)) void MatMulPacked(const float* x, int64_t x_stride, int64_t tokens,
                                           const PackedMatrix& weight, int64_t row_begin,
                                           int64_t row_end, float* out, int64_t out_stride) {
  const auto* packed = static_cast<const typename Loader::Type*>(weight.data());
  const int64_t in = weight.in(), block_elements = weight.block_elements();
  SweepPackedBlocks(
      tokens, in, row_begin, row_end,
      [&](int64_t t0, int64_t t1, int64_t b, int64_t row_lo, int64_t row_hi) HWY_ATTR {
        BlockAllTokens<Loader>(x + t0 * x_stride, x_stride, t1 - t0, in,
                               packed + b * block_elements, out + t0 * out_stride + b * kRows,
                               out_stride, row_lo, row_hi);
      });
}

void MatMulRowsImpl(const float* x, int64_t x_stride, int64_t tokens, const PackedMatrix& weight,
                    int64_t row_begin, int64_t row_end, float* out, int64_t out_stride) {
  if (weight.type() == DType::kBF16) {
    MatMulPacked<Bf16Loader>(x, x_stride, tokens, weight, row_begin, row_end, out, out_stride);
  } else {
    MatMulPacked<F32Loader>(x, x_stride, tokens, weight, row_begin, row_end, out, out_stride);
  }
}

// The vector part of Dot: two accumulators over lane groups, added; *end: where the scalar
// tail starts.
template <class Loader>
HWY_INLINE hn::Vec<DF> DotVector(const float* a, const typename Loader::Type* b, int64_t n,
                                 int64_t* end) {
  const DF df;
  const int64_t lanes = static_cast<int64_t>(hn::Lanes(df));
  hn::Vec<DF> acc0 = hn::Zero(df), acc1 = hn::Zero(df);
  int64_t i = 0;
  for (; i + 2 * lanes <= n; i += 2 * lanes) {
    acc0 = hn::MulAdd(hn::LoadU(df, a + i), Loader::Load(df, b + i), acc0);
    acc1 = hn::MulAdd(hn::LoadU(df, a + i + lanes), Loader::Load(df, b + i + lanes), acc1);
  }
  for (; i + lanes <= n; i += lanes) {
    acc0 = hn::MulAdd(hn::LoadU(df, a + i), Loader::Load(df, b + i), acc0);
  }
  *end = i;
  return hn::Add(acc0, acc1);
}

// dot(a, b) with b widened to float32 first: for bf16 b, the same bits as DotF32 on the widened b.
template <class Loader>
HWY_INLINE float Dot(const float* a, const typename Loader::Type* b, int64_t n) {
  int64_t i = 0;
  const hn::Vec<DF> vector = DotVector<Loader>(a, b, n, &i);
  float sum = hn::GetLane(hn::SumOfLanes(DF(), vector));
  for (; i < n; ++i) sum += a[i] * Loader::Scalar(b + i);
  return sum;
}

float DotF32Impl(const float* a, const float* b, int64_t n) { return Dot<F32Loader>(a, b, n); }

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

// Cached K/V rows are gathered through the block table (contiguous within a block, a jump
// between blocks): software prefetch this many positions ahead.
constexpr int64_t kRowPrefetchDistance = 16;
template <class T>
HWY_INLINE void PrefetchRow(const T* row, int64_t count) {
  for (int64_t i = 0; i < count; i += 64 / sizeof(T)) hwy::Prefetch(row + i);
}

template <class Loader>
HWY_INLINE void DotRowsT(const float* q, int64_t heads, const typename Loader::Type* keys,
                         const int64_t* rows, int64_t n, int64_t dim, float* scores) {
  int64_t h0 = 0;
#if MOE_HAVE_SUMS_4X4
  // 4 heads x 4 positions at a time: each key vector read once for the 4 heads, the 16
  // horizontal sums in one shuffle tree (the same grouping as SumOfLanes). Only without a
  // scalar tail, which DotF32 adds after the horizontal sum.
  if (dim % static_cast<int64_t>(hn::Lanes(DF())) == 0) {
    for (; h0 + 4 <= heads; h0 += 4) {
      int64_t p = 0;
      for (; p + 4 <= n; p += 4) {
        if (p + kRowPrefetchDistance + 4 <= n) {
          for (int i = 0; i < 4; ++i) PrefetchRow(keys + rows[p + kRowPrefetchDistance + i], dim);
        }
        hn::Vec<DF> dots[4][4];  // [position][head]
        int64_t end = 0;
        for (int i = 0; i < 4; ++i) {
          for (int h = 0; h < 4; ++h) {
            dots[i][h] = DotVector<Loader>(q + (h0 + h) * dim, keys + rows[p + i], dim, &end);
          }
        }
        StoreSums4x4(dots, scores + h0 * n + p, n);
      }
      for (; p < n; ++p) {
        for (int64_t h = h0; h < h0 + 4; ++h) {
          scores[h * n + p] = Dot<Loader>(q + h * dim, keys + rows[p], dim);
        }
      }
    }
  }
#endif
  for (int64_t h = h0; h < heads; ++h) {
    for (int64_t p = 0; p < n; ++p)
      scores[h * n + p] = Dot<Loader>(q + h * dim, keys + rows[p], dim);
  }
}

void DotRowsF32Impl(const float* q, int64_t heads, const float* keys, const int64_t* rows,
                    int64_t n, int64_t dim, float* scores) {
  DotRowsT<F32Loader>(q, heads, keys, rows, n, dim, scores);
}
void DotRowsBf16Impl(const float* q, int64_t heads, const uint16_t* keys, const int64_t* rows,
                     int64_t n, int64_t dim, float* scores) {
  DotRowsT<Bf16Loader>(q, heads, keys, rows, n, dim, scores);
}

// WeightedSumRows for kHeads heads sharing the rows: each value vector is read once for all.
template <int kHeads, class Loader>
HWY_INLINE void WeightedSumHeads(const float* weights, const typename Loader::Type* values,
                                 const int64_t* rows, int64_t n, int64_t dim, float* out) {
  const DF df;
  const int64_t lanes = static_cast<int64_t>(hn::Lanes(df));
  constexpr int kVectors = 4;  // a 64-wide head in registers on AVX-512
  int64_t d = 0;
  for (; d + kVectors * lanes <= dim; d += kVectors * lanes) {
    hn::Vec<DF> acc[kHeads][kVectors];
    for (int h = 0; h < kHeads; ++h) {
      for (int j = 0; j < kVectors; ++j) acc[h][j] = hn::Zero(df);
    }
    for (int64_t p = 0; p < n; ++p) {
      if (p + kRowPrefetchDistance < n) {
        PrefetchRow(values + rows[p + kRowPrefetchDistance] + d, kVectors * lanes);
      }
      const typename Loader::Type* row = values + rows[p] + d;
      hn::Vec<DF> v[kVectors];
      for (int j = 0; j < kVectors; ++j) v[j] = Loader::Load(df, row + j * lanes);
      for (int h = 0; h < kHeads; ++h) {
        const hn::Vec<DF> w = hn::Set(df, weights[h * n + p]);
        for (int j = 0; j < kVectors; ++j) acc[h][j] = hn::MulAdd(w, v[j], acc[h][j]);
      }
    }
    for (int h = 0; h < kHeads; ++h) {
      for (int j = 0; j < kVectors; ++j) hn::StoreU(acc[h][j], df, out + h * dim + d + j * lanes);
    }
  }
  for (int h = 0; h < kHeads; ++h) {
    const float* w = weights + h * n;
    for (int64_t e = d; e + lanes <= dim; e += lanes) {
      hn::Vec<DF> acc = hn::Zero(df);
      for (int64_t p = 0; p < n; ++p) {
        acc = hn::MulAdd(hn::Set(df, w[p]), Loader::Load(df, values + rows[p] + e), acc);
      }
      hn::StoreU(acc, df, out + h * dim + e);
    }
    for (int64_t e = d + (dim - d) / lanes * lanes; e < dim; ++e) {  // as AxpyF32's scalar tail
      float acc = 0.0f;
      for (int64_t p = 0; p < n; ++p) acc += w[p] * Loader::Scalar(values + rows[p] + e);
      out[h * dim + e] = acc;
    }
  }
}

template <class Loader>
HWY_INLINE void WeightedSumRowsT(const float* weights, int64_t heads,
                                 const typename Loader::Type* values, const int64_t* rows,
                                 int64_t n, int64_t dim, float* out) {
  ForEachTileOf4(heads, [&]<int kHeads>(int64_t h, int64_t) HWY_ATTR {
    WeightedSumHeads<kHeads, Loader>(weights + h * n, values, rows, n, dim, out + h * dim);
  });
}

void WeightedSumRowsF32Impl(const float* weights, int64_t heads, const float* values,
                            const int64_t* rows, int64_t n, int64_t dim, float* out) {
  WeightedSumRowsT<F32Loader>(weights, heads, values, rows, n, dim, out);
}
void WeightedSumRowsBf16Impl(const float* weights, int64_t heads, const uint16_t* values,
                             const int64_t* rows, int64_t n, int64_t dim, float* out) {
  WeightedSumRowsT<Bf16Loader>(weights, heads, values, rows, n, dim, out);
}

void ScaledSoftmaxImpl(float* x, int64_t n, float scale) {
  const DF df;
  const int64_t lanes = static_cast<int64_t>(hn::Lanes(df));
  const hn::Vec<DF> vscale = hn::Set(df, scale);
  hn::Vec<DF> vmax = hn::Set(df, -std::numeric_limits<float>::infinity());
  int64_t i = 0;
  for (; i + lanes <= n; i += lanes) {
    const hn::Vec<DF> v = hn::Mul(hn::LoadU(df, x + i), vscale);
    hn::StoreU(v, df, x + i);
    vmax = hn::Max(vmax, v);
  }
  float max_score = hn::GetLane(hn::MaxOfLanes(df, vmax));
  for (; i < n; ++i) {
    x[i] *= scale;
    max_score = std::max(max_score, x[i]);
  }
  const hn::Vec<DF> shift = hn::Set(df, max_score);
  hn::Vec<DF> vtotal = hn::Zero(df);
  for (i = 0; i + lanes <= n; i += lanes) {
    const hn::Vec<DF> e = hn::Exp(df, hn::Sub(hn::LoadU(df, x + i), shift));
    hn::StoreU(e, df, x + i);
    vtotal = hn::Add(vtotal, e);
  }
  if (i < n) {  // the same vector exp on a padded copy (the padding's exp not summed)
    HWY_ALIGN float tail[hn::MaxLanes(df)];
    std::fill(tail, tail + lanes, max_score);
    std::copy(x + i, x + n, tail);
    hn::Store(hn::Exp(df, hn::Sub(hn::Load(df, tail), shift)), df, tail);
    std::copy(tail, tail + (n - i), x + i);
  }
  float total = hn::GetLane(hn::SumOfLanes(df, vtotal));
  for (; i < n; ++i) total += x[i];
  const hn::Vec<DF> divisor = hn::Set(df, total);
  for (i = 0; i + lanes <= n; i += lanes) {
    hn::StoreU(hn::Div(hn::LoadU(df, x + i), divisor), df, x + i);
  }
  for (; i < n; ++i) x[i] /= total;
}

void SiluMulImpl(const float* gate, const float* up, float* out, int64_t n) {
  const DF df;
  const int64_t lanes = static_cast<int64_t>(hn::Lanes(df));
  const hn::Vec<DF> one = hn::Set(df, 1.0f);
  // exp(-g) overflows past 88.7; clamped, silu(g) for g < -88 is ~1e-36 instead of -0.
  const hn::Vec<DF> limit = hn::Set(df, 88.0f);
  auto silu_mul = [&](hn::Vec<DF> g, hn::Vec<DF> u) HWY_ATTR {
    const hn::Vec<DF> e = hn::Exp(df, hn::Min(hn::Neg(g), limit));
    return hn::Mul(hn::Div(g, hn::Add(one, e)), u);
  };
  int64_t i = 0;
  for (; i + lanes <= n; i += lanes) {
    hn::StoreU(silu_mul(hn::LoadU(df, gate + i), hn::LoadU(df, up + i)), df, out + i);
  }
  if (i < n) {  // the same vector code on a zero-padded copy: no element depends on where n ends
    HWY_ALIGN float g[hn::MaxLanes(df)] = {}, u[hn::MaxLanes(df)] = {}, o[hn::MaxLanes(df)];
    std::copy(gate + i, gate + n, g);
    std::copy(up + i, up + n, u);
    hn::Store(silu_mul(hn::Load(df, g), hn::Load(df, u)), df, o);
    std::copy(o, o + (n - i), out + i);
  }
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
HWY_EXPORT(SiluMulImpl);
HWY_EXPORT(DotRowsF32Impl);
HWY_EXPORT(DotRowsBf16Impl);
HWY_EXPORT(WeightedSumRowsF32Impl);
HWY_EXPORT(WeightedSumRowsBf16Impl);
HWY_EXPORT(ScaledSoftmaxImpl);
HWY_EXPORT(SelectedTargetImpl);

void MatMulRows(const float* x, int64_t x_stride, int64_t tokens, const PackedMatrix& weight,
                int64_t row_begin, int64_t row_end, float* out, int64_t out_stride) {
  HWY_DYNAMIC_DISPATCH(MatMulRowsImpl)
  (x, x_stride, tokens, weight, row_begin, row_end, out, out_stride);
}

float DotF32(const float* a, const float* b, int64_t n) {
  return HWY_DYNAMIC_DISPATCH(DotF32Impl)(a, b, n);
}

void AxpyF32(float alpha, const float* x, float* y, int64_t n) {
  HWY_DYNAMIC_DISPATCH(AxpyF32Impl)(alpha, x, y, n);
}

void DotRows(const float* q, int64_t heads, const float* keys, const int64_t* rows, int64_t n,
             int64_t dim, float* scores) {
  HWY_DYNAMIC_DISPATCH(DotRowsF32Impl)(q, heads, keys, rows, n, dim, scores);
}

void DotRows(const float* q, int64_t heads, const uint16_t* keys, const int64_t* rows, int64_t n,
             int64_t dim, float* scores) {
  HWY_DYNAMIC_DISPATCH(DotRowsBf16Impl)(q, heads, keys, rows, n, dim, scores);
}

void WeightedSumRows(const float* weights, int64_t heads, const float* values, const int64_t* rows,
                     int64_t n, int64_t dim, float* out) {
  HWY_DYNAMIC_DISPATCH(WeightedSumRowsF32Impl)(weights, heads, values, rows, n, dim, out);
}

void WeightedSumRows(const float* weights, int64_t heads, const uint16_t* values,
                     const int64_t* rows, int64_t n, int64_t dim, float* out) {
  HWY_DYNAMIC_DISPATCH(WeightedSumRowsBf16Impl)(weights, heads, values, rows, n, dim, out);
}

void ScaledSoftmax(float* x, int64_t n, float scale) {
  HWY_DYNAMIC_DISPATCH(ScaledSoftmaxImpl)(x, n, scale);
}

void SiluMul(const float* gate, const float* up, float* out, int64_t n) {
  HWY_DYNAMIC_DISPATCH(SiluMulImpl)(gate, up, out, n);
}

const char* SelectedTarget() { return HWY_DYNAMIC_DISPATCH(SelectedTargetImpl)(); }

}  // namespace moe::cpu
#endif  // HWY_ONCE
