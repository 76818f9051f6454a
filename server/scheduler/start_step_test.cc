#include "server/scheduler/start_step.h"

#include <string>

#include "absl/strings/match.h"
#include "gtest/gtest.h"

namespace lmps {
namespace {

TEST(ChooseStartStepTest, LatestStepEveryShardHoldsWithTheRightVersion) {
  EXPECT_EQ(ChooseStartStep({}, 7), 0);
  EXPECT_EQ(ChooseStartStep({{{}, 7}}, 7), 0);
  EXPECT_EQ(ChooseStartStep({{{50, 100, 150}, 7}}, 7), 150);
  EXPECT_EQ(ChooseStartStep({{{50, 100, 150}, 7}, {{100, 50}, 7}}, 7), 100);
  EXPECT_EQ(ChooseStartStep({{{50, 150}, 7}, {{100}, 7}}, 7), 0);
  // A shard with another partition version has no usable checkpoint.
  EXPECT_EQ(ChooseStartStep({{{50, 100}, 7}, {{50, 100}, 8}}, 7), 0);
  EXPECT_EQ(ChooseStartStep({{{-5, 20}, 7}, {{-5, 20}, 7}}, 7), 20);
}

TEST(ChooseStartStepTest, StepsWithEveryOldShardFileQualifyUnderAnyLayout) {
  // Layout changed (job version 9): own files of version 7 do not count,
  // complete sets of the old layout's files do.
  EXPECT_EQ(ChooseStartStep({{{50, 100}, 7, {50, 100}},
                             {{50, 100}, 7, {50, 100}},
                             {{}, 0, {50, 100}}},
                            9),
            100);
  // One new shard does not see step 100's complete set: 50.
  EXPECT_EQ(ChooseStartStep({{{50, 100}, 7, {50, 100}}, {{}, 0, {50}}}, 9),
            50);
  // One volume per shard (no complete set anywhere): nothing to resume.
  EXPECT_EQ(ChooseStartStep({{{50, 100}, 7, {}}, {{50, 100}, 7, {}}}, 9), 0);
  // Same layout: own files (one volume per shard) or complete sets (a
  // shared directory) or a mix of both.
  EXPECT_EQ(ChooseStartStep({{{50, 100}, 9, {}}, {{50, 100}, 9, {}}}, 9),
            100);
  EXPECT_EQ(ChooseStartStep({{{50, 100}, 9, {50, 100}}, {{}, 0, {50, 100}}},
                            9),
            100);
  EXPECT_EQ(ChooseStartStep({{{100}, 9, {}}, {{}, 0, {50, 100}}}, 9), 100);
  // A step written by the job's layout after an older relayout step.
  EXPECT_EQ(ChooseStartStep({{{150}, 9, {100, 150}}, {{150}, 9, {100}}}, 9),
            150);
  EXPECT_EQ(ChooseStartStep({{{}, 9, {-1}}}, 9), 0);
}

TEST(ExplainStartStepTest, NamesTheReasonForTheChoice) {
  EXPECT_EQ(ExplainStartStep({{{50, 100}, 9}, {{100}, 9}}, 9, 100),
            "latest checkpoint every shard holds, partition version 9");
  EXPECT_TRUE(absl::StrContains(
      ExplainStartStep({{{100}, 9, {}}, {{}, 0, {50, 100}}}, 9, 100),
      "every shard can load; shards [1] load it from the complete set"));
  EXPECT_TRUE(absl::StrContains(
      ExplainStartStep({{{50, 100}, 7, {}}, {{50, 100}, 7, {}}}, 9, 0),
      "servers hold checkpoints of another partition"));
  EXPECT_EQ(ExplainStartStep({{{50}, 9}, {{100}, 9}}, 9, 0),
            "no checkpoint step common to every shard with partition "
            "version 9");
}

}  // namespace
}  // namespace lmps
