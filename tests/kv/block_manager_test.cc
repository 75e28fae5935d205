#include "engine/kv/block_manager.h"

#include <algorithm>
#include <numeric>
#include <random>
#include <vector>

#include "gtest/gtest.h"

namespace moe {
namespace {

std::vector<int32_t> Iota(int32_t n, int32_t start = 0) {
  std::vector<int32_t> v(n);
  std::iota(v.begin(), v.end(), start);
  return v;
}

void ExpectHealthy(const BlockManager& kv) {
  ASSERT_TRUE(kv.CheckInvariants().ok()) << kv.CheckInvariants();
  EXPECT_EQ(kv.num_free_blocks() + kv.num_used_blocks(), kv.num_blocks());
}

TEST(BlockManagerTest, GrowAndReleaseReturnEveryBlock) {
  BlockManager kv(/*num_blocks=*/8, /*block_size=*/4, /*enable_prefix_caching=*/false);
  BlockTable a, b;
  EXPECT_EQ(kv.BlocksFor(0), 0);
  EXPECT_EQ(kv.BlocksFor(1), 1);
  EXPECT_EQ(kv.BlocksFor(4), 1);
  EXPECT_EQ(kv.BlocksFor(5), 2);
  ASSERT_TRUE(kv.GrowTo(a, 5).ok());
  EXPECT_EQ(a.num_blocks(), 2);
  ASSERT_TRUE(kv.GrowTo(a, 8).ok());  // still fits in two blocks
  EXPECT_EQ(a.num_blocks(), 2);
  ASSERT_TRUE(kv.GrowTo(b, 16).ok());
  EXPECT_EQ(kv.num_used_blocks(), 6);
  EXPECT_EQ(kv.num_free_blocks(), 2);
  ExpectHealthy(kv);

  // Asking for more than is free fails and changes nothing.
  EXPECT_FALSE(kv.CanGrowTo(a, 8 + 3 * 4));
  absl::Status status = kv.GrowTo(a, 8 + 3 * 4);
  EXPECT_EQ(status.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(a.num_blocks(), 2);
  EXPECT_EQ(kv.num_free_blocks(), 2);

  // Blocks are distinct.
  std::vector<int32_t> all = a.blocks;
  all.insert(all.end(), b.blocks.begin(), b.blocks.end());
  std::sort(all.begin(), all.end());
  EXPECT_EQ(std::unique(all.begin(), all.end()), all.end());

  kv.Release(a);
  kv.Release(b);
  EXPECT_TRUE(a.blocks.empty());
  EXPECT_EQ(kv.num_free_blocks(), 8);
  EXPECT_EQ(kv.num_used_blocks(), 0);
  ExpectHealthy(kv);
}

TEST(BlockManagerTest, PrefixCachingOffNeverHits) {
  BlockManager kv(8, 4, false);
  std::vector<int32_t> tokens = Iota(12);
  BlockTable a;
  ASSERT_TRUE(kv.GrowTo(a, 12).ok());
  kv.CacheComputedBlocks(a, tokens, 12);
  EXPECT_EQ(kv.num_keyed_blocks(), 0);
  BlockTable b;
  EXPECT_EQ(kv.AcquireCachedPrefix(tokens, 3, b), 0);
  EXPECT_TRUE(b.blocks.empty());
}

TEST(BlockManagerTest, SharedPrefixIsReusedWithRefCounts) {
  BlockManager kv(10, 4, true);
  std::vector<int32_t> tokens = Iota(10);  // two full blocks + 2 tokens
  BlockTable a;
  ASSERT_TRUE(kv.GrowTo(a, 10).ok());
  kv.CacheComputedBlocks(a, tokens, 6);  // only the first block is fully computed
  EXPECT_EQ(a.full_block_hashes.size(), 1u);
  EXPECT_EQ(kv.num_keyed_blocks(), 1);
  kv.CacheComputedBlocks(a, tokens, 10);
  EXPECT_EQ(a.full_block_hashes.size(), 2u);
  EXPECT_EQ(kv.num_keyed_blocks(), 2);

  // Same first 8 tokens, different tail: two blocks hit.
  std::vector<int32_t> other = Iota(8);
  other.push_back(100);
  BlockTable b;
  EXPECT_EQ(kv.AcquireCachedPrefix(other, /*max_blocks=*/2, b), 8);
  ASSERT_EQ(b.num_blocks(), 2);
  EXPECT_EQ(b.blocks[0], a.blocks[0]);
  EXPECT_EQ(b.blocks[1], a.blocks[1]);
  EXPECT_EQ(kv.ref_count(a.blocks[0]), 2);
  EXPECT_EQ(kv.num_used_blocks(), 3);  // shared blocks count once
  EXPECT_EQ(kv.counters().prefix_hit_tokens, 8);
  ExpectHealthy(kv);

  // max_blocks caps the hit.
  BlockTable c;
  EXPECT_EQ(kv.AcquireCachedPrefix(other, 1, c), 4);
  kv.Release(c);

  // A different first block misses entirely (the hash is chained).
  std::vector<int32_t> shifted = Iota(8, 1);
  BlockTable d;
  EXPECT_EQ(kv.AcquireCachedPrefix(shifted, 2, d), 0);

  kv.Release(a);
  kv.Release(b);
  EXPECT_EQ(kv.num_used_blocks(), 0);
  EXPECT_EQ(kv.num_free_blocks(), 10);
  EXPECT_EQ(kv.num_cached_free_blocks(), 2);  // still reusable after everyone left
  ExpectHealthy(kv);

  BlockTable e;
  EXPECT_EQ(kv.AcquireCachedPrefix(tokens, 2, e), 8);
  kv.Release(e);
  ExpectHealthy(kv);

  // With a memo of block hashes (a sequence retried every step): the same hits, and the memo
  // holds the chained hashes of the blocks looked up, reused as they are on the next call.
  std::vector<uint64_t> memo;
  for (int attempt = 0; attempt < 3; ++attempt) {
    BlockTable f;
    EXPECT_EQ(kv.AcquireCachedPrefix(tokens, 2, f, &memo), 8) << attempt;
    EXPECT_EQ(f.full_block_hashes, memo);
    kv.Release(f);
  }
  ASSERT_EQ(memo.size(), 2u);
  EXPECT_EQ(memo[0], BlockManager::HashBlock(BlockManager::kRootHash, {tokens.data(), 4}));
  EXPECT_EQ(memo[1], BlockManager::HashBlock(memo[0], {tokens.data() + 4, 4}));
  // A memo that stops at a miss grows no further than the lookup went.
  std::vector<uint64_t> shifted_memo;
  BlockTable g;
  EXPECT_EQ(kv.AcquireCachedPrefix(shifted, 2, g, &shifted_memo), 0);
  EXPECT_EQ(shifted_memo.size(), 1u);
  ExpectHealthy(kv);
}

TEST(BlockManagerTest, SameBlockContentAfterDifferentPrefixDoesNotMatch) {
  BlockManager kv(8, 2, true);
  std::vector<int32_t> first = {1, 2, 7, 7};
  std::vector<int32_t> second = {3, 4, 7, 7};
  BlockTable a;
  ASSERT_TRUE(kv.GrowTo(a, 4).ok());
  kv.CacheComputedBlocks(a, first, 4);
  BlockTable b;
  // Block 1 of `second` has the same tokens as block 1 of `first` but a different prefix.
  EXPECT_EQ(kv.AcquireCachedPrefix(second, 2, b), 0);
  EXPECT_NE(
      BlockManager::HashBlock(BlockManager::HashBlock(BlockManager::kRootHash, {1, 2}), {7, 7}),
      BlockManager::HashBlock(BlockManager::HashBlock(BlockManager::kRootHash, {3, 4}), {7, 7}));
  kv.Release(a);
}

TEST(BlockManagerTest, DuplicateContentStaysUnkeyedAndChainContinues) {
  BlockManager kv(8, 2, true);
  std::vector<int32_t> tokens = {1, 2, 3, 4, 5, 6};
  // Two sequences prefill the same prompt at the same time (no hit for either).
  BlockTable a, b;
  ASSERT_TRUE(kv.GrowTo(a, 6).ok());
  ASSERT_TRUE(kv.GrowTo(b, 6).ok());
  kv.CacheComputedBlocks(a, tokens, 6);
  kv.CacheComputedBlocks(b, tokens, 6);
  EXPECT_EQ(kv.num_keyed_blocks(), 3);  // b's copies are duplicates
  EXPECT_EQ(b.full_block_hashes, a.full_block_hashes);
  ExpectHealthy(kv);
  kv.Release(b);
  EXPECT_EQ(kv.num_cached_free_blocks(), 0);  // b's blocks were plain
  kv.Release(a);
  EXPECT_EQ(kv.num_cached_free_blocks(), 3);
  ExpectHealthy(kv);
}

TEST(BlockManagerTest, EmptyBlocksGoFirstThenLeastRecentlyReleasedCachedOnes) {
  BlockManager kv(4, 2, true);
  std::vector<int32_t> x = {1, 1, 2, 2};
  std::vector<int32_t> y = {3, 3, 4, 4};
  BlockTable a, b;
  ASSERT_TRUE(kv.GrowTo(a, 4).ok());
  kv.CacheComputedBlocks(a, x, 4);
  kv.Release(a);  // released first: older in the LRU order (its tail block oldest of all)
  ASSERT_TRUE(kv.GrowTo(b, 4).ok());  // takes the two empty blocks, evicts nothing
  EXPECT_EQ(kv.counters().cache_evictions, 0);
  kv.CacheComputedBlocks(b, y, 4);
  kv.Release(b);
  EXPECT_EQ(kv.num_cached_free_blocks(), 4);

  // One block needed: it evicts x's tail block (released first, tail before head).
  BlockTable c;
  ASSERT_TRUE(kv.GrowTo(c, 1).ok());
  EXPECT_EQ(kv.counters().cache_evictions, 1);
  BlockTable probe;
  EXPECT_EQ(kv.AcquireCachedPrefix(x, 2, probe), 2);  // x's head survives, tail is gone
  kv.Release(probe);
  EXPECT_EQ(kv.AcquireCachedPrefix(y, 2, probe), 4);  // y intact
  kv.Release(probe);
  kv.Release(c);
  ExpectHealthy(kv);

  kv.ResetPrefixCache();
  EXPECT_EQ(kv.num_keyed_blocks(), 0);
  EXPECT_EQ(kv.num_free_blocks(), 4);
  ExpectHealthy(kv);
}

TEST(BlockManagerTest, RandomizedOperationsKeepInvariants) {
  BlockManager kv(24, 4, true);
  std::mt19937_64 rng(7);
  struct Live {
    BlockTable table;
    std::vector<int32_t> tokens;
    int64_t computed = 0;
  };
  std::vector<Live> live;
  for (int iter = 0; iter < 3000; ++iter) {
    const int op = static_cast<int>(rng() % 4);
    if (op == 0 || live.empty()) {
      Live seq;
      const int len = 1 + static_cast<int>(rng() % 20);
      const int family = static_cast<int>(rng() % 3);  // shared prefixes
      for (int i = 0; i < len; ++i) seq.tokens.push_back(i < 8 ? family * 100 + i : rng() % 50);
      seq.computed = kv.AcquireCachedPrefix(seq.tokens, (len - 1) / 4, seq.table);
      if (kv.GrowTo(seq.table, len).ok()) {
        live.push_back(std::move(seq));
      } else {
        kv.Release(seq.table);
      }
    } else if (op == 1) {
      Live& seq = live[rng() % live.size()];
      seq.computed = static_cast<int64_t>(seq.tokens.size());
      kv.CacheComputedBlocks(seq.table, seq.tokens, seq.computed);
    } else if (op == 2) {
      Live& seq = live[rng() % live.size()];
      seq.tokens.push_back(static_cast<int32_t>(rng() % 50));
      if (!kv.GrowTo(seq.table, seq.tokens.size()).ok()) seq.tokens.pop_back();
    } else {
      const size_t i = rng() % live.size();
      kv.Release(live[i].table);
      live.erase(live.begin() + i);
    }
    ASSERT_TRUE(kv.CheckInvariants().ok()) << "iteration " << iter << ": " << kv.CheckInvariants();
  }
  for (Live& seq : live) kv.Release(seq.table);
  EXPECT_EQ(kv.num_used_blocks(), 0);
  EXPECT_EQ(kv.num_free_blocks(), kv.num_blocks());
  EXPECT_GT(kv.counters().prefix_hit_blocks, 0);
  ExpectHealthy(kv);
}

}  // namespace
}  // namespace moe
