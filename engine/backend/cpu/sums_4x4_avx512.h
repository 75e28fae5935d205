// The 16 horizontal sums of a 4 x 4 tile of AVX-512 accumulators, shared by the fp32
// (Highway) and bf16 (AVX512-BF16) kernels.
#pragma once

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>

#include <cstdint>

namespace moe::cpu {

// out[t * out_stride + r] = _mm512_reduce_add_ps(acc[r][t]) for a 4x4 tile, bit for bit (the
// same grouping as GCC's reduction: halves, quarters, pairs, last pair), 15 shuffles + 15 adds.
__attribute__((target("avx512f"), always_inline)) inline void StoreSums4x4Avx512(
    const __m512 (&acc)[4][4], float* out, int64_t out_stride) {
  __m512 s[8];
  for (int i = 0; i < 8; ++i) {
    const __m512 a = acc[(2 * i) / 4][(2 * i) % 4], b = acc[(2 * i + 1) / 4][(2 * i + 1) % 4];
    s[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_f32x4(a, b, _MM_SHUFFLE(3, 2, 3, 2)));
  }
  __m512 q[4];
  for (int i = 0; i < 4; ++i) {
    q[i] = _mm512_add_ps(_mm512_shuffle_f32x4(s[2 * i], s[2 * i + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(s[2 * i], s[2 * i + 1], _MM_SHUFFLE(3, 1, 3, 1)));
  }
  __m512 w[2];
  for (int i = 0; i < 2; ++i) {
    const __m512d a = _mm512_castps_pd(q[2 * i]), b = _mm512_castps_pd(q[2 * i + 1]);
    w[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)),
                         _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
  }
  const __m512 sums = _mm512_add_ps(_mm512_shuffle_ps(w[0], w[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                    _mm512_shuffle_ps(w[0], w[1], _MM_SHUFFLE(3, 1, 3, 1)));
  _mm_storeu_ps(out, _mm512_extractf32x4_ps(sums, 0));
  _mm_storeu_ps(out + out_stride, _mm512_extractf32x4_ps(sums, 1));
  _mm_storeu_ps(out + 2 * out_stride, _mm512_extractf32x4_ps(sums, 2));
  _mm_storeu_ps(out + 3 * out_stride, _mm512_extractf32x4_ps(sums, 3));
}

}  // namespace moe::cpu

#endif  // x86-64 GCC
