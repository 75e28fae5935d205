#include "engine/kv/block_manager.h"

#include <algorithm>

#include "absl/strings/str_cat.h"

namespace moe {
namespace {

uint64_t Mix64(uint64_t x) {  // splitmix64 finaliser: a cheap, well-spread bijection
  x ^= x >> 30;
  x *= 0xbf58476d1ce4e5b9ull;
  x ^= x >> 27;
  x *= 0x94d049bb133111ebull;
  x ^= x >> 31;
  return x;
}

}  // namespace

BlockManager::BlockManager(int32_t num_blocks, int32_t block_size, bool enable_prefix_caching)
    : num_blocks_(num_blocks),
      block_size_(block_size),
      enable_prefix_caching_(enable_prefix_caching),
      blocks_(num_blocks) {
  empty_blocks_.reserve(num_blocks);
  // A stack popped from the back: hand out block 0 first.
  for (int32_t id = num_blocks - 1; id >= 0; --id) empty_blocks_.push_back(id);
}

uint64_t BlockManager::HashBlock(uint64_t parent_hash, absl::Span<const int32_t> block_tokens) {
  uint64_t h = Mix64(parent_hash ^ 0x9e3779b97f4a7c15ull);
  for (int32_t token : block_tokens) {
    h = Mix64(h ^ (static_cast<uint64_t>(static_cast<uint32_t>(token)) + 0x9e3779b97f4a7c15ull));
  }
  return h == kNoHash ? 1 : h;
}

int32_t BlockManager::AcquireCachedPrefix(absl::Span<const int32_t> tokens, int32_t max_blocks,
                                          BlockTable& table, std::vector<uint64_t>* block_hashes) {
  if (!enable_prefix_caching_ || !table.blocks.empty()) return 0;
  ++counters_.prefix_queries;
  const int32_t full_blocks =
      std::min<int64_t>(max_blocks, static_cast<int64_t>(tokens.size()) / block_size_);
  uint64_t parent = kRootHash;
  for (int32_t i = 0; i < full_blocks; ++i) {
    absl::Span<const int32_t> block_tokens = tokens.subspan(i * block_size_, block_size_);
    uint64_t h;
    if (block_hashes != nullptr && i < static_cast<int32_t>(block_hashes->size())) {
      h = (*block_hashes)[i];
    } else {
      h = HashBlock(parent, block_tokens);
      if (block_hashes != nullptr) block_hashes->push_back(h);  // i == size: blocks in order
    }
    auto it = hash_to_block_.find(h);
    if (it == hash_to_block_.end()) break;
    const Block& block = blocks_[it->second];
    if (block.parent_hash != parent || !std::equal(block.tokens.begin(), block.tokens.end(),
                                                   block_tokens.begin(), block_tokens.end())) {
      break;  // a hash collision: treat as a miss
    }
    AddRef(it->second);
    table.blocks.push_back(it->second);
    table.full_block_hashes.push_back(h);
    parent = h;
  }
  const int32_t hit_blocks = table.num_blocks();
  counters_.prefix_hit_blocks += hit_blocks;
  counters_.prefix_hit_tokens += static_cast<int64_t>(hit_blocks) * block_size_;
  return hit_blocks * block_size_;
}

absl::Status BlockManager::GrowTo(BlockTable& table, int64_t num_tokens) {
  const int32_t needed = BlocksFor(num_tokens) - table.num_blocks();
  if (needed <= 0) return absl::OkStatus();
  if (needed > num_free_blocks()) {
    return absl::ResourceExhaustedError(
        absl::StrCat("KV pool: need ", needed, " free blocks, have ", num_free_blocks()));
  }
  for (int32_t i = 0; i < needed; ++i) {
    const int32_t id = TakeFreeBlock();
    AddRef(id);
    table.blocks.push_back(id);
  }
  return absl::OkStatus();
}

void BlockManager::CacheComputedBlocks(BlockTable& table, absl::Span<const int32_t> tokens,
                                       int64_t num_computed_tokens) {
  if (!enable_prefix_caching_) return;
  const int64_t full_blocks =
      std::min<int64_t>(num_computed_tokens / block_size_, table.num_blocks());
  for (int64_t i = table.full_block_hashes.size(); i < full_blocks; ++i) {
    const uint64_t parent = i == 0 ? kRootHash : table.full_block_hashes[i - 1];
    absl::Span<const int32_t> block_tokens = tokens.subspan(i * block_size_, block_size_);
    const uint64_t h = HashBlock(parent, block_tokens);
    table.full_block_hashes.push_back(h);
    const int32_t id = table.blocks[i];
    Block& block = blocks_[id];
    if (block.hash != kNoHash) continue;       // already keyed (it came from the cache)
    if (hash_to_block_.contains(h)) continue;  // a duplicate of a cached block: stays unkeyed
    block.hash = h;
    block.parent_hash = parent;
    block.tokens.assign(block_tokens.begin(), block_tokens.end());
    hash_to_block_.emplace(h, id);
  }
}

void BlockManager::Release(BlockTable& table) {
  for (auto it = table.blocks.rbegin(); it != table.blocks.rend(); ++it) DropRef(*it);
  table.blocks.clear();
  table.full_block_hashes.clear();
}

void BlockManager::ResetPrefixCache() {
  while (!cached_lru_.empty()) {
    const int32_t id = cached_lru_.front();
    Unkey(id);
    empty_blocks_.push_back(id);
  }
}

int32_t BlockManager::TakeFreeBlock() {
  if (!empty_blocks_.empty()) {
    const int32_t id = empty_blocks_.back();
    empty_blocks_.pop_back();
    return id;
  }
  // Caller checked num_free_blocks() > 0, so the LRU list is not empty.
  const int32_t id = cached_lru_.front();
  Unkey(id);  // also removes it from the LRU list
  ++counters_.cache_evictions;
  return id;
}

void BlockManager::AddRef(int32_t block_id) {
  Block& block = blocks_[block_id];
  if (block.ref_count == 0) {
    if (block.in_lru) {
      cached_lru_.erase(block.lru_position);
      block.in_lru = false;
    }
    ++num_used_;
  }
  ++block.ref_count;
}

void BlockManager::DropRef(int32_t block_id) {
  Block& block = blocks_[block_id];
  if (--block.ref_count > 0) return;
  --num_used_;
  if (block.hash != kNoHash) {
    block.lru_position = cached_lru_.insert(cached_lru_.end(), block_id);
    block.in_lru = true;
  } else {
    empty_blocks_.push_back(block_id);
  }
}

void BlockManager::Unkey(int32_t block_id) {
  Block& block = blocks_[block_id];
  if (block.in_lru) {
    cached_lru_.erase(block.lru_position);
    block.in_lru = false;
  }
  if (block.hash != kNoHash) hash_to_block_.erase(block.hash);
  block.hash = kNoHash;
  block.parent_hash = kNoHash;
  block.tokens.clear();
}

absl::Status BlockManager::CheckInvariants() const {
  if (num_free_blocks() + num_used_blocks() != num_blocks_) {
    return absl::InternalError(absl::StrCat("KV pool: free ", num_free_blocks(), " + used ",
                                            num_used_blocks(), " != total ", num_blocks_));
  }
  int32_t used = 0;
  std::vector<int8_t> seen_free(num_blocks_, 0);
  for (int32_t id : empty_blocks_) {
    if (id < 0 || id >= num_blocks_ || seen_free[id]++) {
      return absl::InternalError(absl::StrCat("KV pool: empty list holds block ", id, " twice"));
    }
    if (blocks_[id].ref_count != 0 || blocks_[id].hash != kNoHash) {
      return absl::InternalError(absl::StrCat("KV pool: empty block ", id, " is in use or keyed"));
    }
  }
  for (int32_t id : cached_lru_) {
    if (id < 0 || id >= num_blocks_ || seen_free[id]++) {
      return absl::InternalError(absl::StrCat("KV pool: free lists hold block ", id, " twice"));
    }
    if (blocks_[id].ref_count != 0 || blocks_[id].hash == kNoHash || !blocks_[id].in_lru) {
      return absl::InternalError(absl::StrCat("KV pool: cached block ", id, " is inconsistent"));
    }
  }
  for (int32_t id = 0; id < num_blocks_; ++id) {
    const Block& block = blocks_[id];
    if (block.ref_count < 0) {
      return absl::InternalError(absl::StrCat("KV pool: block ", id, " has a negative ref count"));
    }
    if (block.ref_count > 0) ++used;
    if (block.ref_count == 0 && !seen_free[id]) {
      return absl::InternalError(absl::StrCat("KV pool: block ", id, " leaked (ref 0, not free)"));
    }
    if (block.hash != kNoHash) {
      auto it = hash_to_block_.find(block.hash);
      if (it == hash_to_block_.end() || it->second != id) {
        return absl::InternalError(absl::StrCat("KV pool: block ", id, " key not indexed"));
      }
    }
  }
  if (used != num_used_) {
    return absl::InternalError(
        absl::StrCat("KV pool: ", used, " blocks referenced but counter says ", num_used_));
  }
  for (const auto& [hash, id] : hash_to_block_) {
    if (blocks_[id].hash != hash) {
      return absl::InternalError(absl::StrCat("KV pool: index names block ", id, " wrongly"));
    }
  }
  return absl::OkStatus();
}

}  // namespace moe
