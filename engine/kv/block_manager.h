// BlockManager: the paged KV pool's bookkeeping (which physical block holds what), with
// reference counts and prefix caching. It never touches KV memory itself: the ModelRunner owns
// the storage and reads/writes it through the block tables built here.
//
// Prefix caching: once every token of a full block has its KV computed, the block is keyed by a
// chained hash h_i = Hash(h_{i-1}, tokens of block i) (h_{-1} = kRootHash), so that equal keys
// mean equal token prefixes and therefore equal KV. A later sequence with the same prefix takes
// a reference on those blocks instead of recomputing them. Blocks whose reference count drops
// to zero keep their key and content ("cached", still counted as free) until the pool needs
// them; allocation takes never-keyed free blocks first, then evicts the least recently
// released cached block.
//
// Counting: every block is either free (ref count 0: empty or cached) or used (ref count > 0).
// free + used == total always holds; CheckInvariants() verifies all internal structures.
#pragma once

#include <cstdint>
#include <list>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/types/span.h"

namespace moe {

// A sequence's KV blocks, owned by the sequence and edited only through the BlockManager.
struct BlockTable {
  // Physical block ids: token position p lives in blocks[p / block_size], p % block_size.
  std::vector<int32_t> blocks;
  // Chained hashes of the leading full blocks whose KV is computed: [num hashed blocks].
  // Kept per sequence (not read back from the blocks) because a block that duplicates a key
  // already in the cache stays unkeyed, while the chain must go on by content.
  std::vector<uint64_t> full_block_hashes;

  int32_t num_blocks() const { return static_cast<int32_t>(blocks.size()); }
};

struct BlockManagerCounters {
  int64_t prefix_queries = 0;     // AcquireCachedPrefix calls
  int64_t prefix_hit_blocks = 0;  // blocks reused from the cache
  int64_t prefix_hit_tokens = 0;  // tokens whose prefill those blocks skipped
  int64_t cache_evictions = 0;    // cached blocks given to another content
};

class BlockManager {
 public:
  static constexpr uint64_t kRootHash = 0x6d6f652d73657276ull;  // "moe-serv"

  BlockManager(int32_t num_blocks, int32_t block_size, bool enable_prefix_caching);

  BlockManager(const BlockManager&) = delete;
  BlockManager& operator=(const BlockManager&) = delete;

  int32_t num_blocks() const { return num_blocks_; }
  int32_t block_size() const { return block_size_; }
  bool prefix_caching_enabled() const { return enable_prefix_caching_; }

  // Blocks with ref count 0, including cached ones (they are reclaimable at any time).
  int32_t num_free_blocks() const {
    return static_cast<int32_t>(empty_blocks_.size() + cached_lru_.size());
  }
  // Blocks with ref count > 0.
  int32_t num_used_blocks() const { return num_used_; }
  // Free blocks that still hold a keyed prefix (evictable).
  int32_t num_cached_free_blocks() const { return static_cast<int32_t>(cached_lru_.size()); }
  // Blocks carrying a prefix key, used or free.
  int32_t num_keyed_blocks() const { return static_cast<int32_t>(hash_to_block_.size()); }
  const BlockManagerCounters& counters() const { return counters_; }
  int32_t ref_count(int32_t block_id) const { return blocks_[block_id].ref_count; }

  // Blocks needed to hold `num_tokens` tokens.
  int32_t BlocksFor(int64_t num_tokens) const {
    return static_cast<int32_t>((num_tokens + block_size_ - 1) / block_size_);
  }

  // For an empty `table`: finds the longest run of leading full blocks of `tokens` that are in
  // the cache, at most `max_blocks` of them, takes a reference on each and appends them (and
  // their hashes) to `table`. Returns the number of tokens covered (a multiple of block_size).
  // Returns 0 without lookup when prefix caching is off.
  // `block_hashes` (optional): a memo of the chained hashes of the leading full blocks of
  // `tokens`, kept by the caller while `tokens` only grows (a waiting sequence retried every
  // step), used and extended here so that each block is hashed once.
  int32_t AcquireCachedPrefix(absl::Span<const int32_t> tokens, int32_t max_blocks,
                              BlockTable& table, std::vector<uint64_t>* block_hashes = nullptr);

  // Whether `table` can grow to hold `num_tokens` tokens with the free blocks now available.
  bool CanGrowTo(const BlockTable& table, int64_t num_tokens) const {
    return BlocksFor(num_tokens) - table.num_blocks() <= num_free_blocks();
  }
  // Appends fresh blocks (ref count 1) so that `table` holds `num_tokens` tokens. Fails with
  // ResourceExhausted, changing nothing, when there are not enough free blocks.
  absl::Status GrowTo(BlockTable& table, int64_t num_tokens);

  // Keys the full blocks of `table` whose tokens [0, num_computed_tokens) now have their KV
  // written (`tokens` is the sequence's token ids, at least num_computed_tokens long).
  // A block whose key already names another block is left unkeyed (a duplicate).
  void CacheComputedBlocks(BlockTable& table, absl::Span<const int32_t> tokens,
                           int64_t num_computed_tokens);

  // Drops the table's references (last block first, so that the tail of a prefix is evicted
  // before its head) and clears it.
  void Release(BlockTable& table);

  // Drops every cached free block's key (they become plain empty blocks).
  void ResetPrefixCache();

  // Verifies ref counts, free lists, the hash index and free + used == total.
  absl::Status CheckInvariants() const;

  // The chained hash of one block of tokens.
  static uint64_t HashBlock(uint64_t parent_hash, absl::Span<const int32_t> block_tokens);

 private:
  static constexpr uint64_t kNoHash = 0;  // HashBlock never returns 0

  struct Block {
    int32_t ref_count = 0;
    uint64_t hash = kNoHash;
    uint64_t parent_hash = kNoHash;
    std::vector<int32_t> tokens;  // [block_size] when keyed: guards against hash collisions
    // Position in cached_lru_ while free and keyed.
    std::list<int32_t>::iterator lru_position;
    bool in_lru = false;
  };

  // Takes one free block (empty first, else the least recently used cached one).
  int32_t TakeFreeBlock();
  void AddRef(int32_t block_id);
  void DropRef(int32_t block_id);
  void Unkey(int32_t block_id);

  const int32_t num_blocks_;
  const int32_t block_size_;
  const bool enable_prefix_caching_;
  std::vector<Block> blocks_;                             // [num_blocks]
  std::vector<int32_t> empty_blocks_;                     // free, unkeyed (a stack)
  std::list<int32_t> cached_lru_;                         // free, keyed; front = evict first
  absl::flat_hash_map<uint64_t, int32_t> hash_to_block_;  // key -> block holding it
  int32_t num_used_ = 0;
  BlockManagerCounters counters_;
};

}  // namespace moe
