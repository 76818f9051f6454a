// CommScheduler: the dispatch rule (priority, credits, lanes, strict
// priority) as a pure function, and the pool running transfers in that
// order within the credit.
#include "worker/comm_scheduler.h"

#include <map>
#include <string>
#include <vector>

#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "gtest/gtest.h"

namespace lmps {
namespace {

std::function<int(int)> Busy(std::map<int, int> busy) {
  return [busy](int lane) {
    auto it = busy.find(lane);
    return it == busy.end() ? 0 : it->second;
  };
}

TEST(CommSchedulerTest, NextTransferFollowsPriorityCreditsAndLanes) {
  const CommSchedulerOptions o{.credit_bytes = 100, .max_per_lane = 1,
                               .threads = 4};
  // Nothing queued.
  EXPECT_EQ(NextTransfer({}, 0, 0, Busy({}), o), -1);
  // The first in priority order that fits.
  EXPECT_EQ(NextTransfer({{60, 0}, {10, 1}}, 0, 0, Busy({}), o), 0);
  // Larger than the credit: goes alone when nothing is in flight...
  EXPECT_EQ(NextTransfer({{250, 0}}, 0, 0, Busy({}), o), 0);
  // ...and waits otherwise.
  EXPECT_EQ(NextTransfer({{250, 0}}, 10, 1, Busy({{1, 1}}), o), -1);
  // Strict priority: the 10-byte transfer would fit beside the 60 in
  // flight but the queued 60 ahead of it does not, so neither starts.
  EXPECT_EQ(NextTransfer({{60, 0}, {10, 1}}, 60, 1, Busy({{2, 1}}), o), -1);
  // A transfer whose lane is full is passed over: the next lane's goes.
  EXPECT_EQ(NextTransfer({{10, 0}, {10, 1}}, 10, 1, Busy({{0, 1}}), o), 1);
  // Two per lane allowed.
  CommSchedulerOptions two = o;
  two.max_per_lane = 2;
  EXPECT_EQ(NextTransfer({{10, 0}}, 10, 1, Busy({{0, 1}}), two), 0);
  EXPECT_EQ(NextTransfer({{10, 0}}, 20, 2, Busy({{0, 2}}), two), -1);
}

TEST(CommSchedulerTest, RunsQueuedTransfersInPriorityOrder) {
  CommScheduler s({.credit_bytes = 1 << 20, .max_per_lane = 8, .threads = 1});
  absl::Notification started, gate;
  absl::Mutex mu;
  std::vector<std::string> order;
  auto record = [&](std::string name) {
    return [&, name] {
      absl::MutexLock lock(&mu);
      order.push_back(name);
    };
  };
  // Holds the only thread while the others queue.
  s.Submit(0, 1, 0, [&] {
    started.Notify();
    gate.WaitForNotification();
  });
  started.WaitForNotification();
  s.Submit(5, 1, 0, record("push of block 4"));
  s.Submit(1, 1, 1, record("pull of embeddings"));
  s.Submit(3, 1, 0, record("pull of block 2"));
  s.Submit(1, 1, 0, record("pull of embeddings, shard 0"));
  gate.Notify();
  s.WaitIdle();
  EXPECT_EQ(order, (std::vector<std::string>{
                       "pull of embeddings", "pull of embeddings, shard 0",
                       "pull of block 2", "push of block 4"}));
}

TEST(CommSchedulerTest, KeepsBytesInFlightWithinTheCredit) {
  CommScheduler s({.credit_bytes = 100, .max_per_lane = 4, .threads = 4});
  absl::Mutex mu;
  int running = 0, most = 0;
  auto transfer = [&] {
    {
      absl::MutexLock lock(&mu);
      most = std::max(most, ++running);
    }
    absl::MutexLock lock(&mu);
    --running;
  };
  for (int i = 0; i < 20; ++i) s.Submit(i, 60, i % 4, transfer);
  s.WaitIdle();
  EXPECT_EQ(s.max_bytes_in_flight(), 60);  // one 60 at a time
  EXPECT_EQ(most, 1);
  s.Submit(0, 250, 0, transfer);  // alone, larger than the credit
  s.WaitIdle();
  EXPECT_EQ(s.max_bytes_in_flight(), 250);
}

}  // namespace
}  // namespace lmps
