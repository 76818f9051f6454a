// train.dp_aggregation RING_ALLREDUCE (worker/trainer.h): dp replicas
// averaging their gradients by a ring all-reduce and each running the
// optimizer reach the same parameters (exported from the shards, which dp
// rank 0 keeps up to date) as one worker with one shard in the parameter-
// server mode, within equivalence_test's tolerance (2e-5 after 4 steps:
// only the order of the float summation differs), with AdamW and plain SGD
// (whose update is proportional to the gradient, so a wrong 1/dp factor
// moves parameters by ~1e-2). Also: a run stopped at a checkpoint resumes
// exactly, with the optimizer state read back from the shards, and invalid
// combinations are rejected at submission with the reason.
#include <map>
#include <string>
#include <tuple>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_replace.h"
#include "common/formats/safetensors.h"
#include "gtest/gtest.h"
#include "tests/test_util.h"

namespace lmps::testing {
namespace {

constexpr double kTolerance = 2e-5;

constexpr char kAdamW[] = "lr: 0.001";
constexpr char kSgd[] =
    "type: SGD lr: 0.5 momentum: -1 weight_decay: -1 grad_clip: -1";
constexpr char kSgdMomentum[] =
    "type: SGD lr: 0.1 momentum: 0.9 weight_decay: -1 grad_clip: -1";

CommandResult Launch(const std::string& dir, int workers, int shards,
                     bool resume = false) {
  std::vector<std::string> argv = {
      BinaryPath("launcher/lmps_local"), "--job=" + dir + "/job.textproto",
      "--run_dir=" + dir, absl::StrCat("--workers=", workers),
      absl::StrCat("--shards=", shards), "--quiet"};
  if (resume) argv.push_back("--resume");
  return RunCommand(argv, 240);
}

SafetensorsContents Train(const std::string& name, int workers, int shards,
                          const std::string& optimizer,
                          const std::string& train) {
  const std::string dir = TempDir(name);
  WriteFile(dir + "/job.textproto", SmallAggregationJob(optimizer, train));
  CommandResult r = Launch(dir, workers, shards);
  EXPECT_EQ(r.exit_code, 0) << r.output;
  auto model = ReadSafetensorsFile(dir + "/model.safetensors");
  EXPECT_TRUE(model.ok()) << model.status() << r.output;
  return model.ok() ? *model : SafetensorsContents();
}

const SafetensorsContents& Baseline(const std::string& optimizer) {
  static auto* cache = new std::map<std::string, SafetensorsContents>();
  auto it = cache->find(optimizer);
  if (it == cache->end()) {
    it = cache
             ->emplace(optimizer,
                       Train(absl::StrCat("base_", cache->size()), 1, 1,
                             optimizer, ""))
             .first;
  }
  return it->second;
}

class RingEquivalenceTest
    : public ::testing::TestWithParam<std::tuple<int, bool>> {};

TEST_P(RingEquivalenceTest, MatchesOneWorkerOneShard) {
  const auto [dp, sgd] = GetParam();
  const std::string optimizer = sgd ? kSgd : kAdamW;
  SafetensorsContents got =
      Train(absl::StrCat("ring_dp", dp, sgd ? "_sgd" : "_adamw"), dp, 2,
            optimizer, "dp_aggregation: RING_ALLREDUCE");
  auto diff = MaxAbsDiff(Baseline(optimizer), got);
  ASSERT_TRUE(diff.ok()) << diff.status();
  EXPECT_LE(*diff, kTolerance) << "dp " << dp;
  // Training moved the parameters (the c_fc bias starts at zero).
  const SafeTensor* b = got.Find("h.0.mlp.c_fc.bias");
  ASSERT_NE(b, nullptr);
  double moved = 0;
  for (float v : b->data) {
    moved = std::max(moved, static_cast<double>(std::fabs(v)));
  }
  EXPECT_GT(moved, 1e-4);
}

INSTANTIATE_TEST_SUITE_P(
    Layouts, RingEquivalenceTest,
    ::testing::Combine(::testing::Values(2, 4), ::testing::Bool()),
    [](const auto& info) {
      return absl::StrCat("dp", std::get<0>(info.param),
                          std::get<1>(info.param) ? "_sgd" : "_adamw");
    });

// Stopped at the checkpoint of step 2 and resumed: the workers pull step 2
// and the optimizer state from the shards (which dp rank 0 kept up to date)
// and end where the uninterrupted one-worker run ends. With AdamW or SGD
// momentum, moments restarted from zero would move the result by far more
// than the tolerance.
class RingResumeTest : public ::testing::TestWithParam<const char*> {};

TEST_P(RingResumeTest, CheckpointResumesExactly) {
  const std::string optimizer = GetParam();
  const std::string dir = TempDir("ring_resume");
  WriteFile(dir + "/job.textproto",
            SmallAggregationJob(
                optimizer, "dp_aggregation: RING_ALLREDUCE stop_after_step: 2"));
  CommandResult first = Launch(dir, 2, 2);
  ASSERT_EQ(first.exit_code, 0) << first.output;
  WriteFile(dir + "/job.textproto",
            SmallAggregationJob(optimizer, "dp_aggregation: RING_ALLREDUCE"));
  CommandResult second = Launch(dir, 2, 2, /*resume=*/true);
  ASSERT_EQ(second.exit_code, 0) << second.output;
  EXPECT_NE(ReadFile(dir + "/logs/worker-0.log").find("resume step 2"),
            std::string::npos)
      << ReadFile(dir + "/logs/worker-0.log");
  auto model = ReadSafetensorsFile(dir + "/model.safetensors");
  ASSERT_TRUE(model.ok()) << model.status();
  auto diff = MaxAbsDiff(Baseline(optimizer), *model);
  ASSERT_TRUE(diff.ok()) << diff.status();
  EXPECT_LE(*diff, kTolerance);
}

INSTANTIATE_TEST_SUITE_P(Optimizers, RingResumeTest,
                         ::testing::Values(kSgd, kSgdMomentum, kAdamW),
                         [](const auto& info) -> std::string {
                           if (info.param == kSgd) return "sgd";
                           if (info.param == kSgdMomentum) return "sgd_momentum";
                           return "adamw";
                         });

// A dead ring worker: its peers' all-reduce fails, the scheduler regroups
// the job at that step, a replacement takes the rank, and every worker
// restarts from the shards' parameters and optimizer state.
TEST(RingAllReduceTest, DeadWorkerIsReplacedExactly) {
  ExpectDeadWorkerReplacedExactly("ring_kill", "dp_aggregation: RING_ALLREDUCE",
                                  2);
}

// Every worker frozen (SIGSTOP) past its lease: none stops for the regroup,
// so the job re-assembles without them from the shards' checkpoint. Once
// thawed, each worker is told to register again (not let rejoin the new
// assembly in place, still in a step of the old one, where a step that
// failed on a shard still re-assembling waited for a stop that never came),
// and the job ends bit-identical to a straight run. 600 steps of the small
// job (~6 s of training here): the freeze lands within a heartbeat (0.7 s)
// of step 20.
TEST(RingAllReduceTest, EveryWorkerFrozenPastItsLeaseRegroupsExactly) {
  const std::string job = absl::StrReplaceAll(
      SmallAggregationJob("lr: 0.001", "dp_aggregation: RING_ALLREDUCE"),
      {{"steps: 4 ", "steps: 600 "}});
  const std::vector<std::string> flags = {"--workers=2", "--shards=2",
                                          "--lease_s=2"};
  const FinalProgress straight =
      RunLocalJob("ring_freeze_straight", job, flags, 600);
  std::vector<std::string> frozen_flags = flags;
  frozen_flags.push_back("--fault_freeze_workers_at_step=20");
  frozen_flags.push_back("--fault_freeze_s=8");
  const FinalProgress frozen =
      RunLocalJob("ring_freeze", job, frozen_flags, 600);
  for (const std::string w : {"worker-0", "worker-1"}) {
    const std::string log = ReadFile(frozen.run_dir + "/logs/" + w + ".log");
    EXPECT_NE(log.find("the job re-assembled without this worker"),
              std::string::npos)
        << log;
  }
  const std::string scheduler =
      ReadFile(frozen.run_dir + "/logs/scheduler.log");
  EXPECT_NE(scheduler.find("(2 whose lease expired did not)"),
            std::string::npos)
      << scheduler;
  ExpectSameExportedModel(straight.run_dir, frozen.run_dir);
}

void ExpectRejected(const std::string& train, const std::string& reason) {
  const std::string dir = TempDir("ring_bad");
  WriteFile(dir + "/job.textproto",
            SmallAggregationJob(kAdamW,
                                "dp_aggregation: RING_ALLREDUCE " + train));
  CommandResult r = Launch(dir, 2, 1);
  EXPECT_NE(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find(reason), std::string::npos) << r.output;
}

TEST(RingAllReduceTest, RejectsAsyncAndBoundedStaleness) {
  ExpectRejected("mode: ASYNC", "RING_ALLREDUCE needs train.mode SYNC");
  ExpectRejected("mode: BOUNDED_STALENESS staleness: 1",
                 "RING_ALLREDUCE needs train.mode SYNC");
}

TEST(RingAllReduceTest, RejectsCompression) {
  ExpectRejected("compression { kind: TOPK ratio: 0.1 }",
                 "RING_ALLREDUCE does not compress");
}

}  // namespace
}  // namespace lmps::testing
