#include "common/threads/thread_pool.h"

#include <atomic>
#include <vector>

#include "gtest/gtest.h"

namespace lmps {
namespace {

TEST(ThreadPoolTest, RunsEveryTaskExactlyOnce) {
  for (int threads : {1, 2, 3, 8}) {
    ThreadPool pool(threads);
    EXPECT_EQ(pool.num_threads(), threads);
    for (int n : {0, 1, 2, 7, 64, 1000}) {
      std::vector<std::atomic<int>> hits(n);
      pool.ParallelFor(n, [&](int i) { hits[i].fetch_add(1); });
      for (int i = 0; i < n; ++i) {
        ASSERT_EQ(hits[i].load(), 1) << "threads=" << threads << " n=" << n;
      }
    }
  }
}

// Many short jobs back to back: a late worker must never run a task of a
// finished job, and ParallelFor must not return before its tasks finish.
TEST(ThreadPoolTest, BackToBackJobs) {
  ThreadPool pool(4);
  std::vector<int> data(64, 0);
  for (int round = 0; round < 20000; ++round) {
    pool.ParallelFor(static_cast<int>(data.size()),
                     [&](int i) { data[i] += 1; });
  }
  for (int v : data) EXPECT_EQ(v, 20000);
}

TEST(ThreadPoolTest, NonPositiveThreadCountMeansOne) {
  ThreadPool pool(0);
  EXPECT_EQ(pool.num_threads(), 1);
  int sum = 0;
  pool.ParallelFor(5, [&](int i) { sum += i; });
  EXPECT_EQ(sum, 10);
}

TEST(ParallelForBlocksTest, EveryBlockOnceNumberedPartByPart) {
  const std::vector<int64_t> sizes = {5, 0, 4, 1};
  EXPECT_EQ(NumBlocks(sizes, 2), 3 + 0 + 2 + 1);
  for (ThreadPool* pool : {static_cast<ThreadPool*>(nullptr), new ThreadPool(3)}) {
    std::vector<std::vector<int>> owner = {std::vector<int>(5, -1), {},
                                           std::vector<int>(4, -1), {-1}};
    std::vector<std::atomic<int>> runs(6);
    ParallelForBlocks(pool, sizes, 2,
                      [&](int task, int part, int64_t begin, int64_t end) {
                        runs[task].fetch_add(1);
                        for (int64_t i = begin; i < end; ++i) {
                          owner[part][i] = task;
                        }
                      });
    for (auto& r : runs) EXPECT_EQ(r.load(), 1);
    EXPECT_EQ(owner[0], (std::vector<int>{0, 0, 1, 1, 2}));
    EXPECT_EQ(owner[2], (std::vector<int>{3, 3, 4, 4}));
    EXPECT_EQ(owner[3], (std::vector<int>{5}));
    delete pool;
  }
}

}  // namespace
}  // namespace lmps
