#include "common/threads/thread_pool.h"

#include <algorithm>
#include <chrono>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define LMPS_CPU_RELAX() _mm_pause()
#else
#define LMPS_CPU_RELAX() \
  do {                   \
  } while (0)
#endif

namespace lmps {
namespace {

// How long an idle worker, and a caller waiting for the last tasks, spin
// before sleeping (worker) or yielding the core (caller).
constexpr std::chrono::microseconds kSpinTime(200);

}  // namespace

ThreadPool::ThreadPool(int num_threads)
    : num_threads_(num_threads < 1 ? 1 : num_threads) {
  workers_.reserve(num_threads_ - 1);
  for (int i = 1; i < num_threads_; ++i) {
    workers_.emplace_back([this] { WorkerLoop(); });
  }
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  work_cv_.notify_all();
  for (std::thread& t : workers_) t.join();
}

void ThreadPool::RunTasks(const Job& job) {
  const uint64_t gen = static_cast<uint64_t>(job.generation) << 32;
  uint64_t cur = next_.load(std::memory_order_acquire);
  while (true) {
    if ((cur & ~uint64_t{0xffffffff}) != gen) return;  // a newer job
    const uint32_t index = static_cast<uint32_t>(cur);
    if (index >= static_cast<uint32_t>(job.n)) return;  // all claimed
    if (next_.compare_exchange_weak(cur, cur + 1, std::memory_order_acq_rel,
                                    std::memory_order_acquire)) {
      (*job.fn)(static_cast<int>(index));
      done_.fetch_add(1, std::memory_order_acq_rel);
      cur = next_.load(std::memory_order_acquire);
    }
  }
}

void ThreadPool::WorkerLoop() {
  uint32_t seen = 0;
  while (true) {
    // Spin briefly for the next job, then sleep.
    const auto spin_until = std::chrono::steady_clock::now() + kSpinTime;
    int polls = 0;
    while (generation_.load(std::memory_order_acquire) == seen) {
      LMPS_CPU_RELAX();
      if (++polls % 64 == 0 && std::chrono::steady_clock::now() > spin_until) {
        break;
      }
    }
    Job job;
    {
      std::unique_lock<std::mutex> lock(mu_);
      if (job_.generation == seen && !stop_) {
        ++sleepers_;
        work_cv_.wait(lock,
                      [&] { return stop_ || job_.generation != seen; });
        --sleepers_;
      }
      if (stop_) return;
      job = job_;
    }
    seen = job.generation;
    RunTasks(job);
  }
}

void ThreadPool::ParallelFor(int n, absl::FunctionRef<void(int)> fn) {
  if (n <= 0) return;
  if (n == 1 || num_threads_ == 1) {
    for (int i = 0; i < n; ++i) fn(i);
    return;
  }
  Job job;
  bool wake = false;
  {
    std::lock_guard<std::mutex> lock(mu_);
    job.fn = &fn;
    job.n = n;
    job.generation = job_.generation + 1;
    done_.store(0, std::memory_order_relaxed);
    next_.store(static_cast<uint64_t>(job.generation) << 32,
                std::memory_order_release);
    job_ = job;
    generation_.store(job.generation, std::memory_order_release);
    wake = sleepers_ > 0;
  }
  if (wake) work_cv_.notify_all();
  RunTasks(job);
  // Wait for tasks still running on workers.
  const auto spin_until = std::chrono::steady_clock::now() + kSpinTime;
  int polls = 0;
  while (done_.load(std::memory_order_acquire) < n) {
    LMPS_CPU_RELAX();
    if (++polls % 64 == 0 && std::chrono::steady_clock::now() > spin_until) {
      std::this_thread::yield();
    }
  }
}

int64_t NumBlocks(absl::Span<const int64_t> sizes, int64_t block) {
  int64_t n = 0;
  for (int64_t size : sizes) n += (size + block - 1) / block;
  return n;
}

void ParallelForBlocks(
    ThreadPool* pool, absl::Span<const int64_t> sizes, int64_t block,
    absl::FunctionRef<void(int task, int part, int64_t begin, int64_t end)>
        fn) {
  struct Block {
    int part;
    int64_t begin;
    int64_t end;
  };
  std::vector<Block> blocks;
  blocks.reserve(NumBlocks(sizes, block));
  for (size_t p = 0; p < sizes.size(); ++p) {
    for (int64_t b = 0; b < sizes[p]; b += block) {
      blocks.push_back({static_cast<int>(p), b, std::min(sizes[p], b + block)});
    }
  }
  const auto run = [&](int i) {
    fn(i, blocks[i].part, blocks[i].begin, blocks[i].end);
  };
  if (pool == nullptr || blocks.size() < 2) {
    for (size_t i = 0; i < blocks.size(); ++i) run(static_cast<int>(i));
    return;
  }
  pool->ParallelFor(static_cast<int>(blocks.size()), run);
}

}  // namespace lmps
