// Pipeline and tensor parallelism with the real binaries over loopback.
//
// Equivalence (sync mode): every dp x pp x tp layout reaches the same
// parameters after 4 AdamW steps as dp = pp = tp = 1 computing the same
// global batch of 12 sequences at once. Tolerance: max |difference| <= 2e-5
// on every parameter, the same bound and reasoning as tests/equivalence_test
// (only the order of floating-point sums differs: micro-batch accumulation,
// the ring all-reduce, the tied embedding's two stage gradients summed on the
// shards; a lost, doubled or misplaced gradient moves parameters by ~lr =
// 1e-3).
//
// Also: 1F1B keeps at most pp - stage micro-batches alive (GPipe m); no
// worker transfers parameters it does not hold (bytes counted); a dead
// stage or tensor-parallel peer makes its partner fail the step with an
// error naming it, never hang.
#include <algorithm>
#include <cmath>
#include <map>
#include <regex>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"
#include "absl/time/clock.h"
#include "common/formats/safetensors.h"
#include "common/model/job_spec.h"
#include "common/model/parallel_layout.h"
#include "gtest/gtest.h"
#include "tests/test_util.h"

namespace lmps::testing {
namespace {

constexpr double kTolerance = 2e-5;
constexpr int kSteps = 4;

// AdamW (the default) and plain SGD, whose update is proportional to the
// gradient: AdamW hardly reacts when every gradient is scaled by one
// constant, so a wrong 1/M or 1/dp factor shows only with SGD (~1e-2).
constexpr char kAdamW[] = "lr: 0.001";
constexpr char kSgd[] =
    "type: SGD lr: 0.5 momentum: -1 weight_decay: -1 grad_clip: -1";

// The job, with extra fields for its train and layout sections.
std::string Job(const std::string& train = "",
                const std::string& layout = "num_shards: 2",
                const std::string& optimizer = kAdamW) {
  return absl::StrCat(
      "model { n_layer: 3 n_head: 2 n_embd: 32 block_size: 16 }\n"
      "optimizer { ", optimizer, " }\n"
      "train { batch_size: 12 eval_interval: 0 sample_tokens: 0 ",
      std::regex_search(train, std::regex("(^| )steps:")) ? "" : "steps: 4 ",
      train,
      " }\nlayout { ", layout,
      " }\nmax_chunk_bytes: 2048\nmax_message_bytes: 1024\n");
}

struct Layout {
  int dp = 1, pp = 1, tp = 1, m = 1;
  std::string schedule = "1f1b";
  std::string Name() const {
    return absl::StrCat("dp", dp, "pp", pp, "tp", tp, "m", m, schedule);
  }
};

struct TrainRun {
  std::string dir;
  CommandResult result;
  SafetensorsContents model;
};

// `extra_args`: more lmps_local flags.
TrainRun Train(const Layout& l, const std::string& extra_train = "",
               const std::vector<std::string>& extra_args = {},
               const std::string& optimizer = kAdamW) {
  TrainRun run;
  run.dir = TempDir(absl::StrCat(l.Name(), extra_args.empty() ? "" : "_x",
                                 optimizer == kAdamW ? "" : "_sgd"));
  WriteFile(run.dir + "/job.textproto",
            Job(extra_train, "num_shards: 2", optimizer));
  std::vector<std::string> argv = {
      BinaryPath("launcher/lmps_local"), "--job=" + run.dir + "/job.textproto",
      "--run_dir=" + run.dir, absl::StrCat("--workers=", l.dp),
      absl::StrCat("--pp=", l.pp), absl::StrCat("--tp=", l.tp),
      absl::StrCat("--micro_batches=", l.m), "--schedule=" + l.schedule,
      "--restart_workers=0", "--restart_job=0", "--quiet"};
  argv.insert(argv.end(), extra_args.begin(), extra_args.end());
  run.result = RunCommand(argv, 300);
  EXPECT_EQ(run.result.exit_code, 0) << run.result.output;
  auto model = ReadSafetensorsFile(run.dir + "/model.safetensors");
  EXPECT_TRUE(model.ok()) << model.status() << run.result.output;
  if (model.ok()) run.model = *model;
  return run;
}

const SafetensorsContents& Baseline() {
  static const SafetensorsContents* baseline =
      new SafetensorsContents(Train(Layout()).model);
  return *baseline;
}

class PipelineEquivalenceTest : public ::testing::TestWithParam<Layout> {};

TEST_P(PipelineEquivalenceTest, MatchesOneWorker) {
  TrainRun run = Train(GetParam());
  auto diff = MaxAbsDiff(Baseline(), run.model);
  ASSERT_TRUE(diff.ok()) << diff.status();
  EXPECT_LE(*diff, kTolerance) << GetParam().Name();
  // Training moved the parameters (the c_fc bias of the last block starts
  // at zero), so the comparison is not vacuous.
  const SafeTensor* b = run.model.Find("h.2.mlp.c_fc.bias");
  ASSERT_NE(b, nullptr);
  double moved = 0;
  for (float v : b->data) moved = std::max(moved, static_cast<double>(std::fabs(v)));
  EXPECT_GT(moved, 1e-4);
}

Layout L(int dp, int pp, int tp, int m, std::string schedule = "1f1b") {
  Layout l;
  l.dp = dp;
  l.pp = pp;
  l.tp = tp;
  l.m = m;
  l.schedule = std::move(schedule);
  return l;
}

INSTANTIATE_TEST_SUITE_P(
    Layouts, PipelineEquivalenceTest,
    ::testing::Values(L(1, 2, 1, 2), L(1, 3, 1, 3), L(1, 2, 1, 3, "gpipe"),
                      L(1, 1, 2, 1), L(2, 2, 1, 2), L(1, 2, 2, 2),
                      L(2, 1, 2, 1), L(2, 2, 2, 2), L(2, 3, 1, 2, "gpipe")),
    [](const auto& info) { return info.param.Name(); });

// The same with plain SGD (see kSgd): the trainers' 1/M, the shards' 1/dp,
// the tied embedding's two parts and the tensor-parallel sums all scale the
// update directly.
class PipelineSgdEquivalenceTest : public ::testing::TestWithParam<Layout> {};

TEST_P(PipelineSgdEquivalenceTest, MatchesOneWorker) {
  static const SafetensorsContents* baseline =
      new SafetensorsContents(Train(Layout(), "", {}, kSgd).model);
  TrainRun run = Train(GetParam(), "", {}, kSgd);
  auto diff = MaxAbsDiff(*baseline, run.model);
  ASSERT_TRUE(diff.ok()) << diff.status();
  EXPECT_LE(*diff, kTolerance) << GetParam().Name();
}

INSTANTIATE_TEST_SUITE_P(
    Layouts, PipelineSgdEquivalenceTest,
    ::testing::Values(L(1, 2, 1, 3, "gpipe"), L(2, 1, 2, 1), L(2, 2, 2, 2)),
    [](const auto& info) { return info.param.Name(); });

// Lines "key=value ..." of a worker log that contain `tag`.
std::vector<std::map<std::string, std::string>> Records(const std::string& log,
                                                        const std::string& tag) {
  std::vector<std::map<std::string, std::string>> out;
  std::istringstream in(log);
  std::string line;
  static const std::regex kv("([a-z_]+)=([^ ]+)");
  while (std::getline(in, line)) {
    if (line.find(tag) == std::string::npos) continue;
    std::map<std::string, std::string> rec;
    for (std::sregex_iterator it(line.begin(), line.end(), kv), end; it != end; ++it) {
      rec[(*it)[1]] = (*it)[2];
    }
    out.push_back(rec);
  }
  return out;
}

int64_t Int(const std::map<std::string, std::string>& rec, const std::string& key) {
  auto it = rec.find(key);
  int64_t v = -1;
  if (it == rec.end() || !absl::SimpleAtoi(it->second, &v)) {
    ADD_FAILURE() << "no integer " << key;
  }
  return v;
}

// 1F1B: stage s keeps min(m, pp - s) <= pp micro-batches alive; GPipe m.
TEST(PipelineTest, OneFOneBKeepsAtMostPpMicroBatchesAlive) {
  for (const std::string schedule : {"1f1b", "gpipe"}) {
    const Layout l = L(1, 3, 1, 4, schedule);
    TrainRun run = Train(l, "debug_trace_steps: true");
    for (int stage = 0; stage < 3; ++stage) {
      const std::string log =
          ReadFile(absl::StrCat(run.dir, "/logs/worker-", stage, ".log"));
      auto traces = Records(log, "trace dp_rank=");
      ASSERT_EQ(traces.size(), static_cast<size_t>(kSteps)) << log;
      for (const auto& t : traces) {
        EXPECT_EQ(Int(t, "pp_rank"), stage);
        const int64_t live = Int(t, "max_live_micro_batches");
        if (schedule == "1f1b") {
          EXPECT_EQ(live, std::min(4, 3 - stage)) << "stage " << stage;
          EXPECT_LE(live, 3);
        } else {
          EXPECT_EQ(live, 4) << "stage " << stage;
        }
      }
    }
  }
}

// Each tp rank pulls and pushes only its own slices: the bytes moved equal
// exactly what ParallelLayout says it holds (pulls) and owns (pushes).
TEST(PipelineTest, NoWorkerTransfersParametersItDoesNotHold) {
  const Layout l = L(1, 2, 2, 2);
  TrainRun run = Train(l);
  auto spec = ParseJobSpec(Job());
  ASSERT_TRUE(spec.ok());
  spec->mutable_layout()->set_pp(2);
  spec->mutable_layout()->set_tp(2);
  auto layout = ParallelLayout::Create(spec->model(), spec->layout());
  ASSERT_TRUE(layout.ok());
  std::map<std::pair<int, int>, int64_t> pushed;
  for (int rank = 0; rank < 4; ++rank) {
    const WorkerCoords c = layout->Coords(rank);
    const std::string log = ReadFile(absl::StrCat(run.dir, "/logs/worker-", rank, ".log"));
    auto recs = Records(log, "transfer: pulls=");
    ASSERT_EQ(recs.size(), 1u) << log;
    const auto& r = recs[0];
    const int64_t held = layout->HeldElements(c.pp, c.tp);
    int64_t owned = 0;
    for (int t = 0; t < static_cast<int>(layout->tensors().size()); ++t) {
      for (const ElementRange& e : layout->Pushed(t, c.pp, c.tp)) owned += e.size();
    }
    EXPECT_EQ(Int(r, "held_parameters"), held);
    // One pull per step and one for the final evaluation (eval_interval 0
    // means the default, 50: only the final one runs).
    EXPECT_EQ(Int(r, "pulls"), kSteps + 1);
    EXPECT_EQ(Int(r, "bytes_pulled"), Int(r, "pulls") * 4 * held) << "worker " << rank;
    EXPECT_EQ(Int(r, "bytes_pushed"), kSteps * 4 * owned) << "worker " << rank;
    pushed[{c.pp, c.tp}] = Int(r, "bytes_pushed");
    // Every process on this host: payloads went through shared memory
    // (shared_memory AUTO), the shards' and the peers' (activations and
    // their gradients, tensor-parallel all-reduces); a request that found
    // all of its peer's windows taken used the socket.
    EXPECT_GT(Int(r, "bytes_shared"), 0) << "worker " << rank;
    EXPECT_LE(Int(r, "bytes_shared"),
              Int(r, "bytes_pulled") + Int(r, "bytes_pushed"));
    EXPECT_GT(Int(r, "peer_bytes_shared"), 0) << "worker " << rank;
    EXPECT_LE(Int(r, "peer_bytes_shared"), Int(r, "peer_bytes_sent"));
    EXPECT_LT(held, GptNumParameters(spec->model()) * 2 / 3);
  }
  // tp rank 1 pushes no replicated tensor.
  EXPECT_LT((pushed[{0, 1}]), (pushed[{0, 0}]));
  EXPECT_LT((pushed[{1, 1}]), (pushed[{1, 0}]));
}

// --overlap_push=true: every stage pushes its part of the gradient while
// the schedule's last backward pass runs; the bytes are the same, part of
// them goes out before the pass ends, and the result is bit-identical.
TEST(PipelineTest, OverlappedPushIsBitIdentical) {
  const Layout l = L(1, 2, 2, 2);
  TrainRun after = Train(l, "debug_trace_steps: true");
  TrainRun during =
      Train(l, "debug_trace_steps: true", {"--worker_args=--overlap_push=true"});
  auto diff = MaxAbsDiff(after.model, during.model);
  ASSERT_TRUE(diff.ok()) << diff.status();
  EXPECT_EQ(*diff, 0.0);
  int64_t overlapped = 0;
  for (int rank = 0; rank < 4; ++rank) {
    const std::string name = absl::StrCat("/logs/worker-", rank, ".log");
    auto a = Records(ReadFile(after.dir + name), "trace dp_rank=");
    auto d = Records(ReadFile(during.dir + name), "trace dp_rank=");
    ASSERT_EQ(a.size(), static_cast<size_t>(kSteps));
    ASSERT_EQ(d.size(), a.size());
    for (size_t i = 0; i < a.size(); ++i) {
      EXPECT_EQ(Int(d[i], "push_bytes"), Int(a[i], "push_bytes"));
      EXPECT_GT(Int(a[i], "push_bytes"), 0);
      EXPECT_EQ(Int(a[i], "push_bytes_overlapped"), 0);
      // All of it when nothing this rank pushes is final last (tp rank 1
      // of the last stage pushes no wte).
      EXPECT_LE(Int(d[i], "push_bytes_overlapped"), Int(d[i], "push_bytes"));
      overlapped += Int(d[i], "push_bytes_overlapped");
    }
  }
  EXPECT_GT(overlapped, 0) << "nothing was pushed during a backward pass";
}

// The default local job's features work through a hybrid layout: eval
// through the pipeline, checkpoints, sample from the exported model.
TEST(PipelineTest, HybridJobEvaluatesAndSamples) {
  TrainRun run = Train(L(2, 2, 2, 2), "eval_interval: 2 eval_batches: 1 sample_tokens: 20");
  EXPECT_NE(run.result.output.find("sample:"), std::string::npos) << run.result.output;
  EXPECT_GT(ReadFile(run.dir + "/sample.txt").size(), 20u);
  auto diff = MaxAbsDiff(Baseline(), run.model);
  ASSERT_TRUE(diff.ok()) << diff.status();
  EXPECT_LE(*diff, kTolerance);
}

std::vector<std::string> LaunchArgs(const std::string& dir, const Layout& l) {
  return {BinaryPath("launcher/lmps_local"), "--job=" + dir + "/job.textproto",
          "--run_dir=" + dir, absl::StrCat("--workers=", l.dp),
          absl::StrCat("--pp=", l.pp), absl::StrCat("--tp=", l.tp),
          absl::StrCat("--micro_batches=", l.m), "--schedule=" + l.schedule,
          "--quiet", "--lease_s=2"};
}

// A checkpoint written under dp 1 x pp 2 x tp 2 resumes under dp 2 x pp 3 x
// tp 1 (shards hold whole tensors whatever the layout, so any layout reads
// them), ending where the uninterrupted one-worker run ends.
TEST(PipelineTest, CheckpointResumesUnderAnotherLayout) {
  const std::string dir = TempDir("relayout_pp_tp");
  WriteFile(dir + "/job.textproto", Job("stop_after_step: 2"));
  CommandResult first = RunCommand(LaunchArgs(dir, L(1, 2, 2, 2)), 300);
  ASSERT_EQ(first.exit_code, 0) << first.output;
  WriteFile(dir + "/job.textproto", Job());
  std::vector<std::string> argv = LaunchArgs(dir, L(2, 3, 1, 2, "gpipe"));
  argv.push_back("--resume");
  CommandResult second = RunCommand(argv, 300);
  ASSERT_EQ(second.exit_code, 0) << second.output;
  EXPECT_NE(ReadFile(dir + "/logs/worker-0.log").find("resume step 2"), std::string::npos)
      << ReadFile(dir + "/logs/worker-0.log");
  auto model = ReadSafetensorsFile(dir + "/model.safetensors");
  ASSERT_TRUE(model.ok()) << model.status();
  auto diff = MaxAbsDiff(Baseline(), *model);
  ASSERT_TRUE(diff.ok()) << diff.status();
  EXPECT_LE(*diff, kTolerance);
}

// A pipeline (or tensor-parallel) worker SIGKILLed as its step 3 starts:
// its partners cannot finish the step; the scheduler regroups the job at
// that step (no rollback: checkpoints are every 2 steps, the job resumes
// at 3), the launcher's replacement (or a spare worker started with the
// job) takes the lost rank, and the result equals the uninterrupted run bit
// for bit.
void ExpectLostWorkerReplacedExactly(const Layout& layout, bool spare) {
  const std::string train = "steps: 6 checkpoint_interval: 2";
  const std::string name = absl::StrCat("pp", layout.pp, "tp", layout.tp);
  const std::string straight = TempDir("straight_" + name);
  WriteFile(straight + "/job.textproto", Job(train));
  CommandResult a = RunCommand(LaunchArgs(straight, layout), 300);
  ASSERT_EQ(a.exit_code, 0) << a.output;

  const std::string faulty = TempDir("faulty_" + name);
  WriteFile(faulty + "/job.textproto", Job(train));
  std::vector<std::string> argv = LaunchArgs(faulty, layout);
  argv.push_back("--fault_worker=1");
  argv.push_back("--fault_kill_at_step=3");
  if (spare) {
    argv.push_back("--spare_workers=1");
    argv.push_back("--restart_workers=0");
  }
  CommandResult b = RunCommand(argv, 300);
  ASSERT_EQ(b.exit_code, 0) << b.output;
  EXPECT_NE(b.output.find(spare ? "worker-1 was killed by signal 9; a spare "
                                  "worker takes over its slot"
                                : "worker-1 was killed by signal 9; starting "
                                  "a replacement"),
            std::string::npos)
      << b.output;
  EXPECT_EQ(b.output.find("restarting the job"), std::string::npos) << b.output;
  const std::string scheduler = ReadFile(faulty + "/logs/scheduler.log");
  EXPECT_NE(scheduler.find("regroup: every live worker stopped at step 3 "
                           "(1 whose lease expired did not); re-assembling "
                           "with dp 1 (was 1)"),
            std::string::npos)
      << scheduler;
  EXPECT_NE(scheduler.find("start_step 3"), std::string::npos) << scheduler;
  ExpectSameExportedModel(straight, faulty);
}

TEST(PipelineTest, LostStageWorkerIsReplacedAndItsStepRedone) {
  ExpectLostWorkerReplacedExactly(L(1, 2, 1, 2), /*spare=*/false);
}

TEST(PipelineTest, LostTensorParallelWorkerIsReplacedByASpare) {
  ExpectLostWorkerReplacedExactly(L(1, 1, 2, 2), /*spare=*/true);
}

// A dead stage or tensor-parallel peer with no replacement: the partner's
// step fails with an error naming it (at once: the scheduler reports the
// lost worker, so nobody waits out train.peer_timeout_ms), the job
// regroups, and the re-assembly times out naming the missing rank; the
// partner exits with that error. Nothing hangs.
void ExpectPartnerFailsNamingDeadPeer(int pp, int tp) {
  const std::string dir = TempDir(absl::StrCat("dead_pp", pp, "tp", tp));
  WriteFile(dir + "/job.textproto",
            Job("", absl::StrCat("pp: ", pp, " tp: ", tp, " num_shards: 1")));
  BackgroundProcess scheduler(
      {BinaryPath("server/scheduler/lmps_scheduler"), "--job=" + dir + "/job.textproto",
       "--listen=127.0.0.1:0", "--port_file=" + dir + "/port", "--lease_s=2",
       "--assemble_timeout_s=15"},
      dir + "/scheduler.log");
  const std::string port(absl::StripAsciiWhitespace(WaitForFile(dir + "/port", 30)));
  ASSERT_FALSE(port.empty()) << ReadFile(dir + "/scheduler.log");
  const std::string sched = "--scheduler=127.0.0.1:" + port;
  BackgroundProcess server({BinaryPath("server/lmps_server"), sched,
                            "--listen=127.0.0.1:0", "--checkpoint_dir=" + dir + "/ckpt"},
                           dir + "/server.log");
  BackgroundProcess victim({BinaryPath("worker/lmps_worker"), sched, "--rank=1",
                            "--threads=1", "--fault_kill_at_step=1"},
                           dir + "/worker-1.log");
  const absl::Time start = absl::Now();
  BackgroundProcess partner({BinaryPath("worker/lmps_worker"), sched, "--rank=0",
                             "--threads=1"},
                            dir + "/worker-0.log");
  EXPECT_EQ(victim.Wait(120), -1) << "killed by a signal";
  const int code = partner.Wait(60);
  const std::string log = ReadFile(dir + "/worker-0.log");
  EXPECT_EQ(code, 1) << log;
  EXPECT_LT(absl::Now() - start, absl::Seconds(60));
  EXPECT_NE(log.find("step 1 failed ("), std::string::npos) << log;
  EXPECT_NE(log.find("worker-1 (dp 0, pp "), std::string::npos) << log;
  EXPECT_NE(log.find("error"), std::string::npos) << log;
  EXPECT_NE(log.find("worker rank 1 (dp 0, pp "), std::string::npos) << log;
}

TEST(PipelineTest, DeadStagePeerFailsThePartnerNamingIt) {
  ExpectPartnerFailsNamingDeadPeer(2, 1);
}

TEST(PipelineTest, DeadTensorParallelPeerFailsThePartnerNamingIt) {
  ExpectPartnerFailsNamingDeadPeer(1, 2);
}

}  // namespace
}  // namespace lmps::testing
