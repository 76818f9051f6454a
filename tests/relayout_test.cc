// Resuming under another layout with the real binaries: a job trained by 2
// workers and 2 shards stops at a checkpoint (train.stop_after_step); it is
// resumed (lmps_local --resume) with other numbers of workers and shards and
// another max_chunk_bytes. Each new shard rebuilds its chunks, parameters
// and AdamW state, from the old shards' files (server/reshard.h); workers
// need nothing, since the global batch is the spec's and the data order a
// function of (seed, step, rank) over it.
//
// Tolerance: the final parameters must equal an uninterrupted run of one
// worker and one shard within 2e-5 absolute, as in tests/equivalence_test.cc
// and for the same reason. Resharding itself is byte-exact (params and
// optimizer state; server/reshard_test.cc) and resuming on one layout is
// bit-identical (tests/local_job_test.cc); what differs between the runs is
// only the order of floating-point summation of the layouts the steps ran
// under (per-replica gradient means summed on the servers versus one mean
// over the whole batch; per-shard partial sums of the gradient norm), about
// 1e-7 relative per step. AdamW moves a parameter by up to lr = 1e-3 per
// step, so a lost, doubled, misplaced or reset chunk (or optimizer state
// restarted from zero) is off by ~1e-4 or more and fails loudly.
//
// With the number of workers unchanged (2) and only the shard count changed
// the run must equal the uninterrupted 2-worker, 2-shard run bit for bit:
// gradients are averaged per element in rank order whatever the shard
// count, and the clip scale, computed in double precision from the shards'
// partial sums, rounds to the same float.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/formats/safetensors.h"
#include "gtest/gtest.h"
#include "tests/test_util.h"

namespace lmps::testing {
namespace {

namespace fs = std::filesystem;

constexpr double kTolerance = 2e-5;
constexpr int kStopAt = 2;

std::string Job(int stop_after_step, int max_chunk_bytes) {
  return absl::StrCat(R"(
model { n_layer: 2 n_head: 2 n_embd: 32 block_size: 16 }
optimizer { lr: 0.001 }
max_message_bytes: 1024
train { steps: 4 batch_size: 12 eval_interval: 0 sample_tokens: 0 )",
                      "stop_after_step: ", stop_after_step, " }\n",
                      "max_chunk_bytes: ", max_chunk_bytes, "\n");
}

CommandResult RunLocal(const std::string& dir, const std::string& job,
                       int workers, int shards, bool resume) {
  WriteFile(dir + "/job.in.textproto", job);
  std::vector<std::string> argv = {
      BinaryPath("launcher/lmps_local"), "--job=" + dir + "/job.in.textproto",
      "--run_dir=" + dir + "/run", absl::StrCat("--workers=", workers),
      absl::StrCat("--shards=", shards), "--quiet"};
  if (resume) argv.push_back("--resume");
  return RunCommand(argv, 180);
}

SafetensorsContents Model(const std::string& dir) {
  auto model = ReadSafetensorsFile(dir + "/run/model.safetensors");
  EXPECT_TRUE(model.ok()) << model.status();
  return model.ok() ? *model : SafetensorsContents();
}

std::string Logs(const std::string& dir, const std::string& role, int n) {
  std::string out;
  for (int i = 0; i < n; ++i) {
    out += ReadFile(absl::StrCat(dir, "/run/logs/", role, "-", i, ".log"));
  }
  return out;
}

class RelayoutTest : public ::testing::Test {
 protected:
  // Trained by 2 workers and 2 shards up to kStopAt, once per test binary.
  static const std::string& Stopped() {
    static const std::string* dir = [] {
      const std::string d = TempDir("stopped_w2s2");
      CommandResult r = RunLocal(d, Job(kStopAt, 2048), 2, 2, false);
      EXPECT_EQ(r.exit_code, 0) << r.output;
      for (int s = 0; s < 2; ++s) {
        EXPECT_TRUE(fs::exists(absl::StrCat(d, "/run/ckpt/step_0000000",
                                            kStopAt, "/shard_", s, ".ckpt")));
      }
      EXPECT_FALSE(fs::exists(d + "/run/ckpt/step_00000004"));
      return new std::string(d);
    }();
    return *dir;
  }

  static const SafetensorsContents& Baseline(int workers, int shards) {
    static auto* cache = new std::map<std::pair<int, int>, SafetensorsContents>;
    auto it = cache->find({workers, shards});
    if (it == cache->end()) {
      const std::string d =
          TempDir(absl::StrCat("straight_w", workers, "s", shards));
      CommandResult r = RunLocal(d, Job(0, 2048), workers, shards, false);
      EXPECT_EQ(r.exit_code, 0) << r.output;
      it = cache->emplace(std::make_pair(workers, shards), Model(d)).first;
    }
    return it->second;
  }

  // A copy of the stopped run resumed with `workers` x `shards`; returns
  // its directory.
  static std::string Resume(int workers, int shards, int max_chunk_bytes) {
    const std::string d = TempDir(
        absl::StrCat("resumed_w", workers, "s", shards, "c", max_chunk_bytes));
    fs::copy(Stopped(), d, fs::copy_options::recursive);
    CommandResult r =
        RunLocal(d, Job(0, max_chunk_bytes), workers, shards, true);
    EXPECT_EQ(r.exit_code, 0) << r.output;
    const std::string workers_log = Logs(d, "worker", workers);
    EXPECT_NE(workers_log.find(absl::StrCat("resume step ", kStopAt)),
              std::string::npos)
        << workers_log;
    for (int s = 0; s < shards; ++s) {
      EXPECT_TRUE(fs::exists(
          absl::StrCat(d, "/run/ckpt/step_00000004/shard_", s, ".ckpt")));
    }
    return d;
  }

  static void ExpectResharded(const std::string& dir, int shards) {
    for (int s = 0; s < shards; ++s) {
      const std::string log =
          ReadFile(absl::StrCat(dir, "/run/logs/server-", s, ".log"));
      EXPECT_NE(log.find(absl::StrCat("resumed from step ", kStopAt,
                                      " written by 2 shards")),
                std::string::npos)
          << "server-" << s << ":\n"
          << log;
    }
  }

  static void ExpectMatches(const SafetensorsContents& want,
                            const std::string& dir, double tolerance) {
    SafetensorsContents got = Model(dir);
    auto diff = MaxAbsDiff(want, got);
    ASSERT_TRUE(diff.ok()) << diff.status();
    EXPECT_LE(*diff, tolerance) << dir;
    std::printf("%s: max |difference| %g (tolerance %g)\n", dir.c_str(),
                *diff, tolerance);
    // Training after the resume moved the parameters (not vacuous): the
    // c_fc bias starts at zero.
    const SafeTensor* b = got.Find("h.0.mlp.c_fc.bias");
    ASSERT_NE(b, nullptr);
    double moved = 0;
    for (float v : b->data) {
      moved = std::max(moved, static_cast<double>(std::fabs(v)));
    }
    EXPECT_GT(moved, 1e-4);
  }
};

// 2 workers x 2 shards -> 1 worker x 3 shards.
TEST_F(RelayoutTest, MoreShardsFewerWorkers) {
  const std::string d = Resume(1, 3, 2048);
  ExpectResharded(d, 3);
  ExpectMatches(Baseline(1, 1), d, kTolerance);
}

// 2 workers x 2 shards -> 3 workers x 1 shard, and other chunk boundaries
// (max_chunk_bytes 2048 -> 1024).
TEST_F(RelayoutTest, OneShardMoreWorkersOtherChunkSize) {
  const std::string d = Resume(3, 1, 1024);
  ExpectResharded(d, 1);
  ExpectMatches(Baseline(1, 1), d, kTolerance);
}

// A dp change alone: the shards load their own files as before.
TEST_F(RelayoutTest, WorkerCountOnly) {
  const std::string d = Resume(3, 2, 2048);
  const std::string servers = Logs(d, "server", 2);
  EXPECT_NE(servers.find("resumed from checkpoint"), std::string::npos)
      << servers;
  ExpectMatches(Baseline(1, 1), d, kTolerance);
}

// Shard count alone: bit-identical to the uninterrupted run of the old
// layout.
TEST_F(RelayoutTest, ShardCountOnlyIsExact) {
  const std::string d = Resume(2, 3, 2048);
  ExpectResharded(d, 3);
  ExpectMatches(Baseline(2, 2), d, 0.0);
}

}  // namespace
}  // namespace lmps::testing
