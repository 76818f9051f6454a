#include "common/rpc/stop_signal.h"

#include <thread>

#include "absl/time/time.h"
#include "gtest/gtest.h"

namespace lmps {
namespace {

TEST(StopSignalTest, CallbackRunsOnceOnStop) {
  StopSignal stop;
  int cancelled = 0;
  stop.OnStop([&] { ++cancelled; });
  EXPECT_FALSE(stop.stopped());
  EXPECT_FALSE(stop.WaitFor(absl::Milliseconds(1)));
  stop.Stop();
  stop.Stop();
  EXPECT_EQ(cancelled, 1);
  EXPECT_TRUE(stop.stopped());
  EXPECT_TRUE(stop.WaitFor(absl::Seconds(10)));
}

TEST(StopSignalTest, RegisteringAfterTheStopRunsAtOnce) {
  StopSignal stop;
  stop.Stop();
  int cancelled = 0;
  stop.OnStop([&] { ++cancelled; });
  EXPECT_EQ(cancelled, 1);
  stop.Stop();
  EXPECT_EQ(cancelled, 1);
}

TEST(StopSignalTest, ClearedOrReplacedCallbackNeverRuns) {
  StopSignal stop;
  int first = 0, second = 0;
  stop.OnStop([&] { ++first; });
  stop.OnStop([&] { ++second; });
  stop.Stop();
  EXPECT_EQ(first, 0);
  EXPECT_EQ(second, 1);
  StopSignal other;
  other.OnStop([&] { ++first; });
  other.OnStop(nullptr);
  other.Stop();
  EXPECT_EQ(first, 0);
}

TEST(StopSignalTest, StopFromAnotherThreadWakesTheWaiter) {
  StopSignal stop;
  std::thread t([&] { stop.Stop(); });
  EXPECT_TRUE(stop.WaitFor(absl::Seconds(60)));
  t.join();
}

}  // namespace
}  // namespace lmps
