// Fault tolerance with the real binaries: a worker SIGKILLed in the middle of
// pushing its gradient (shard 0 has it, shard 1 does not) is replaced; the
// replacement takes the dead worker's slot when its lease expires, redoes
// exactly the lost step (shard 0 counts the repeated push once), and the
// final parameters equal those of an uninterrupted run bit for bit.
#include <signal.h>

#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"
#include "absl/time/clock.h"
#include "common/formats/safetensors.h"
#include "gtest/gtest.h"
#include "tests/test_util.h"

namespace lmps::testing {
namespace {

constexpr char kJob[] = R"(
model { n_layer: 2 n_head: 2 n_embd: 32 block_size: 16 }
train { steps: 6 batch_size: 8 eval_interval: 0 sample_tokens: 0 }
max_chunk_bytes: 4096
)";

// Layer-wise pulls (off by default on CPU workers, as in kJob) under the
// shard faults of the longer jobs.
constexpr char kLongerJob[] = R"(
model { n_layer: 2 n_head: 2 n_embd: 32 block_size: 16 }
train { steps: 300 batch_size: 8 eval_interval: 0 sample_tokens: 0
        checkpoint_interval: 20 layerwise_pull: LAYERWISE_PULL_ON }
max_chunk_bytes: 4096
)";

// The same job, with dp rank 0 sleeping 20 ms per step (about 6 s in all) so
// that a fault lands mid-training; the parameters are the same.
constexpr char kSlowerJob[] = R"(
model { n_layer: 2 n_head: 2 n_embd: 32 block_size: 16 }
train { steps: 300 batch_size: 8 eval_interval: 0 sample_tokens: 0
        checkpoint_interval: 20 debug_slow_worker_rank: 0
        debug_slow_worker_delay_ms: 20 layerwise_pull: LAYERWISE_PULL_ON }
max_chunk_bytes: 4096
)";

CommandResult Train(const std::string& dir, std::vector<std::string> extra,
                    const char* job = kJob) {
  WriteFile(dir + "/job.textproto", job);
  std::vector<std::string> argv = {BinaryPath("launcher/lmps_local"),
                                   "--job=" + dir + "/job.textproto",
                                   "--run_dir=" + dir, "--workers=2",
                                   "--shards=2", "--lease_s=2"};
  for (auto& e : extra) argv.push_back(e);
  return RunCommand(argv, 180);
}

TEST(FaultToleranceTest, WorkerKilledMidPushIsReplacedExactly) {
  const std::string straight = TempDir("straight");
  CommandResult a = Train(straight, {});
  ASSERT_EQ(a.exit_code, 0) << a.output;

  const std::string faulty = TempDir("faulty");
  CommandResult b = Train(faulty, {"--fault_worker=1", "--fault_kill_at_step=3"});
  ASSERT_EQ(b.exit_code, 0) << b.output;
  EXPECT_NE(b.output.find("worker-1 was killed by signal 9; starting a replacement"),
            std::string::npos)
      << b.output;
  // The kill landed mid-push: shard 0 had the step's gradient, shard 1 not.
  const std::string killed = ReadFile(faulty + "/logs/worker-1.log");
  EXPECT_NE(killed.find("fault injection: SIGKILL mid-push of step 3: shard 0 "
                        "accepted its push, 0 other shards had accepted theirs"),
            std::string::npos)
      << killed;
  const std::string replacement = ReadFile(faulty + "/logs/worker-1.restart1.log");
  EXPECT_NE(replacement.find("joining a running job at step 3"), std::string::npos)
      << replacement;

  ExpectSameExportedModel(straight, faulty,
                          "no gradient may be lost or counted twice");
}

// A shard SIGKILLed mid-job: the launcher restarts the job from the latest
// checkpoint every shard has complete; the job rolls back to that step
// everywhere, nothing after it is half-applied, and the final parameters
// equal those of an uninterrupted run bit for bit.
TEST(FaultToleranceTest, ShardKilledJobRollsBackToCheckpointExactly) {
  const std::string straight = TempDir("straight_long");
  CommandResult a = Train(straight, {}, kLongerJob);
  ASSERT_EQ(a.exit_code, 0) << a.output;

  const std::string faulty = TempDir("shard_killed");
  CommandResult b = Train(
      faulty, {"--fault_kill_server=1", "--fault_kill_server_at_step=30"}, kLongerJob);
  ASSERT_EQ(b.exit_code, 0) << b.output;
  EXPECT_NE(b.output.find("fault injection: SIGKILL server-1"), std::string::npos)
      << b.output;
  EXPECT_NE(b.output.find("restarting the job from the latest complete checkpoint"),
            std::string::npos)
      << b.output;

  ExpectSameExportedModel(straight, faulty);
}

// Shard replication (layout.shard_backups: 1): the primary of shard 1 is
// SIGKILLed mid-job; the workers fail over to its backup, which takes over
// without a rollback (no step is lost or repeated); the restarted process
// becomes the new backup from a snapshot; later the new primary is killed
// too and that restarted process takes over. The final parameters equal an
// uninterrupted unreplicated run's bit for bit.
TEST(FaultToleranceTest, ReplicatedShardKilledTwiceLosesNoStep) {
  const std::string straight = TempDir("straight_replicated");
  CommandResult a = Train(straight, {}, kLongerJob);
  ASSERT_EQ(a.exit_code, 0) << a.output;

  const std::string faulty = TempDir("replicated_killed");
  const std::string job = std::string(kSlowerJob) + "layout { shard_backups: 1 }\n";
  CommandResult b = Train(faulty,
                          {"--fault_kill_server=1", "--fault_kill_server_at_step=30",
                           "--fault_kill_primary_again_at_step=150"},
                          job.c_str());
  ASSERT_EQ(b.exit_code, 0) << b.output;
  EXPECT_NE(b.output.find("fault injection: SIGKILL server-1 at step"),
            std::string::npos)
      << b.output;
  EXPECT_NE(b.output.find("fault injection: SIGKILL backup-1, now the primary of "
                          "shard 1"),
            std::string::npos)
      << b.output;
  EXPECT_NE(b.output.find("its shard's other node serves on"), std::string::npos)
      << b.output;
  EXPECT_EQ(b.output.find("restarting the job"), std::string::npos)
      << "no rollback may happen: " << b.output;
  const std::string backup_log = ReadFile(faulty + "/logs/backup-1.log");
  EXPECT_NE(backup_log.find("took over as the primary"), std::string::npos)
      << backup_log;
  const std::string restarted = ReadFile(faulty + "/logs/server-1.restart1.log");
  EXPECT_NE(restarted.find("holds its primary's snapshot"), std::string::npos)
      << restarted;
  EXPECT_NE(restarted.find("took over as the primary"), std::string::npos)
      << restarted;

  ExpectSameExportedModel(straight, faulty, "a shard's death must lose no step");
}

// The same with pipeline parallelism (pp = 2: each stage pushes only its
// own parts of the chunks, and both stages push the tied embedding).
TEST(FaultToleranceTest, ReplicatedShardsServeAPipelineJobThroughTwoKills) {
  constexpr char kPipelineJob[] = R"(
model { n_layer: 2 n_head: 2 n_embd: 32 block_size: 16 }
train { steps: 300 batch_size: 8 eval_interval: 0 sample_tokens: 0
        checkpoint_interval: 50 debug_slow_worker_rank: 0
        debug_slow_worker_delay_ms: 40 }
max_chunk_bytes: 4096
)";
  const std::string straight = TempDir("pipeline_straight");
  const std::string plain = std::string(kPipelineJob) + "layout { pp: 2 }\n";
  CommandResult a = Train(straight, {"--workers=1"}, plain.c_str());
  ASSERT_EQ(a.exit_code, 0) << a.output;
  const std::string faulty = TempDir("pipeline_replicated");
  const std::string job =
      std::string(kPipelineJob) + "layout { pp: 2 shard_backups: 1 }\n";
  CommandResult b = Train(faulty,
                          {"--workers=1", "--fault_kill_server=0",
                           "--fault_kill_server_at_step=60",
                           "--fault_kill_primary_again_at_step=200"},
                          job.c_str());
  ASSERT_EQ(b.exit_code, 0) << b.output;
  EXPECT_NE(b.output.find("SIGKILL backup-0, now the primary of shard 0"),
            std::string::npos)
      << b.output;
  EXPECT_EQ(b.output.find("restarting the job"), std::string::npos) << b.output;
  ExpectSameExportedModel(straight, faulty);
}

// Elastic data parallelism driven by the scheduler: `job` trained with a
// fixed dp 2, then elastically: worker processes for a third replica join
// at step 30 and the scheduler grows dp 2 -> 3 at a step boundary; as step
// 70 runs worker-1 is SIGKILLed and, no replacement coming, the scheduler
// shrinks dp back to 2 (the surviving replicas were waiting for its
// gradient or its activations: the stop ends their wait, and the job
// resumes from that step's checkpoint). The global batch (12) is kept
// throughout, so the parameters match the fixed run up to float summation
// order: within 1e-4. `layout`: flags for both runs; `launcher_says` and
// `scheduler_says`: lines the elastic run must print.
void ExpectElasticGrowThenShrink(const std::string& name, const char* job,
                                 const std::vector<std::string>& layout,
                                 const std::vector<std::string>& launcher_says,
                                 const std::vector<std::string>& scheduler_says) {
  const std::string straight = TempDir(name + "_straight");
  CommandResult a = Train(straight, layout, job);
  ASSERT_EQ(a.exit_code, 0) << a.output;

  const std::string elastic = TempDir(name);
  std::vector<std::string> flags = layout;
  for (const char* f :
       {"--elastic_max_dp=3", "--elastic_grace_s=1", "--resize_at_step=30",
        "--resize_workers=3", "--fault_worker=1", "--fault_kill_at_step=70",
        "--restart_workers=0"}) {
    flags.push_back(f);
  }
  CommandResult b = Train(elastic, flags, job);
  ASSERT_EQ(b.exit_code, 0) << b.output;
  for (const std::string& line : launcher_says) {
    EXPECT_NE(b.output.find(line), std::string::npos) << line << "\n" << b.output;
  }
  const std::string scheduler = ReadFile(elastic + "/logs/scheduler.log");
  std::vector<std::string> expected = scheduler_says;
  for (const char* line :
       {"re-assembling with dp 3", "elastic resize dp 3 -> 2: 1 worker(s) dead",
        "re-assembling with dp 2", "job FINISHED"}) {
    expected.push_back(line);
  }
  for (const std::string& line : expected) {
    EXPECT_NE(scheduler.find(line), std::string::npos) << line << "\n" << scheduler;
  }
  auto diff = MaxAbsDiffOfFiles(straight + "/model.safetensors",
                                elastic + "/model.safetensors");
  ASSERT_TRUE(diff.ok()) << diff.status();
  EXPECT_LT(*diff, 1e-4);
  std::printf("%s: elastic grow+shrink vs fixed dp: max |diff| = %g\n",
              name.c_str(), *diff);
}

// Data parallel: the worker dies mid-push.
TEST(FaultToleranceTest, ElasticSchedulerGrowsAndShrinksDp) {
  constexpr char kElasticJob[] = R"(
model { n_layer: 2 n_head: 2 n_embd: 32 block_size: 16 }
train { steps: 120 batch_size: 12 eval_interval: 0 sample_tokens: 0
        checkpoint_interval: 1000 debug_slow_worker_rank: 0
        debug_slow_worker_delay_ms: 60 }
max_chunk_bytes: 4096
)";
  ExpectElasticGrowThenShrink(
      "elastic_dp", kElasticJob, {}, {"starting 1 more worker process"},
      {"elastic resize dp 2 -> 3: 1 more worker(s) asking to join"});
}

// dp x pp 2: a replica is two processes; the worker dies as its step
// starts, its stage partner's step fails (it hears peers_lost) and waits
// for the shrink instead of failing the job, and registers again.
TEST(FaultToleranceTest, ElasticSchedulerGrowsAndShrinksAPipelineJob) {
  constexpr char kElasticPipelineJob[] = R"(
model { n_layer: 2 n_head: 2 n_embd: 32 block_size: 16 }
train { steps: 120 batch_size: 12 micro_batches: 2 eval_interval: 0
        sample_tokens: 0 checkpoint_interval: 1000 debug_slow_worker_rank: 0
        debug_slow_worker_delay_ms: 60 peer_timeout_ms: 3000 }
max_chunk_bytes: 4096
)";
  ExpectElasticGrowThenShrink(
      "elastic_pp", kElasticPipelineJob, {"--pp=2"},
      {"starting 2 more worker processes",
       "the elastic scheduler drops its replica (dp 3 -> 2)"},
      {"elastic resize dp 2 -> 3: 2 more worker(s) asking to join"});
}

// A worker beyond the elastic scheduler's largest dp stands by as surplus
// (registering again, past its own --assemble_timeout_s) and exits 0 when
// the job finishes without it.
TEST(FaultToleranceTest, SurplusWorkerStandsByUntilTheJobEnds) {
  constexpr char kJobText[] = R"(
model { n_layer: 2 n_head: 2 n_embd: 32 block_size: 16 }
train { steps: 100 batch_size: 12 eval_interval: 0 sample_tokens: 0
        checkpoint_interval: 1000 debug_slow_worker_rank: 0
        debug_slow_worker_delay_ms: 60 }
max_chunk_bytes: 4096
)";
  const std::string dir = TempDir("surplus");
  WriteFile(dir + "/job.textproto", kJobText);
  BackgroundProcess job({BinaryPath("launcher/lmps_local"),
                         "--job=" + dir + "/job.textproto", "--run_dir=" + dir,
                         "--workers=2", "--shards=2", "--lease_s=2",
                         "--elastic_max_dp=2"},
                        dir + "/launcher.log");
  const std::string port(
      absl::StripAsciiWhitespace(WaitForFile(dir + "/scheduler.port", 30)));
  ASSERT_FALSE(port.empty()) << ReadFile(dir + "/launcher.log");
  // Once the job's two workers hold their slots.
  for (int i = 0; i < 300; ++i) {
    if (ReadFile(dir + "/logs/worker-0.log").find("assigned dp rank") !=
            std::string::npos &&
        ReadFile(dir + "/logs/worker-1.log").find("assigned dp rank") !=
            std::string::npos) {
      break;
    }
    absl::SleepFor(absl::Milliseconds(100));
  }
  const absl::Time start = absl::Now();
  BackgroundProcess surplus({BinaryPath("worker/lmps_worker"),
                             "--scheduler=127.0.0.1:" + port,
                             "--assemble_timeout_s=2", "--threads=1"},
                            dir + "/surplus.log");
  EXPECT_EQ(surplus.Wait(120), 0) << ReadFile(dir + "/surplus.log");
  EXPECT_GT(absl::Now() - start, absl::Seconds(3)) << "it gave up early";
  EXPECT_EQ(job.Wait(120), 0) << ReadFile(dir + "/launcher.log");
  const std::string log = ReadFile(dir + "/surplus.log");
  EXPECT_NE(log.find("standing by"), std::string::npos) << log;
  EXPECT_NE(log.find("the job finished without needing this worker"),
            std::string::npos)
      << log;
}

// A spare worker started with the job takes over a SIGKILLed worker's slot
// (no new process is started), redoes exactly the lost step, and the final
// parameters equal an uninterrupted run's.
TEST(FaultToleranceTest, SpareWorkerTakesOverADeadWorkersSlot) {
  const std::string straight = TempDir("straight_for_spare");
  CommandResult a = Train(straight, {});
  ASSERT_EQ(a.exit_code, 0) << a.output;

  const std::string faulty = TempDir("spare");
  CommandResult b = Train(faulty, {"--spare_workers=1", "--restart_workers=0",
                                   "--fault_worker=1", "--fault_kill_at_step=3"});
  ASSERT_EQ(b.exit_code, 0) << b.output;
  EXPECT_NE(b.output.find("a spare worker takes over its slot"), std::string::npos)
      << b.output;
  const std::string spare = ReadFile(faulty + "/logs/worker-spare-0.log");
  EXPECT_NE(spare.find("joining a running job at step 3"), std::string::npos) << spare;
  EXPECT_NE(ReadFile(faulty + "/logs/scheduler.log").find("whose lease had expired"),
            std::string::npos);

  ExpectSameExportedModel(straight, faulty);
}

// Elastic data parallelism: dp changes at a step boundary mid-job. With the
// global batch kept, the result equals the fixed-dp run's (only the
// summation order differs: within 2e-5, as tests/equivalence_test); with it
// rescaled, every new replica keeps its per-replica batch.
constexpr char kElasticJob[] = R"(
model { n_layer: 2 n_head: 2 n_embd: 32 block_size: 16 }
train { steps: 40 batch_size: 8 eval_interval: 0 sample_tokens: 0
        checkpoint_interval: 100 debug_slow_worker_rank: 0
        debug_slow_worker_delay_ms: 50 }
max_chunk_bytes: 4096
)";

TEST(FaultToleranceTest, ElasticDpChangesAtAStepBoundary) {
  const std::string straight = TempDir("elastic_straight");
  CommandResult a = Train(straight, {}, kElasticJob);
  ASSERT_EQ(a.exit_code, 0) << a.output;

  const std::string shrunk = TempDir("elastic_shrunk");
  CommandResult b = Train(shrunk, {"--resize_at_step=10", "--resize_workers=1"},
                          kElasticJob);
  ASSERT_EQ(b.exit_code, 0) << b.output;
  EXPECT_NE(b.output.find("elastic resize: dp 2 -> 1 at step"), std::string::npos)
      << b.output;
  const std::string log = ReadFile(shrunk + "/logs/worker-0.attempt1.log");
  EXPECT_NE(log.find("dp rank 0 of 1"), std::string::npos) << log;
  EXPECT_EQ(log.find("resume step 0,"), std::string::npos) << log;
  auto diff = MaxAbsDiffOfFiles(straight + "/model.safetensors",
                                shrunk + "/model.safetensors");
  ASSERT_TRUE(diff.ok()) << diff.status();
  EXPECT_LE(*diff, 2e-5);
  EXPECT_GT(*diff, 0.0) << "dp really changed (the summation order with it)";

  const std::string grown = TempDir("elastic_grown");
  CommandResult c = Train(grown, {"--resize_at_step=10", "--resize_workers=4",
                                  "--elastic_batch=rescale"},
                          kElasticJob);
  ASSERT_EQ(c.exit_code, 0) << c.output;
  EXPECT_NE(c.output.find("dp 2 -> 4 at step"), std::string::npos) << c.output;
  EXPECT_NE(c.output.find("(global batch 8 -> 16)"), std::string::npos) << c.output;
  EXPECT_NE(ReadFile(grown + "/logs/worker-3.attempt1.log").find("dp rank 3 of 4"),
            std::string::npos);
}

// The scheduler SIGKILLed mid-job: the launcher restarts it on the same
// address; shards and workers, which kept training, rejoin it with their
// ranks (its state is rebuilt from them), and the job finishes with exactly
// the parameters of an uninterrupted run.
TEST(FaultToleranceTest, SchedulerRestartNodesRejoinAndTheJobContinues) {
  const std::string straight = TempDir("straight_for_scheduler");
  CommandResult a = Train(straight, {}, kLongerJob);
  ASSERT_EQ(a.exit_code, 0) << a.output;

  const std::string faulty = TempDir("scheduler_killed");
  CommandResult b = Train(faulty, {"--fault_kill_scheduler_at_step=30"}, kSlowerJob);
  ASSERT_EQ(b.exit_code, 0) << b.output;
  EXPECT_NE(b.output.find("fault injection: SIGKILL the scheduler"), std::string::npos)
      << b.output;
  EXPECT_NE(b.output.find("restarting it on 127.0.0.1:"), std::string::npos) << b.output;
  const std::string log = ReadFile(faulty + "/logs/scheduler.restart1.log");
  for (const char* node : {"server-0", "server-1", "worker-0", "worker-1"}) {
    EXPECT_NE(log.find(absl::StrCat(node, " (127.0.0.1:")), std::string::npos) << log;
  }
  EXPECT_NE(log.find("rejoined the running job at step"), std::string::npos) << log;
  EXPECT_NE(log.find("RUNNING -> FINISHED"), std::string::npos) << log;

  ExpectSameExportedModel(straight, faulty);
}

// A shard restarted under the job, as Kubernetes restarts a lost shard's
// pod (here: SIGKILL, then the same command again): the new process lost
// the shard's state after its checkpoint, so the job fails (the workers on
// the dead shard, or the scheduler when the new process registers) and
// every node stops (none hangs); when every node is started again (as
// Kubernetes restarts the failed pods) the job resumes everywhere from the
// latest checkpoint every shard holds and ends with the parameters of an
// uninterrupted run.
TEST(FaultToleranceTest, RestartedShardRollsTheWholeJobBackToTheCheckpoint) {
  const std::string straight = TempDir("straight_for_k8s");
  CommandResult a = Train(straight, {}, kLongerJob);
  ASSERT_EQ(a.exit_code, 0) << a.output;

  const std::string dir = TempDir("k8s_like");
  WriteFile(dir + "/job.textproto", kSlowerJob);
  auto run_job = [&](int round, bool kill_shard) {
    const std::string logs = absl::StrCat(dir, "/round", round);
    std::filesystem::create_directories(logs);
    std::filesystem::remove(dir + "/port");
    BackgroundProcess scheduler(
        {BinaryPath("server/scheduler/lmps_scheduler"), "--job=" + dir + "/job.textproto",
         "--listen=127.0.0.1:0", "--port_file=" + dir + "/port", "--lease_s=2",
         "--workers=2", "--shards=2"},
        logs + "/scheduler.log");
    const std::string port(absl::StripAsciiWhitespace(WaitForFile(dir + "/port", 30)));
    ASSERT_FALSE(port.empty());
    const std::string sched = "--scheduler=127.0.0.1:" + port;
    auto server_argv = [&](int s) {
      return std::vector<std::string>{
          BinaryPath("server/lmps_server"), sched, "--listen=127.0.0.1:0",
          absl::StrCat("--shard=", s), "--checkpoint_dir=" + dir + "/ckpt"};
    };
    auto server0 = std::make_unique<BackgroundProcess>(server_argv(0), logs + "/server-0.log");
    auto server1 = std::make_unique<BackgroundProcess>(server_argv(1), logs + "/server-1.log");
    std::vector<std::unique_ptr<BackgroundProcess>> workers;
    for (int w = 0; w < 2; ++w) {
      workers.push_back(std::make_unique<BackgroundProcess>(
          std::vector<std::string>{BinaryPath("worker/lmps_worker"), sched,
                                   absl::StrCat("--rank=", w), "--threads=1"},
          absl::StrCat(logs, "/worker-", w, ".log")));
    }
    if (kill_shard) {
      ASSERT_FALSE(WaitForFile(dir + "/ckpt/step_00000040/shard_1.ckpt", 120).empty())
          << ReadFile(logs + "/worker-0.log") << ReadFile(logs + "/server-1.log")
          << ReadFile(logs + "/scheduler.log");
      kill(server1->pid(), SIGKILL);
      server1->Wait(10);
      server1 = std::make_unique<BackgroundProcess>(server_argv(1),
                                                    logs + "/server-1.restarted.log");
      for (auto& w : workers) EXPECT_EQ(w->Wait(60), 1) << "workers stop with an error";
      EXPECT_NE(server0->Wait(60), 0);
      EXPECT_EQ(scheduler.Wait(60), 1);
      // The workers fail on the dead shard (or, once the new process
      // registers, on the scheduler's rollback), naming it.
      const std::string log = ReadFile(logs + "/worker-0.log");
      EXPECT_NE(log.find("shard 1"), std::string::npos) << log;
      EXPECT_NE(ReadFile(logs + "/scheduler.log").find("-> FAILED"), std::string::npos);
      return;
    }
    for (auto& w : workers) EXPECT_EQ(w->Wait(120), 0);
    EXPECT_EQ(server0->Wait(60), 0);
    EXPECT_EQ(server1->Wait(60), 0);
    EXPECT_EQ(scheduler.Wait(60), 0);
    const std::string log = ReadFile(logs + "/worker-0.log");
    EXPECT_EQ(log.find("resume step 0,"), std::string::npos) << log;
  };
  run_job(1, /*kill_shard=*/true);
  run_job(2, /*kill_shard=*/false);
  CommandResult exported = RunCommand({BinaryPath("server/lmps_export"),
                                       "--checkpoint_dir=" + dir + "/ckpt",
                                       "--out=" + dir + "/model.safetensors"},
                                      60);
  ASSERT_EQ(exported.exit_code, 0) << exported.output;
  ExpectSameExportedModel(straight, dir);
}

}  // namespace
}  // namespace lmps::testing
