// Highway's foreach_target re-includes this file once per instruction set.
#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "engine/backend/cpu/kernels.cc"
#include "hwy/foreach_target.h"  // IWYU pragma: keep
// After foreach_target:
#include "hwy/highway.h"

#include <algorithm>

#include "engine/backend/cpu/kernels.h"

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
  static HWY_INLINE float Scalar(const uint16_t* p) { return Bf16ToFloat(*p); }
};
struct F32Weights {
  static HWY_INLINE hn::Vec<DF> Load(DF df, const float* p) { return hn::LoadU(df, p); }
  static HWY_INLINE float Scalar(const float* p) { return *p; }
};

// A tile of kRows weight rows x kTokens tokens: kRows * kTokens accumulators.
template <int kRows, int kTokens, class Loader, typename W>
HWY_INLINE void Tile(const float* x, int64_t x_stride, const W* w, int64_t in, float* out,
                     int64_t out_stride) {
  const DF df;
  const int64_t lanes = static_cast<int64_t>(hn::Lanes(df));
  hn::Vec<DF> acc[kRows][kTokens];
  for (int r = 0; r < kRows; ++r) {
    for (int t = 0; t < kTokens; ++t) acc[r][t] = hn::Zero(df);
  }
  int64_t k = 0;
  for (; k + lanes <= in; k += lanes) {
    hn::Vec<DF> xv[kTokens];
    for (int t = 0; t < kTokens; ++t) xv[t] = hn::LoadU(df, x + t * x_stride + k);
    for (int r = 0; r < kRows; ++r) {
      const hn::Vec<DF> wv = Loader::Load(df, w + r * in + k);
      for (int t = 0; t < kTokens; ++t) acc[r][t] = hn::MulAdd(wv, xv[t], acc[r][t]);
    }
  }
  for (int r = 0; r < kRows; ++r) {
    for (int t = 0; t < kTokens; ++t) {
      float sum = hn::GetLane(hn::SumOfLanes(df, acc[r][t]));
      for (int64_t tail = k; tail < in; ++tail) {
        sum += Loader::Scalar(w + r * in + tail) * x[t * x_stride + tail];
      }
      out[t * out_stride + r] = sum;
    }
  }
}

template <int kRows, class Loader, typename W>
HWY_INLINE void RowsAllTokens(const float* x, int64_t x_stride, int64_t tokens, const W* w,
                              int64_t in, float* out, int64_t out_stride) {
  int64_t t = 0;
  for (; t + 4 <= tokens; t += 4) {
    Tile<kRows, 4, Loader>(x + t * x_stride, x_stride, w, in, out + t * out_stride, out_stride);
  }
  const float* xt = x + t * x_stride;
  float* ot = out + t * out_stride;
  switch (tokens - t) {
    case 3:
      Tile<kRows, 3, Loader>(xt, x_stride, w, in, ot, out_stride);
      break;
    case 2:
      Tile<kRows, 2, Loader>(xt, x_stride, w, in, ot, out_stride);
      break;
    case 1:
      Tile<kRows, 1, Loader>(xt, x_stride, w, in, ot, out_stride);
      break;
    default:
      break;
  }
}

template <class Loader, typename W>
void MatMulRowsTyped(const float* x, int64_t x_stride, int64_t tokens, const W* weight, int64_t in,
                     int64_t row_begin, int64_t row_end, float* out, int64_t out_stride) {
  // Decode (few tokens) is bound by reading weights: 4 rows at a time keeps 4 independent
  // accumulator chains per token. Prefill reuses each row for 4 tokens.
  int64_t r = row_begin;
  if (tokens < 4) {
    for (; r + 4 <= row_end; r += 4) {
      RowsAllTokens<4, Loader>(x, x_stride, tokens, weight + r * in, in, out + r, out_stride);
    }
  } else {
    for (; r + 2 <= row_end; r += 2) {
      RowsAllTokens<2, Loader>(x, x_stride, tokens, weight + r * in, in, out + r, out_stride);
    }
  }
  for (; r < row_end; ++r) {
    RowsAllTokens<1, Loader>(x, x_stride, tokens, weight + r * in, in, out + r, out_stride);
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
