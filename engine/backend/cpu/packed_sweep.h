// The loop order shared by the matmul kernels over a PackedMatrix (kernels.cc, fp32
// activations; kernels_bf16.cc, bf16 activations).
#pragma once

#include <algorithm>
#include <cstdint>

#include "engine/backend/cpu/kernels.h"

namespace moe::cpu {

// How one packed block meets its tokens: in token tiles of up to 4 ("passes"), every (row,
// token) accumulator summing its products in k order whatever the plan, so a token's result
// never depends on it.
// - 1 pass (1-4 tokens): the block streams through the tile once.
// - 2-4 passes (5-16 tokens, batched decode): the block is cut along k into segments of
//   kSegmentChunks chunks (8 KiB of bf16 weights) and every pass runs over a segment before
//   the next one starts, its accumulators saved in between. The weights stay one sequential
//   stream and each segment meets all tokens while it and their inputs are in L1. (Whole-block
//   passes read the block again from L2 when it and 4 tokens' inputs outgrow L1: a 22.5 KiB
//   down-projection block with 4 x 5.6 KiB of inputs does.)
// - more passes (prefill): whole-block passes; compute bound, blocked by SweepPackedBlocks.
// Software prefetch keeps the stream flowing through all passes: pass p of n prefetches
// every n-th chunk from its p-th on, lead_bytes ahead (4 KiB with one pass; with more, a
// whole 8 KiB segment, so that the last pass's share arrives before the next segment's first
// pass needs it), so each line is asked for once and the requests are spread over the block's
// whole time. Into L2, not L1: L1 prefetches hold the
// core's few L1 miss buffers and stall its own loads. Measured against the previous scheme
// (L1 prefetch 4 KiB ahead from the first tile only, whole-block passes), 2 threads, 256 MiB
// bf16 matrix, alternating runs: 8 tokens 31-37 GB/s instead of 19-24 with bf16 activations,
// 22-23 instead of 15-16 with fp32 ones; 1-4 tokens within the noise of the probe.
struct BlockPlan {
  static constexpr int64_t kTileTokens = 4, kMaxSegmentedPasses = 4, kSegmentChunks = 32;
  static constexpr int64_t kLeadBytes = 4096;
  BlockPlan(int64_t tokens, int64_t block_chunks)
      : chunks(block_chunks),
        passes((tokens + kTileTokens - 1) / kTileTokens),
        segment_chunks(passes > 1 && passes <= kMaxSegmentedPasses ? kSegmentChunks : chunks),
        lead_bytes(passes == 1 ? kLeadBytes : 2 * kLeadBytes) {}
  // Chunks before the first one that pass `pass` prefetches at or after chunk c0.
  int64_t PrefetchCountdown(int64_t pass, int64_t c0) const {
    return ((pass - c0) % passes + passes) % passes;
  }
  int64_t chunks;          // of the block
  int64_t passes;          // token tiles
  int64_t segment_chunks;  // chunks per segment (all of them: one segment)
  int64_t lead_bytes;      // prefetch distance
};

__attribute__((always_inline)) inline void PrefetchToL2(const void* address) {
  __builtin_prefetch(address, /*rw=*/0, /*locality=*/2);  // prefetcht1 on x86-64
}

// Splits `count` items into tiles of 4, then one of the 1-3 left, calling
//   fn.template operator()<kSize>(first, index)
// for each tile (first: its first item; index: its position among the tiles).
template <class Fn>
__attribute__((always_inline)) inline void ForEachTileOf4(int64_t count, Fn&& fn) {
  int64_t first = 0, index = 0;
  for (; first + 4 <= count; first += 4, ++index) fn.template operator()<4>(first, index);
  switch (count - first) {
    case 3:
      fn.template operator()<3>(first, index);
      break;
    case 2:
      fn.template operator()<2>(first, index);
      break;
    case 1:
      fn.template operator()<1>(first, index);
      break;
    default:
      break;
  }
}

// Runs `tokens` tokens through one block as `plan` says: for every segment [c0, c1) and every
// token tile (t: its first token; pass: its index; kTokens: 1-4 tokens) calls
//   tile_fn.template operator()<kTokens>(t, pass, c0, c1, acc)
// with the tile's accumulators acc[4][kTokens] (zero at c0 == 0, saved across segments),
// which runs chunks [c0, c1) into them and, at c1 == plan.chunks, stores the sums.
template <class Vec, class TileFn>
__attribute__((always_inline)) inline void RunBlock(const BlockPlan& plan, int64_t tokens, Vec zero,
                                                    TileFn&& tile_fn) {
  static_assert(BlockPlan::kTileTokens == 4, "token tiles come from ForEachTileOf4");
  constexpr int kRows = PackedMatrix::kBlockRows, kTile = BlockPlan::kTileTokens;
  // Only segmented plans (at most kMaxSegmentedPasses passes) save accumulators.
  Vec saved[BlockPlan::kMaxSegmentedPasses][kRows][kTile];
  for (int64_t c0 = 0; c0 < plan.chunks; c0 += plan.segment_chunks) {
    const int64_t c1 = std::min(plan.chunks, c0 + plan.segment_chunks);
    ForEachTileOf4(
        tokens, [&]<int kTokens>(int64_t t, int64_t pass) __attribute__((always_inline)) {
          Vec acc[kRows][kTokens];
          for (int r = 0; r < kRows; ++r) {
            for (int i = 0; i < kTokens; ++i) {
              acc[r][i] = c0 == 0 ? zero : saved[pass][r][i];
            }
          }
          tile_fn.template operator()<kTokens>(t, pass, c0, c1, acc);
          if (c1 < plan.chunks) {
            for (int r = 0; r < kRows; ++r) {
              for (int i = 0; i < kTokens; ++i) saved[pass][r][i] = acc[r][i];
            }
          }
        });
  }
}

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
