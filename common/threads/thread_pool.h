// ThreadPool: a small fork-join pool (the CPU backend's kernels, the parameter
// shards' gradient norm and optimizer step).
//
// ParallelFor(n, fn) runs fn(0) .. fn(n-1) on the calling thread and
// num_threads - 1 worker threads and returns when all have finished. Tasks
// are handed out one at a time from a shared counter, so when another
// process preempts one of our threads the others take over its share
// instead of waiting for it (a static split, like OpenMP's default, stalls
// every region for a whole scheduler time slice: on a shared 2-core machine
// that made a training step 8x slower). Idle workers spin for a short
// while (to start the next region fast) and then sleep on a condition
// variable, so an idle pool costs no CPU.
//
// Which thread runs a task is unspecified; kernels that reduce must keep
// per-task (not per-thread) partial results to stay deterministic.
//
// Thread-safety: ParallelFor may be called by one thread at a time and is
// not reentrant (fn must not call ParallelFor on the same pool).
#ifndef LMPS_COMMON_THREADS_THREAD_POOL_H_
#define LMPS_COMMON_THREADS_THREAD_POOL_H_

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <thread>
#include <vector>

#include "absl/functional/function_ref.h"
#include "absl/types/span.h"

namespace lmps {

class ThreadPool {
 public:
  // num_threads >= 1 counts the calling thread: num_threads - 1 workers.
  explicit ThreadPool(int num_threads);
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;
  ~ThreadPool();

  int num_threads() const { return num_threads_; }

  // Runs fn(i) for every i in [0, n) exactly once; returns when all are done.
  void ParallelFor(int n, absl::FunctionRef<void(int)> fn);

 private:
  // One posted job. Workers copy it under mu_; the packed counter below
  // tells them whether it is still the current one.
  struct Job {
    const absl::FunctionRef<void(int)>* fn = nullptr;
    int n = 0;
    uint32_t generation = 0;
  };

  void WorkerLoop();
  // Claims and runs tasks of `job` until none is left or a newer job has
  // been posted.
  void RunTasks(const Job& job);

  const int num_threads_;
  std::vector<std::thread> workers_;

  std::mutex mu_;
  std::condition_variable work_cv_;
  Job job_;              // guarded by mu_
  int sleepers_ = 0;     // guarded by mu_
  bool stop_ = false;    // guarded by mu_

  // (generation << 32) | next task index: claiming a task is a CAS that
  // fails once the job is replaced, so a late worker never runs a stale
  // task.
  std::atomic<uint64_t> next_{0};
  std::atomic<uint32_t> generation_{0};  // mirrors job_.generation
  std::atomic<int> done_{0};             // tasks finished in this job
};

// Block-wise work over several arrays ("parts" of sizes[p] elements): the
// blocks are [k * block, min((k + 1) * block, size)) of each part, numbered
// part by part, block by block (0 .. NumBlocks - 1). ParallelForBlocks runs
// fn(task, part, begin, end) once per block on `pool` (nullptr: one by one
// on the calling thread, in order). Which thread runs a block varies; the
// blocks themselves do not, so per-block results combined in task order
// are the same for every pool size.
int64_t NumBlocks(absl::Span<const int64_t> sizes, int64_t block);
void ParallelForBlocks(
    ThreadPool* pool, absl::Span<const int64_t> sizes, int64_t block,
    absl::FunctionRef<void(int task, int part, int64_t begin, int64_t end)>
        fn);

}  // namespace lmps

#endif  // LMPS_COMMON_THREADS_THREAD_POOL_H_
