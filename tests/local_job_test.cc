// The local launcher with the real binaries: a short run trains (the loss
// falls), writes checkpoints, exports the model and a sample; a run stopped
// at a checkpoint and resumed ends bit-identical to an uninterrupted run.
#include <signal.h>
#include <unistd.h>

#include <cctype>
#include <filesystem>
#include <cmath>
#include <cstdlib>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "common/formats/safetensors.h"
#include "gtest/gtest.h"
#include "tests/test_util.h"

namespace lmps::testing {
namespace {

namespace fs = std::filesystem;

std::string TinyJob(int steps, int checkpoint_interval, int stop_after = 0) {
  return absl::StrCat(R"(
model { n_layer: 2 n_head: 2 n_embd: 32 block_size: 32 }
optimizer { lr: 0.003 warmup_steps: 2 }
max_chunk_bytes: 4096
max_message_bytes: 2048
train { batch_size: 8 eval_interval: 10 sample_tokens: 40 )",
                      "steps: ", steps, " checkpoint_interval: ", checkpoint_interval,
                      " stop_after_step: ", stop_after, " }\n");
}

CommandResult RunLocal(const std::string& dir, const std::string& job,
                       std::vector<std::string> extra) {
  WriteFile(dir + "/job.in.textproto", job);
  std::vector<std::string> argv = {BinaryPath("launcher/lmps_local"),
                                   "--job=" + dir + "/job.in.textproto",
                                   "--run_dir=" + dir + "/run"};
  for (auto& e : extra) argv.push_back(e);
  return RunCommand(argv, 240);
}

// The value after `what` ("loss" or "eval") on the launcher's last progress
// line, e.g. "step 40/40 | loss 2.9 | eval 3.1 | ...".
float Final(const std::string& output, const std::string& what) {
  size_t line = output.rfind("step ");
  if (line == std::string::npos) return NAN;
  size_t at = output.find(what + " ", line);
  if (at == std::string::npos) return NAN;
  return std::strtof(output.c_str() + at + what.size() + 1, nullptr);
}

TEST(LocalJobTest, TrainsWritesCheckpointsExportsAndSamples) {
  const std::string dir = TempDir("train");
  CommandResult r = RunLocal(dir, TinyJob(40, 20), {"--workers=2", "--shards=2"});
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const std::string run = dir + "/run";
  // Initial loss of a byte-level model is ln(256) = 5.55.
  const size_t progress_end = r.output.find("lmps: checkpoints in");
  ASSERT_NE(progress_end, std::string::npos) << r.output;
  const std::string progress = r.output.substr(0, progress_end);
  EXPECT_LT(Final(progress, "loss"), 3.6) << r.output;
  EXPECT_LT(Final(progress, "eval"), 3.8) << r.output;
  EXPECT_NE(r.output.find("step 40/40"), std::string::npos) << r.output;
  for (const char* step : {"step_00000020", "step_00000040"}) {
    for (const char* shard : {"shard_0.ckpt", "shard_1.ckpt"}) {
      EXPECT_TRUE(fs::exists(absl::StrCat(run, "/ckpt/", step, "/", shard)))
          << step << "/" << shard;
    }
  }
  auto model = ReadSafetensorsFile(run + "/model.safetensors");
  ASSERT_TRUE(model.ok()) << model.status();
  ASSERT_NE(model->Find("wte.weight"), nullptr);
  EXPECT_EQ(model->Find("wte.weight")->shape, (std::vector<int64_t>{256, 32}));
  const std::string sample = ReadFile(run + "/sample.txt");
  EXPECT_GE(sample.size(), 40u);
  EXPECT_NE(r.output.find("sample:"), std::string::npos);

  // The step log: steps 0..39 in order, each with both workers' phases;
  // evaluations (every 10 steps and at the end) carry eval_loss.
  const std::vector<std::string> steps =
      absl::StrSplit(ReadFile(run + "/steps.jsonl"), '\n', absl::SkipEmpty());
  ASSERT_EQ(steps.size(), 40u) << r.output;
  int evals = 0;
  for (int i = 0; i < 40; ++i) {
    EXPECT_TRUE(absl::StartsWith(steps[i], absl::StrCat("{\"step\":", i, ",")))
        << steps[i];
    for (const char* key : {"\"loss\":", "\"lr\":", "\"grad_norm\":",
                            "\"tokens_per_second\":", "\"worker-0\":{",
                            "\"worker-1\":{", "\"compute_s\":"}) {
      EXPECT_TRUE(absl::StrContains(steps[i], key)) << key << " in " << steps[i];
    }
    evals += absl::StrContains(steps[i], "\"eval_loss\":");
  }
  EXPECT_EQ(evals, 4);  // at steps 10, 20, 30 and after the last
  EXPECT_NE(r.output.find("lmps: 40 steps logged in " + run + "/steps.jsonl"),
            std::string::npos)
      << r.output;
  // The run report charts them: a point per step on the loss curve.
  const std::string report = ReadFile(run + "/report.html");
  EXPECT_TRUE(absl::StrContains(
      report, "data-name=\"train\" data-points=\"40\""))
      << report.substr(0, 2000);
  EXPECT_TRUE(absl::StrContains(report, "<pre id=\"sample\">")) << report;
  // The scheduler's events (registrations, the job's states) are logged
  // and listed.
  const std::string events = ReadFile(run + "/events.jsonl");
  EXPECT_TRUE(absl::StrContains(events, "-> RUNNING")) << events;
  EXPECT_TRUE(absl::StrContains(report, "<table id=\"events\">")) << report;
  EXPECT_NE(r.output.find("lmps: report in " + run + "/report.html"),
            std::string::npos)
      << r.output;
}

TEST(LocalJobTest, ResumeContinuesExactly) {
  const std::string job = TinyJob(6, 3);
  const std::string straight = TempDir("straight");
  CommandResult a = RunLocal(straight, job, {"--workers=2", "--shards=2"});
  ASSERT_EQ(a.exit_code, 0) << a.output;

  const std::string resumed = TempDir("resumed");
  CommandResult b1 = RunLocal(resumed, TinyJob(6, 3, 3),
                              {"--workers=2", "--shards=2"});
  ASSERT_EQ(b1.exit_code, 0) << b1.output;
  ASSERT_TRUE(fs::exists(resumed + "/run/ckpt/step_00000003/shard_1.ckpt"));
  ASSERT_FALSE(fs::exists(resumed + "/run/ckpt/step_00000006"));
  CommandResult b2 = RunLocal(resumed, job, {"--workers=2", "--shards=2", "--resume"});
  ASSERT_EQ(b2.exit_code, 0) << b2.output;
  // The resumed run continued the step log: steps 0..5 once each.
  const std::vector<std::string> steps = absl::StrSplit(
      ReadFile(resumed + "/run/steps.jsonl"), '\n', absl::SkipEmpty());
  ASSERT_EQ(steps.size(), 6u) << ReadFile(resumed + "/run/steps.jsonl");
  for (int i = 0; i < 6; ++i) {
    EXPECT_TRUE(absl::StartsWith(steps[i], absl::StrCat("{\"step\":", i, ",")))
        << steps[i];
  }
  const std::string logs = ReadFile(resumed + "/run/logs/worker-0.log") +
                           ReadFile(resumed + "/run/logs/worker-1.log");
  EXPECT_NE(logs.find("resume step 3"), std::string::npos) << logs;

  auto ma = ReadSafetensorsFile(straight + "/run/model.safetensors");
  auto mb = ReadSafetensorsFile(resumed + "/run/model.safetensors");
  ASSERT_TRUE(ma.ok() && mb.ok());
  auto diff = MaxAbsDiff(*ma, *mb);
  ASSERT_TRUE(diff.ok()) << diff.status();
  EXPECT_EQ(*diff, 0.0) << "resumed training must equal uninterrupted training";
}

// Processes whose command line mentions `needle` (other than this test).
int CountProcessesMentioning(const std::string& needle) {
  int count = 0;
  for (const auto& entry : fs::directory_iterator("/proc")) {
    const std::string pid = entry.path().filename().string();
    if (pid.find_first_not_of("0123456789") != std::string::npos) continue;
    if (std::stoi(pid) == getpid()) continue;
    std::string cmdline = ReadFile(entry.path().string() + "/cmdline");
    if (cmdline.find(needle) != std::string::npos) ++count;
  }
  return count;
}

// Ctrl-C stops every process the launcher started and leaves none behind.
TEST(LocalJobTest, InterruptStopsEveryProcess) {
  const std::string dir = TempDir("interrupt");
  WriteFile(dir + "/job.textproto", TinyJob(100000, 1000000));
  BackgroundProcess launcher({BinaryPath("launcher/lmps_local"),
                              "--job=" + dir + "/job.textproto",
                              "--run_dir=" + dir + "/run", "--workers=2",
                              "--shards=2"},
                             dir + "/launcher.log");
  // Wait until training runs.
  bool running = false;
  for (int i = 0; i < 600 && !running; ++i) {
    const std::string log = ReadFile(dir + "/launcher.log");
    const size_t at = log.rfind("| loss ");
    running = at != std::string::npos && at + 7 < log.size() &&
              std::isdigit(static_cast<unsigned char>(log[at + 7]));
    absl::SleepFor(absl::Milliseconds(50));
  }
  ASSERT_TRUE(running) << ReadFile(dir + "/launcher.log");
  // The launcher and its 5 daemons (1 scheduler, 2 shards, 2 workers).
  EXPECT_EQ(CountProcessesMentioning(dir + "/run"), 6);
  kill(launcher.pid(), SIGINT);
  const int code = launcher.Wait(20);
  EXPECT_EQ(code, 1) << ReadFile(dir + "/launcher.log");
  EXPECT_NE(ReadFile(dir + "/launcher.log").find("interrupted"), std::string::npos);
  EXPECT_EQ(CountProcessesMentioning(dir + "/run"), 0);
}

}  // namespace
}  // namespace lmps::testing
