// The loop order shared by the matmul kernels over a PackedMatrix (kernels.cc, fp32
// activations; kernels_bf16.cc, bf16 activations).
#pragma once

#include <algorithm>
#include <cstdint>

#include "engine/backend/cpu/kernels.h"

namespace moe::cpu {

// Calls block_fn(t0, t1, b, row_lo, row_hi) for token range [t0, t1) and weight block b
// (rows [row_lo, row_hi) of its 4 inside [row_begin, row_end)), for every block overlapping
// [row_begin, row_end). Blocked for many tokens (prefill): a block of tokens (x: ~128 K
// elements, 512 KiB of fp32 or 256 KiB of bf16) stays in L2 while sweeps of 8 weight blocks
// (32 rows) go over it, each block staying in L1 while it meets every token. With few tokens
// (decode) this is one sequential pass over the rows.
template <class BlockFn>
__attribute__((always_inline)) inline void SweepPackedBlocks(int64_t tokens, int64_t in,
                                                             int64_t row_begin, int64_t row_end,
                                                             BlockFn&& block_fn) {
  constexpr int64_t kRows = PackedMatrix::kBlockRows;
  constexpr int64_t kSweepBlocks = 8;
  const int64_t token_block =
      std::max<int64_t>(4, (int64_t{128} << 10) / std::max<int64_t>(1, in) / 4 * 4);
  const int64_t first_block = row_begin / kRows, end_block = (row_end + kRows - 1) / kRows;
  for (int64_t t0 = 0; t0 < tokens; t0 += token_block) {
    const int64_t t1 = std::min(tokens, t0 + token_block);
    for (int64_t b0 = first_block; b0 < end_block; b0 += kSweepBlocks) {
      for (int64_t b = b0; b < std::min(end_block, b0 + kSweepBlocks); ++b) {
        block_fn(t0, t1, b, std::max<int64_t>(0, row_begin - b * kRows),
                 std::min<int64_t>(kRows, row_end - b * kRows));
      }
    }
  }
}

}  // namespace moe::cpu
