#include "engine/backend/cpu/thread_pool.h"

#include <algorithm>

namespace moe::cpu {

ThreadPool::ThreadPool(int32_t num_threads) {
  const int32_t threads = std::max(1, num_threads);
  for (int32_t i = 1; i < threads; ++i) {
    workers_.emplace_back([this, i] { WorkerLoop(i); });
  }
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stopping_ = true;
  }
  work_ready_.notify_all();
  for (std::thread& worker : workers_) worker.join();
}

void ThreadPool::RunShare(int32_t thread_index) {
  // Split [0, count) into num_threads() ranges aligned to grain.
  const int64_t chunks = (count_ + grain_ - 1) / grain_;
  const int64_t threads = num_threads();
  const int64_t first_chunk = chunks * thread_index / threads;
  const int64_t last_chunk = chunks * (thread_index + 1) / threads;
  const int64_t begin = std::min(count_, first_chunk * grain_);
  const int64_t end = std::min(count_, last_chunk * grain_);
  if (begin < end) (*body_)(begin, end);
}

void ThreadPool::ParallelFor(int64_t count, int64_t grain,
                             const std::function<void(int64_t, int64_t)>& body) {
  if (count <= 0) return;
  grain = std::max<int64_t>(1, grain);
  if (workers_.empty() || count <= grain) {
    body(0, count);
    return;
  }
  {
    std::lock_guard<std::mutex> lock(mutex_);
    body_ = &body;
    count_ = count;
    grain_ = grain;
    pending_ = static_cast<int32_t>(workers_.size());
    ++generation_;
  }
  work_ready_.notify_all();
  RunShare(0);
  std::unique_lock<std::mutex> lock(mutex_);
  work_done_.wait(lock, [this] { return pending_ == 0; });
  body_ = nullptr;
}

void ThreadPool::WorkerLoop(int32_t worker_index) {
  uint64_t seen_generation = 0;
  while (true) {
    {
      std::unique_lock<std::mutex> lock(mutex_);
      work_ready_.wait(lock, [&] { return stopping_ || generation_ != seen_generation; });
      if (stopping_) return;
      seen_generation = generation_;
    }
    RunShare(worker_index);
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (--pending_ == 0) work_done_.notify_one();
    }
  }
}

}  // namespace moe::cpu
