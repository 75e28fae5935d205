#include "engine/backend/cpu/thread_pool.h"

#include <algorithm>
#include <chrono>
#include <cstdlib>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define MOE_CPU_RELAX() _mm_pause()
#else
#define MOE_CPU_RELAX() std::this_thread::yield()
#endif

namespace moe::cpu {
namespace {

// How long an idle worker spins before it sleeps: covers the serial gaps between the loops
// of one forward step (MOE_CPU_SPIN_US overrides it). Short on purpose: on a machine shared with
// other work, a long spin takes CPU time that the step's other thread needs (measured: 2 ms of
// spinning cost a third of single-sequence decode speed at load average 5 on 2 cores).
std::chrono::microseconds SpinTime() {
  static const std::chrono::microseconds value{
      std::getenv("MOE_CPU_SPIN_US") != nullptr ? std::atoi(std::getenv("MOE_CPU_SPIN_US")) : 100};
  return value;
}
// Pieces per thread: enough to absorb a thread losing its core for a while, few enough that
// each piece streams a long contiguous run of weight rows.
constexpr int64_t kPiecesPerThread = 4;

}  // namespace

ThreadPool::ThreadPool(int32_t num_threads) {
  const int32_t threads = std::max(1, num_threads);
  for (int32_t i = 1; i < threads; ++i) {
    workers_.emplace_back([this] { WorkerLoop(); });
  }
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stopping_.store(true, std::memory_order_relaxed);
    const uint64_t generation = Generation(state_.load(std::memory_order_relaxed)) + 1;
    state_.store(generation << (2 * kPieceBits), std::memory_order_release);
  }
  wake_.notify_all();
  for (std::thread& worker : workers_) worker.join();
}

void ThreadPool::RunPieces(uint64_t generation) {
  uint64_t state = state_.load(std::memory_order_acquire);
  while (true) {
    if (Generation(state) != generation) return;
    const uint64_t next = state & kPieceMask;
    const uint64_t pieces = (state >> kPieceBits) & kPieceMask;
    if (next >= pieces) return;
    if (!state_.compare_exchange_weak(state, state + 1, std::memory_order_acq_rel,
                                      std::memory_order_acquire)) {
      continue;  // state reloaded
    }
    const int64_t begin = static_cast<int64_t>(next) * piece_length_;
    const int64_t end = std::min(count_, begin + piece_length_);
    (*body_)(begin, end);
    done_pieces_.fetch_add(1, std::memory_order_acq_rel);
    state = state_.load(std::memory_order_acquire);
  }
}

void ThreadPool::ParallelFor(int64_t count, int64_t grain,
                             const std::function<void(int64_t, int64_t)>& body) {
  if (count <= 0) return;
  grain = std::max<int64_t>(1, grain);
  if (workers_.empty() || count <= grain) {
    body(0, count);
    return;
  }
  const int64_t chunks = (count + grain - 1) / grain;
  const int64_t wanted = std::min<int64_t>(chunks, num_threads() * kPiecesPerThread);
  const int64_t chunks_per_piece = (chunks + wanted - 1) / wanted;
  body_ = &body;
  count_ = count;
  piece_length_ = chunks_per_piece * grain;
  const int64_t pieces = (count + piece_length_ - 1) / piece_length_;
  done_pieces_.store(0, std::memory_order_relaxed);
  const uint64_t generation = Generation(state_.load(std::memory_order_relaxed)) + 1;
  state_.store((generation << (2 * kPieceBits)) | (static_cast<uint64_t>(pieces) << kPieceBits),
               std::memory_order_release);
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (sleeping_ > 0) wake_.notify_all();
  }
  RunPieces(generation);
  int64_t spins = 0;
  while (done_pieces_.load(std::memory_order_acquire) != pieces) {
    // A worker lost its core in the middle of a piece: stop burning ours so it can run.
    if (++spins > 4096) {
      std::this_thread::yield();
    } else {
      MOE_CPU_RELAX();
    }
  }
}

void ThreadPool::WorkerLoop() {
  uint64_t seen = 0;  // generation at construction; loops may start before this thread does
  while (true) {
    // Spin, then sleep, until the generation moves.
    uint64_t current = Generation(state_.load(std::memory_order_acquire));
    if (current == seen) {
      const auto deadline = std::chrono::steady_clock::now() + SpinTime();
      for (int64_t spin = 1; current == seen; ++spin) {
        MOE_CPU_RELAX();
        current = Generation(state_.load(std::memory_order_acquire));
        if ((spin & 255) == 0 && std::chrono::steady_clock::now() > deadline) break;
      }
      if (current == seen) {
        std::unique_lock<std::mutex> lock(mutex_);
        ++sleeping_;
        wake_.wait(lock, [&] {
          current = Generation(state_.load(std::memory_order_acquire));
          return current != seen;
        });
        --sleeping_;
      }
    }
    seen = current;
    if (stopping_.load(std::memory_order_relaxed)) return;
    RunPieces(current);
  }
}

}  // namespace moe::cpu
