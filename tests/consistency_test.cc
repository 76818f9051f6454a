// Consistency modes with the real binaries (lmps_local: scheduler, 2 shards,
// 2 workers), data-parallel rank 1 made a straggler with the job spec's test
// knobs (train.debug_slow_worker_*), every worker tracing its steps
// (train.debug_trace_steps: step, pulled version, staleness, steady-clock
// times of the end of its pull and the start of its push).
//
// - BOUNDED_STALENESS with staleness 0 reaches exactly SYNC's parameters
//   (bit for bit: same per-step rank-ordered aggregation and global-norm
//   clipping; only the timing differs).
// - BOUNDED_STALENESS with staleness s = 2: the fast worker never computes
//   step t before the slow one started pushing step t - s - 1 (a pull for t
//   needs version t - s, i.e. the slow replica's push of t - s - 1), checked
//   on the two processes' own clocks; the bound is reached (the fast worker
//   really runs s steps ahead) and the servers report max staleness s; the
//   result differs from SYNC.
// - ASYNC: the fast worker runs far ahead of the slow one, and the loss
//   still falls.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/formats/safetensors.h"
#include "gtest/gtest.h"
#include "tests/test_util.h"

namespace lmps::testing {
namespace {

constexpr int kSteps = 12;
constexpr int kSlowRank = 1;
constexpr int kFastRank = 0;

std::string Job(const std::string& train_extra) {
  return absl::StrCat(R"(
model { n_layer: 2 n_head: 2 n_embd: 32 block_size: 16 }
optimizer { lr: 0.003 grad_clip: 0.5 }
train { steps: )",
                      kSteps, R"( batch_size: 8 eval_interval: 0
        sample_tokens: 0 debug_trace_steps: true )",
                      train_extra, R"( }
layout { dp: 2 num_shards: 2 }
max_chunk_bytes: 2048
max_message_bytes: 1024
)");
}

std::string SlowWorker(int delay_ms) {
  return absl::StrCat("debug_slow_worker_rank: ", kSlowRank,
                      " debug_slow_worker_delay_ms: ", delay_ms);
}

struct JobRun {
  std::string dir;
  CommandResult result;
  SafetensorsContents model;
};

JobRun Train(const std::string& name, const std::string& job,
             const std::vector<std::string>& extra_flags = {}) {
  JobRun run;
  run.dir = TempDir(name);
  WriteFile(run.dir + "/job.textproto", job);
  std::vector<std::string> argv = {BinaryPath("launcher/lmps_local"),
                                   "--job=" + run.dir + "/job.textproto",
                                   "--run_dir=" + run.dir, "--workers=2",
                                   "--shards=2", "--quiet"};
  argv.insert(argv.end(), extra_flags.begin(), extra_flags.end());
  run.result = RunCommand(argv, 240);
  EXPECT_EQ(run.result.exit_code, 0) << run.result.output;
  auto model = ReadSafetensorsFile(run.dir + "/model.safetensors");
  EXPECT_TRUE(model.ok()) << model.status() << run.result.output;
  if (model.ok()) run.model = *std::move(model);
  return run;
}

struct TraceStep {
  int64_t step = -1, pulled_version = -1, staleness = -1;
  double loss = 0;
  int64_t pull_done_us = 0, push_start_us = 0, push_done_us = 0;
};

struct Traces {
  std::map<int, std::vector<TraceStep>> steps;  // dp rank -> steps in order
  std::map<int, std::string> logs;             // dp rank -> its worker log
};

Traces ReadTraces(const std::string& dir) {
  Traces out;
  for (int w = 0; w < 2; ++w) {
    const std::string text =
        ReadFile(absl::StrCat(dir, "/logs/worker-", w, ".log"));
    std::istringstream log(text);
    std::string line;
    while (std::getline(log, line)) {
      const size_t at = line.find("trace dp_rank=");
      if (at == std::string::npos) continue;
      int rank = -1;
      long long step, version, staleness, pull_done, push_start, push_done;
      double loss;
      const int fields = std::sscanf(
          line.c_str() + at,
          "trace dp_rank=%d step=%lld pulled_version=%lld staleness=%lld "
          "loss=%lf pull_done_us=%lld push_start_us=%lld push_done_us=%lld",
          &rank, &step, &version, &staleness, &loss, &pull_done, &push_start,
          &push_done);
      EXPECT_EQ(fields, 8) << line;
      if (fields != 8) continue;
      out.steps[rank].push_back(
          {step, version, staleness, loss, pull_done, push_start, push_done});
      out.logs[rank] = text;
    }
  }
  return out;
}

// For each step t of the fast worker: t minus the number of pushes the slow
// worker had started when the fast worker's pull of t returned, i.e. how many
// steps ahead of the slow replica it computed step t. Steady-clock times are
// comparable between processes on one host.
std::vector<int64_t> Leads(const std::vector<TraceStep>& fast,
                           const std::vector<TraceStep>& slow) {
  std::vector<int64_t> leads;
  for (const TraceStep& f : fast) {
    int64_t started = 0;
    for (const TraceStep& s : slow) {
      if (s.push_start_us < f.pull_done_us) ++started;
    }
    leads.push_back(f.step - started);
  }
  return leads;
}

// "max staleness seen N steps" from every shard's end-of-training line.
std::vector<int64_t> ServerMaxStaleness(const std::string& dir) {
  std::vector<int64_t> out;
  for (int s = 0; s < 2; ++s) {
    const std::string log =
        ReadFile(absl::StrCat(dir, "/logs/server-", s, ".log"));
    const size_t at = log.find("max staleness seen ");
    EXPECT_NE(at, std::string::npos) << log;
    if (at == std::string::npos) continue;
    out.push_back(std::stoll(log.substr(at + 19)));
  }
  return out;
}

const JobRun& SyncRun() {
  static const JobRun* run = new JobRun(Train("sync", Job("mode: SYNC")));
  return *run;
}

double MaxAbs(const SafetensorsContents& m, const std::string& tensor) {
  const SafeTensor* t = m.Find(tensor);
  EXPECT_NE(t, nullptr) << tensor;
  double out = 0;
  if (t != nullptr) {
    for (float v : t->data) {
      out = std::max(out, static_cast<double>(std::fabs(v)));
    }
  }
  return out;
}

TEST(ConsistencyTest, StalenessZeroEqualsSyncBitForBit) {
  const JobRun& sync = SyncRun();
  const JobRun ssp0 = Train(
      "ssp0", Job(absl::StrCat("mode: BOUNDED_STALENESS staleness: 0 ",
                               SlowWorker(40))));
  auto diff = MaxAbsDiff(sync.model, ssp0.model);
  ASSERT_TRUE(diff.ok()) << diff.status();
  EXPECT_EQ(*diff, 0.0);
  // Not vacuous: training moved the parameters (c_fc biases start at 0).
  EXPECT_GT(MaxAbs(ssp0.model, "h.0.mlp.c_fc.bias"), 1e-4);
  // With s = 0 every step is computed on fresh parameters.
  Traces traces = ReadTraces(ssp0.dir);
  ASSERT_EQ(traces.steps[kFastRank].size(), static_cast<size_t>(kSteps));
  ASSERT_EQ(traces.steps[kSlowRank].size(), static_cast<size_t>(kSteps));
  for (const auto& [rank, steps] : traces.steps) {
    for (const TraceStep& t : steps) {
      EXPECT_EQ(t.pulled_version, t.step) << "rank " << rank;
      EXPECT_EQ(t.staleness, 0);
    }
  }
  for (int64_t m : ServerMaxStaleness(ssp0.dir)) EXPECT_EQ(m, 0);
}

TEST(ConsistencyTest, BoundedStalenessKeepsTheFastWorkerWithinTheBound) {
  constexpr int kBound = 2;
  const JobRun ssp = Train(
      "ssp2", Job(absl::StrCat("mode: BOUNDED_STALENESS staleness: ", kBound,
                               " ", SlowWorker(250))));
  Traces traces = ReadTraces(ssp.dir);
  const auto& fast = traces.steps[kFastRank];
  const auto& slow = traces.steps[kSlowRank];
  ASSERT_EQ(fast.size(), static_cast<size_t>(kSteps));
  ASSERT_EQ(slow.size(), static_cast<size_t>(kSteps));

  int64_t max_staleness = 0;
  for (const TraceStep& t : fast) {
    // What the fast worker saw: never more than s versions behind.
    EXPECT_GE(t.pulled_version, t.step - kBound) << "step " << t.step;
    EXPECT_EQ(t.staleness, t.step - t.pulled_version);
    max_staleness = std::max(max_staleness, t.staleness);
  }
  // What really happened, on the processes' clocks.
  const std::vector<int64_t> leads = Leads(fast, slow);
  int64_t max_lead = 0;
  for (size_t i = 0; i < leads.size(); ++i) {
    EXPECT_LE(leads[i], kBound) << "the fast worker computed step "
                                << fast[i].step << " " << leads[i]
                                << " steps ahead of the slow one";
    max_lead = std::max(max_lead, leads[i]);
  }
  // The bound is reached: the fast worker did run ahead as far as allowed.
  EXPECT_EQ(max_staleness, kBound);
  EXPECT_EQ(max_lead, kBound);
  for (int64_t m : ServerMaxStaleness(ssp.dir)) EXPECT_EQ(m, kBound);

  // Stale gradients change the result (the mode is not SYNC in disguise).
  auto diff = MaxAbsDiff(SyncRun().model, ssp.model);
  ASSERT_TRUE(diff.ok()) << diff.status();
  EXPECT_GT(*diff, 1e-6);
}

TEST(ConsistencyTest, AsyncLetsTheFastWorkerRunAheadAndTheLossFalls) {
  const JobRun run = Train(
      "async", Job(absl::StrCat("mode: ASYNC eval_interval: 1000 ",
                                SlowWorker(250))));
  Traces traces = ReadTraces(run.dir);
  const auto& fast = traces.steps[kFastRank];
  const auto& slow = traces.steps[kSlowRank];
  ASSERT_EQ(fast.size(), static_cast<size_t>(kSteps));
  ASSERT_EQ(slow.size(), static_cast<size_t>(kSteps));
  const std::vector<int64_t> leads = Leads(fast, slow);
  const int64_t max_lead = *std::max_element(leads.begin(), leads.end());
  // Far beyond what staleness 2 would allow: nothing holds it back.
  EXPECT_GE(max_lead, 5);
  for (int64_t m : ServerMaxStaleness(run.dir)) EXPECT_GE(m, 5);
  // Pulls do not wait: the fast worker's versions count both replicas'
  // pushes, and its reported staleness grows as it runs ahead.
  EXPECT_GT(fast.back().staleness, 0);

  // The loss falls: the final evaluation (every push of both replicas
  // applied) is well below the first step's loss (about ln 256 = 5.55).
  const double first = fast.front().loss;
  EXPECT_GT(first, 5.0);
  const std::string& log = traces.logs[0];  // dp rank 0 evaluates
  const size_t at = log.find("done: step");
  ASSERT_NE(at, std::string::npos) << log;
  const size_t eval_at = log.find(" eval ", at);
  ASSERT_NE(eval_at, std::string::npos) << log;
  const double eval = std::stod(log.substr(eval_at + 6));
  EXPECT_LT(eval, first - 0.5) << log;
  // And it is a sane model: trained and finite.
  EXPECT_GT(MaxAbs(run.model, "h.0.mlp.c_fc.bias"), 1e-4);
  for (const SafeTensor& t : run.model.tensors) {
    for (float v : t.data) ASSERT_TRUE(std::isfinite(v)) << t.name;
  }
}

// ASYNC with a worker SIGKILLed mid-push (shard 0 has its step, shard 1
// not): the replacement resumes at its replica's clock (the smallest over
// shards of the steps it completely pushed), its repeat of the half-pushed
// step is a duplicate where it had arrived, and every shard applies exactly
// dp x steps updates (the final pull waits for exactly that version).
TEST(ConsistencyTest, AsyncReplacementResumesAtItsReplicasClock) {
  const JobRun run = Train(
      "async_fault", Job(absl::StrCat("mode: ASYNC eval_interval: 1000 ",
                                      SlowWorker(100))),
      {"--fault_worker=1", "--fault_kill_at_step=4", "--lease_s=2"});
  const std::string killed = ReadFile(run.dir + "/logs/worker-1.log");
  EXPECT_NE(killed.find("fault injection: SIGKILL mid-push of step 4: shard 0 "
                        "accepted its push, 0 other shards had accepted theirs"),
            std::string::npos)
      << killed;
  const std::string replacement =
      ReadFile(run.dir + "/logs/worker-1.restart1.log");
  EXPECT_NE(replacement.find("joining a running ASYNC job at step 4"),
            std::string::npos)
      << replacement;
  for (int s = 0; s < 2; ++s) {
    const std::string log = ReadFile(absl::StrCat(run.dir, "/logs/server-", s, ".log"));
    EXPECT_NE(log.find(absl::StrCat("replica clocks [", kSteps, ", ", kSteps, "]")),
              std::string::npos)
        << log;
    EXPECT_NE(log.find(absl::StrCat(", version ", 2 * kSteps)), std::string::npos) << log;
  }
}

}  // namespace
}  // namespace lmps::testing
