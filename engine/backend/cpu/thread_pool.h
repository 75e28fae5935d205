// A fixed pool of worker threads for data-parallel loops. The calling thread takes part, so a
// pool of N threads starts N - 1 workers.
//
// A forward step runs ~60 short parallel loops, so the hand-off is built for latency: workers
// spin on an atomic generation counter for a while after each loop (then sleep on a condition
// variable), the caller spins until the loop is done, and the work is split into a few
// grain-aligned pieces per thread that threads claim from an atomic counter (a thread that is
// descheduled on a shared machine delays the loop by one piece, not by a whole share).
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace moe::cpu {

class ThreadPool {
 public:
  explicit ThreadPool(int32_t num_threads);
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;
  ~ThreadPool();

  int32_t num_threads() const { return static_cast<int32_t>(workers_.size()) + 1; }

  // Runs body(begin, end) over [0, count) split into contiguous ranges, each a multiple of
  // `grain` long (but the last), on all threads. Returns when all ranges are done. Ranges
  // never overlap; which thread runs which range is not fixed.
  void ParallelFor(int64_t count, int64_t grain,
                   const std::function<void(int64_t begin, int64_t end)>& body);

 private:
  // state_ packs (generation << 40) | (num_pieces << 20) | next_piece: a piece is claimed by
  // a compare-and-swap that also checks the generation, so a worker that wakes up late can
  // never claim a piece of a later loop, and the caller waits for pieces, not for workers.
  static constexpr int kPieceBits = 20;
  static constexpr uint64_t kPieceMask = (uint64_t{1} << kPieceBits) - 1;
  static uint64_t Generation(uint64_t state) { return state >> (2 * kPieceBits); }

  void WorkerLoop();
  // Claims and runs pieces of the loop of `generation` until none is left.
  void RunPieces(uint64_t generation);

  std::vector<std::thread> workers_;
  alignas(64) std::atomic<uint64_t> state_{0};
  alignas(64) std::atomic<int64_t> done_pieces_{0};
  std::mutex mutex_;
  std::condition_variable wake_;
  int32_t sleeping_ = 0;  // guarded by mutex_
  std::atomic<bool> stopping_{false};
  // The current loop; written by the caller only while no piece of a loop is running.
  const std::function<void(int64_t, int64_t)>* body_ = nullptr;
  int64_t count_ = 0;
  int64_t piece_length_ = 1;
};

}  // namespace moe::cpu
