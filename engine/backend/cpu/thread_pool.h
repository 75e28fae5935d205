// A fixed pool of worker threads for data-parallel loops. The calling thread takes part, so a
// pool of N threads starts N - 1 workers.
#pragma once

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

  // Runs body(begin, end) over [0, count) split into contiguous ranges, one per thread, each
  // a multiple of `grain` long (but the last). Returns when all ranges are done.
  void ParallelFor(int64_t count, int64_t grain,
                   const std::function<void(int64_t begin, int64_t end)>& body);

 private:
  void WorkerLoop(int32_t worker_index);
  void RunShare(int32_t thread_index);

  std::vector<std::thread> workers_;
  std::mutex mutex_;
  std::condition_variable work_ready_;
  std::condition_variable work_done_;
  uint64_t generation_ = 0;
  int32_t pending_ = 0;
  bool stopping_ = false;
  // The current loop.
  const std::function<void(int64_t, int64_t)>* body_ = nullptr;
  int64_t count_ = 0;
  int64_t grain_ = 1;
};

}  // namespace moe::cpu
