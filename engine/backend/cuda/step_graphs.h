// CUDA-graph replay of decode steps: the host-side bookkeeping, free of CUDA so that it is
// tested on machines without a GPU (tests/backend/step_graphs_test.cc).
//
// A launch is a closure that enqueues work on the backend's stream. In a step that may replay a
// graph (the CUDA backend: decode-only steps up to a size), launches are queued instead of run,
// each with the values it was built from (a name, device pointers, shapes, launch geometry);
// the step adds its context (metadata and scratch pointers) at the end. Together they form the
// step's key. Two steps with equal keys enqueue the same work on the same memory, so the graph
// captured from one replays the other: only what the memory holds differs (token ids,
// positions, block tables, uploaded before the graph runs).
#pragma once

#include <bit>
#include <concepts>
#include <cstdint>
#include <functional>
#include <initializer_list>
#include <list>
#include <optional>
#include <type_traits>
#include <utility>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/hash/hash.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "engine/common/status_macros.h"

namespace moe::cuda {

// One word of a step key: an integer, enum, float (its bits) or pointer (its address).
struct KeyWord {
  template <std::integral T>
  KeyWord(T value) : bits(static_cast<uint64_t>(value)) {}  // NOLINT(runtime/explicit)
  template <typename E>
  requires std::is_enum_v<E> KeyWord(E value)
      : bits(static_cast<uint64_t>(value)) {}                      // NOLINT(runtime/explicit)
  KeyWord(float value) : bits(std::bit_cast<uint32_t>(value)) {}   // NOLINT(runtime/explicit)
  KeyWord(double value) : bits(std::bit_cast<uint64_t>(value)) {}  // NOLINT(runtime/explicit)
  KeyWord(const void* pointer)                                     // NOLINT(runtime/explicit)
      : bits(reinterpret_cast<uintptr_t>(pointer)) {}
  uint64_t bits;
};

// The launches of one step: run as they come, or queued with their key.
class StepLaunches {
 public:
  using Launch = std::function<absl::Status()>;

  // Starts a step, dropping whatever a failed step left queued. `defer`: queue the launches
  // (the step may replay a graph).
  void Begin(bool defer) {
    launches_.clear();
    key_.clear();
    deferring_ = defer;
  }
  // Ends the step's queueing (its launches have run or been recorded).
  void End() { Begin(false); }
  bool deferring() const { return deferring_; }

  // Runs `launch` now, or queues it with `name` (a string literal: its address identifies the
  // call site) and the values it was built from.
  template <typename F>
  absl::Status Add(const char* name, std::initializer_list<KeyWord> key, F&& launch) {
    if (!deferring_) return launch();
    key_.push_back(reinterpret_cast<uintptr_t>(name));
    AppendKey(key);
    launches_.emplace_back(std::forward<F>(launch));
    return absl::OkStatus();
  }
  // Appends words to the key (a count first, so that no two word lists run together).
  void AppendKey(std::initializer_list<KeyWord> words) {
    key_.push_back(words.size());
    for (const KeyWord& word : words) key_.push_back(word.bits);
  }

  // Runs the queued launches in order, and the step's later launches as they come (the step
  // will not replay a graph): before anything that must see their effects, or that frees or
  // reallocates memory they were built on.
  absl::Status RunQueuedNow() {
    std::vector<Launch> launches = std::move(launches_);
    Begin(false);
    for (const Launch& launch : launches) RETURN_IF_ERROR(launch());
    return absl::OkStatus();
  }
  // Runs the queued launches in order and keeps them queued (what a capture records).
  absl::Status RunQueued() const {
    for (const Launch& launch : launches_) RETURN_IF_ERROR(launch());
    return absl::OkStatus();
  }
  const std::vector<uint64_t>& key() const { return key_; }
  size_t size() const { return launches_.size(); }

 private:
  bool deferring_ = false;
  std::vector<Launch> launches_;
  std::vector<uint64_t> key_;
};

// Graphs of past steps by key; beyond `capacity` keys, the least recently used is dropped.
// `Graph` is a move-only executable graph.
template <typename Graph>
class StepGraphCache {
 public:
  // Records what `launches` enqueue into a graph (stream capture) instead of running it.
  using Capture =
      std::function<absl::StatusOr<Graph>(const std::function<absl::Status()>& launches)>;
  using Replay = std::function<absl::Status(const Graph& graph)>;

  struct Counters {
    int64_t eager = 0;     // steps whose launches ran one by one
    int64_t captured = 0;  // graphs recorded
    int64_t replayed = 0;  // steps run as one graph launch (captured ones included)
    int64_t capture_failures = 0;
  };

  StepGraphCache(size_t capacity, Capture capture, Replay replay)
      : capacity_(capacity), capture_(std::move(capture)), replay_(std::move(replay)) {}

  // Runs the queued launches of `step`: replays the graph recorded for an equal key; captures
  // one if the key was seen before and replays it; otherwise runs them one by one. The first
  // sight of a key runs eagerly: a warm-up (lazily loaded kernels are loaded outside any
  // capture) that also keeps one-off steps from costing a capture. A failed capture runs the
  // launches eagerly instead, and that key is not captured again.
  absl::Status Run(const StepLaunches& step) {
    const std::vector<uint64_t>& key = step.key();
    const size_t hash = absl::HashOf(key);
    auto found = index_.find(hash);
    if (found != index_.end() && found->second->key == key) {
      entries_.splice(entries_.begin(), entries_, found->second);
      Entry& entry = entries_.front();
      if (!entry.graph.has_value() && entry.capturable) {
        absl::StatusOr<Graph> graph = capture_([&step] { return step.RunQueued(); });
        if (graph.ok()) {
          entry.graph.emplace(std::move(graph).value());
          ++counters_.captured;
        } else {
          entry.capturable = false;
          ++counters_.capture_failures;
        }
      }
      if (entry.graph.has_value()) {
        ++counters_.replayed;
        return replay_(*entry.graph);
      }
    } else {
      if (found != index_.end()) Erase(found->second);  // a hash collision: the new key wins
      entries_.push_front(Entry{key, hash, true, std::nullopt});
      index_[hash] = entries_.begin();
      if (entries_.size() > capacity_) Erase(std::prev(entries_.end()));
    }
    ++counters_.eager;
    return step.RunQueued();
  }

  // Drops every graph (their memory is about to go, or they would never match again).
  void Clear() {
    entries_.clear();
    index_.clear();
  }
  size_t size() const { return entries_.size(); }
  const Counters& counters() const { return counters_; }

 private:
  struct Entry {
    std::vector<uint64_t> key;
    size_t hash;
    bool capturable;
    std::optional<Graph> graph;
  };

  void Erase(typename std::list<Entry>::iterator entry) {
    index_.erase(entry->hash);
    entries_.erase(entry);
  }

  size_t capacity_;
  Capture capture_;
  Replay replay_;
  std::list<Entry> entries_;  // most recently used first
  absl::flat_hash_map<size_t, typename std::list<Entry>::iterator> index_;
  Counters counters_;
};

}  // namespace moe::cuda
