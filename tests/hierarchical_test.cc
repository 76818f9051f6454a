// train.workers_per_host (hierarchical aggregation, worker/trainer.h): 4
// workers in host groups of 2 -- each group sums its gradients over its
// ring and its leader pushes the group's mean, the leader pulls and shares
// -- reach the parameters of one worker with one shard, and of dp = 4
// pushing each, within equivalence_test's tolerance (2e-5 after 4 steps:
// only the order of the float summation differs), with AdamW and plain SGD
// (whose update is proportional to the gradient, so a wrong 1/W or 1/dp
// factor moves parameters by ~1e-2). The shards receive half the bytes of
// dp = 4: one push and one pull per host. (The multi-host version, with
// two network namespaces as hosts: multihost_netns_test.sh.)
#include <cmath>
#include <string>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "tests/test_util.h"

namespace lmps::testing {
namespace {

constexpr double kTolerance = 2e-5;

struct TrainedRun {
  FinalProgress progress;
  std::string model;  // model.safetensors
};

TrainedRun Train(const std::string& name, int workers, const std::string& optimizer,
          const std::string& train) {
  TrainedRun r;
  r.progress = RunLocalJob(name, SmallAggregationJob(optimizer, train),
                           {absl::StrCat("--workers=", workers),
                            workers == 1 ? "--shards=1" : "--shards=2"},
                           4);
  r.model = r.progress.run_dir + "/model.safetensors";
  return r;
}

class HierarchicalTest : public ::testing::TestWithParam<bool> {};

TEST_P(HierarchicalTest, MatchesOneWorkerAndFlatDataParallel) {
  const bool sgd = GetParam();
  const std::string optimizer =
      sgd ? "type: SGD lr: 0.5 momentum: -1 weight_decay: -1 grad_clip: -1"
          : "lr: 0.001";
  const std::string tag = sgd ? "_sgd" : "_adamw";
  const TrainedRun one = Train("one" + tag, 1, optimizer, "");
  const TrainedRun flat = Train("flat" + tag, 4, optimizer, "");
  const TrainedRun hier = Train("hier" + tag, 4, optimizer, "workers_per_host: 2");
  for (const TrainedRun* ref : {&one, &flat}) {
    auto diff = MaxAbsDiffOfFiles(ref->model, hier.model);
    ASSERT_TRUE(diff.ok()) << diff.status();
    EXPECT_LE(*diff, kTolerance) << ref->model;
  }
  auto moved = MaxAbsDiffOfFiles(one.model, flat.model);
  ASSERT_TRUE(moved.ok()) << moved.status();
  EXPECT_LT(*moved, kTolerance);  // one worker = flat dp 4 (equivalence_test)
  // One push and one pull per host: half of dp = 4's bytes.
  EXPECT_NEAR(hier.progress.push_bytes, flat.progress.push_bytes / 2,
              0.01 * flat.progress.push_bytes);
  EXPECT_NEAR(hier.progress.pull_bytes, flat.progress.pull_bytes / 2,
              0.01 * flat.progress.pull_bytes);
  EXPECT_GT(hier.progress.push_bytes, 0);
}

INSTANTIATE_TEST_SUITE_P(Optimizers, HierarchicalTest, ::testing::Bool(),
                         [](const auto& info) {
                           return std::string(info.param ? "sgd" : "adamw");
                         });

// Invalid combinations fail at submission with the reason (the cases:
// common/model/job_spec_test.cc).
// A dead group leader (killed mid-push): its group's ring fails, the
// scheduler regroups the job at that step and a replacement takes the rank.
TEST(HierarchicalFaultTest, DeadWorkerIsReplacedExactly) {
  ExpectDeadWorkerReplacedExactly("hier_kill", "workers_per_host: 2", 4);
}

TEST(HierarchicalRejectTest, SubmissionSaysWhy) {
  const std::string dir = TempDir("hier_bad");
  WriteFile(dir + "/job.textproto",
            SmallAggregationJob("lr: 0.001", "workers_per_host: 3"));
  CommandResult r = RunCommand(
      {BinaryPath("launcher/lmps_local"), "--job=" + dir + "/job.textproto",
       "--run_dir=" + dir, "--workers=4", "--shards=1", "--quiet"},
      120);
  EXPECT_NE(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("train.workers_per_host 3 (hierarchical "
                          "aggregation) must divide layout.dp 4"),
            std::string::npos)
      << r.output;
}

}  // namespace
}  // namespace lmps::testing
