#include "launcher/restart_policy.h"

#include <ostream>
#include <string>
#include <vector>

#include "gtest/gtest.h"

namespace lmps {

// Failure messages name the actions.
void PrintTo(RestartAction action, std::ostream* os) {
  static const char* const kNames[] = {
      "kRestartScheduler", "kRestartAsBackup",     "kDropReplica",
      "kRestartJob",       "kReplaceWorker",       "kAwaitElasticShrink",
      "kAwaitSpare",       "kFail"};
  *os << kNames[static_cast<int>(action)];
}

namespace {

using A = RestartAction;

RestartLimits Limits() {
  RestartLimits limits;
  limits.restart_scheduler = 2;
  limits.restart_workers = 3;
  limits.restart_job = 1;
  limits.elastic_min_dp = 1;
  return limits;
}

TEST(RestartPolicyTest, InvalidInputOfTheSchedulerOrAShardIsNotRestarted) {
  const RestartPolicy policy(Limits());
  JobRestartState job;
  for (const char* name : {"scheduler", "server-0", "backup-1"}) {
    EXPECT_EQ(policy.Decide(name, 0, job, kExitInvalidInput), A::kFail)
        << name;
  }
  job.replicated = true;
  EXPECT_EQ(policy.Decide("server-0", 0, job, kExitInvalidInput), A::kFail);
  // Other exits are restarted as before; workers are replaced whatever
  // their code.
  EXPECT_EQ(policy.Decide("server-0", 0, job, 1), A::kRestartAsBackup);
  EXPECT_EQ(policy.Decide("scheduler", 0, job, -1), A::kRestartScheduler);
  EXPECT_EQ(policy.Decide("worker-0", 0, job, kExitInvalidInput),
            A::kReplaceWorker);
}

TEST(RestartPolicyTest, SchedulerRestartsUpToItsLimit) {
  const RestartPolicy policy(Limits());
  const JobRestartState job;
  EXPECT_EQ(policy.Decide("scheduler", 0, job), A::kRestartScheduler);
  EXPECT_EQ(policy.Decide("scheduler", 1, job), A::kRestartScheduler);
  EXPECT_EQ(policy.Decide("scheduler", 2, job), A::kFail);
  EXPECT_FALSE(policy.ChecksJobFailedFirst("scheduler", job));
}

TEST(RestartPolicyTest, LostShardRestartsTheJobWhileAllowed) {
  const RestartPolicy policy(Limits());
  JobRestartState job;
  for (const char* name : {"server-0", "backup-1"}) {
    job.attempt = 0;
    EXPECT_EQ(policy.Decide(name, 0, job), A::kRestartJob) << name;
    // Not replicated: the scheduler is not asked first.
    EXPECT_FALSE(policy.ChecksJobFailedFirst(name, job)) << name;
    job.attempt = 1;
    EXPECT_EQ(policy.Decide(name, 0, job), A::kFail) << name;
  }
}

TEST(RestartPolicyTest, ReplicatedShardNodeBecomesBackupThenRestartsTheJob) {
  const RestartPolicy policy(Limits());
  JobRestartState job;
  job.replicated = true;
  EXPECT_TRUE(policy.ChecksJobFailedFirst("server-0", job));
  EXPECT_TRUE(policy.ChecksJobFailedFirst("backup-0", job));
  for (int r = 0; r < RestartPolicy::kMaxBackupRestarts; ++r) {
    EXPECT_EQ(policy.Decide("server-0", r, job), A::kRestartAsBackup) << r;
    EXPECT_EQ(policy.Decide("backup-0", r, job), A::kRestartAsBackup) << r;
  }
  EXPECT_EQ(policy.Decide("server-0", RestartPolicy::kMaxBackupRestarts, job),
            A::kRestartJob);
  job.attempt = 1;
  EXPECT_EQ(policy.Decide("server-0", RestartPolicy::kMaxBackupRestarts, job),
            A::kFail);
}

TEST(RestartPolicyTest, WorkerReplacedThenElasticThenSpareThenFail) {
  const RestartPolicy policy(Limits());
  JobRestartState job;
  EXPECT_TRUE(policy.ChecksJobFailedFirst("worker-1", job));
  for (int r = 0; r < 3; ++r) {
    EXPECT_EQ(policy.Decide("worker-1", r, job), A::kReplaceWorker) << r;
  }
  // Out of replacements (data parallel: the job never restarts for it).
  EXPECT_EQ(policy.Decide("worker-1", 3, job), A::kFail);
  job.spares_available = 1;
  EXPECT_EQ(policy.Decide("worker-1", 3, job), A::kAwaitSpare);
  job.elastic_scheduler = true;  // before the spares
  EXPECT_EQ(policy.Decide("worker-1", 3, job), A::kAwaitElasticShrink);
  // Spares and elastic extras are workers too.
  EXPECT_EQ(policy.Decide("worker-spare-0", 0, job), A::kReplaceWorker);
  EXPECT_EQ(policy.Decide("worker-x0", 3, job), A::kAwaitElasticShrink);
}

TEST(RestartPolicyTest, PipelineWorkerOutOfReplacementsRestartsTheJob) {
  const RestartPolicy policy(Limits());
  JobRestartState job;
  job.pipeline = true;
  EXPECT_EQ(policy.Decide("worker-0", 2, job), A::kReplaceWorker);
  EXPECT_EQ(policy.Decide("worker-0", 3, job), A::kRestartJob);
  // A spare left takes the slot instead.
  job.spares_available = 1;
  EXPECT_EQ(policy.Decide("worker-0", 3, job), A::kAwaitSpare);
  // Out of job restarts too.
  job.spares_available = 0;
  job.attempt = 1;
  EXPECT_EQ(policy.Decide("worker-0", 3, job), A::kFail);
}

TEST(RestartPolicyTest, ElasticPipelineDropsTheReplicaAboveMinDp) {
  const RestartPolicy policy(Limits());
  JobRestartState job;
  job.pipeline = true;
  job.elastic_scheduler = true;
  job.elastic_dp = 2;
  // Before any replacement.
  EXPECT_EQ(policy.Decide("worker-3", 0, job), A::kDropReplica);
  // At --elastic_min_dp: replaced as in any pipeline job.
  job.elastic_dp = 1;
  EXPECT_EQ(policy.Decide("worker-3", 0, job), A::kReplaceWorker);
  EXPECT_EQ(policy.Decide("worker-3", 3, job), A::kRestartJob);
}

TEST(RestartPolicyTest, InterruptedRestartsNothing) {
  const RestartPolicy policy(Limits());
  JobRestartState job;
  job.interrupted = true;
  job.replicated = true;
  job.spares_available = 1;
  job.elastic_scheduler = true;
  for (const char* name : {"scheduler", "server-0", "backup-0", "worker-0"}) {
    EXPECT_EQ(policy.Decide(name, 0, job), A::kFail) << name;
  }
  // The failed job is still asked about (its message comes first).
  EXPECT_TRUE(policy.ChecksJobFailedFirst("worker-0", job));
}

TEST(RestartPolicyTest, OtherProcessesFail) {
  const RestartPolicy policy(Limits());
  JobRestartState job;
  job.replicated = true;
  job.spares_available = 1;
  for (const char* name : {"export", "sample"}) {
    EXPECT_EQ(policy.Decide(name, 0, job), A::kFail) << name;
    EXPECT_FALSE(policy.ChecksJobFailedFirst(name, job)) << name;
  }
}

TEST(RestartPolicyTest, ReplacementLosesOnlyTheFaultFlags) {
  const std::vector<std::string> args = {
      "--scheduler=127.0.0.1:1", "--fault_kill_at_step=3", "--rank=1",
      "--fault_anything", "--step_log=/r/steps/worker-1.jsonl"};
  EXPECT_EQ(WithoutFaultFlags(args),
            (std::vector<std::string>{"--scheduler=127.0.0.1:1", "--rank=1",
                                      "--step_log=/r/steps/worker-1.jsonl"}));
}

}  // namespace
}  // namespace lmps
