#include "worker/shard_failover.h"

#include <string>

#include "absl/strings/str_cat.h"

#include "gtest/gtest.h"

namespace lmps {
namespace {

const absl::Time kT0 = absl::FromUnixSeconds(1000);

TEST(ShardFailoverTest, AlternatesThenAsksWhereTheShardIsNow) {
  ShardFailover f(1, {"p:1", "b:1"}, absl::Seconds(10));
  int asked = 0;
  ShardFailover::Resolver resolve = [&]() -> absl::StatusOr<ShardFailover::Nodes> {
    ++asked;
    return ShardFailover::Nodes{"b:1", "p:2"};  // promoted, and a new backup
  };
  f.Begin(kT0);
  EXPECT_EQ(f.current(), "p:1");
  auto pause = f.Failed(absl::UnavailableError("down"), kT0, resolve);
  ASSERT_TRUE(pause.ok());
  EXPECT_EQ(*pause, absl::ZeroDuration());  // the first retry at once
  EXPECT_EQ(f.current(), "b:1");
  EXPECT_EQ(asked, 0);
  pause = f.Failed(absl::UnavailableError("not promoted yet"), kT0, resolve);
  ASSERT_TRUE(pause.ok());
  EXPECT_EQ(*pause, absl::Milliseconds(20));
  EXPECT_EQ(asked, 1);  // both known nodes failed
  EXPECT_EQ(f.current(), "b:1");  // the scheduler's primary
  EXPECT_EQ(f.nodes().backup, "p:2");
  pause = f.Failed(absl::UnavailableError("x"), kT0, resolve);
  EXPECT_EQ(*pause, absl::Milliseconds(40));
  EXPECT_EQ(f.current(), "p:2");
  EXPECT_EQ(f.switches(), 3);
}

TEST(ShardFailoverTest, NoKnownBackupAsksEveryRound) {
  ShardFailover f(0, {"p:1", ""}, absl::Seconds(10));
  int asked = 0;
  ShardFailover::Resolver resolve = [&]() -> absl::StatusOr<ShardFailover::Nodes> {
    ++asked;
    if (asked < 3) return absl::UnavailableError("scheduler down");
    return ShardFailover::Nodes{"p:1", "b:7"};
  };
  f.Begin(kT0);
  for (int i = 0; i < 3; ++i) {
    ASSERT_TRUE(f.Failed(absl::UnavailableError("x"), kT0, resolve).ok());
    EXPECT_EQ(f.current(), "p:1");
  }
  EXPECT_EQ(asked, 3);
  ASSERT_TRUE(f.Failed(absl::UnavailableError("x"), kT0, resolve).ok());
  EXPECT_EQ(f.current(), "b:7");
}

TEST(ShardFailoverTest, PausesGrowToOneSecondAndTheDeadlineNamesTheAnswers) {
  ShardFailover f(3, {"p:1", "b:1"}, absl::Seconds(60));
  f.Begin(kT0);
  absl::Time now = kT0;
  absl::Duration last;
  for (int i = 0; i < 12; ++i) {
    auto pause = f.Failed(absl::UnavailableError(absl::StrCat("no ", i)), now,
                          nullptr);
    ASSERT_TRUE(pause.ok());
    last = *pause;
    now += *pause;
  }
  EXPECT_EQ(last, absl::Seconds(1));
  auto end = f.Failed(absl::UnavailableError("final"), kT0 + absl::Seconds(60),
                      nullptr);
  ASSERT_EQ(end.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_NE(end.status().message().find("replicated shard 3"), std::string::npos);
  EXPECT_NE(end.status().message().find("final"), std::string::npos)
      << end.status();
  // A new call starts a new deadline and pause sequence.
  f.Begin(kT0 + absl::Seconds(61));
  EXPECT_EQ(*f.Failed(absl::UnavailableError("x"), kT0 + absl::Seconds(61),
                      nullptr),
            absl::ZeroDuration());
}

}  // namespace
}  // namespace lmps
