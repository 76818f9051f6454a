// Sync-mode equivalence: W workers and S shards reach the same parameters
// after several steps as one worker with one shard on the same global batch;
// layer-wise pulls reach the whole pull's bit for bit. (bf16 pulls,
// train.pull_dtype BF16, are not exact and not run here: CPU workers pull
// F32 by default; tests/bf16_pull_test checks their convergence.)
//
// Tolerance: max |difference| <= 2e-5 on every parameter after 4 steps. The
// only difference between layouts is the order of floating-point summation
// (per-replica gradient means summed on the servers versus one mean over the
// whole batch), about 1e-7 relative per step. AdamW's update is bounded by
// lr (here 1e-3) per step, so a lost, doubled or misplaced gradient moves
// parameters by ~1e-3 and fails loudly; but AdamW hardly reacts when every
// gradient is scaled by one constant, so the layouts are also run with plain
// SGD (lr 0.5, no momentum, no clipping), whose update is proportional to
// the gradient: a wrong 1/M or 1/dp factor moves parameters by ~1e-2.
#include <map>
#include <string>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/formats/safetensors.h"
#include "gtest/gtest.h"
#include "tests/test_util.h"

namespace lmps::testing {
namespace {

constexpr double kTolerance = 2e-5;

constexpr char kAdamW[] = "lr: 0.001";
constexpr char kSgd[] =
    "type: SGD lr: 0.5 momentum: -1 weight_decay: -1 grad_clip: -1";

constexpr char kJob[] = R"(
model { n_layer: 2 n_head: 2 n_embd: 32 block_size: 16 }
optimizer { OPTIMIZER }
train { steps: 4 batch_size: 12 eval_interval: 0 sample_tokens: 0 }
max_chunk_bytes: 2048
max_message_bytes: 1024
)";

// `train_extra`: more train fields (a run directory of its own).
SafetensorsContents Train(int workers, int shards, int micro_batches = 1,
                          const std::string& optimizer = kAdamW,
                          const std::string& train_extra = "") {
  const std::string dir =
      TempDir(absl::StrCat("w", workers, "s", shards, "m", micro_batches,
                           optimizer == kAdamW ? "" : "_sgd",
                           train_extra.empty() ? "" : "_extra"));
  std::string job = kJob;
  job.replace(job.find("OPTIMIZER"), 9, optimizer);
  if (!train_extra.empty()) {
    job.replace(job.find("sample_tokens: 0"), 16,
                "sample_tokens: 0 " + train_extra);
  }
  if (micro_batches > 1) {
    job.replace(job.find("batch_size: 12"), 14,
                absl::StrCat("batch_size: 12 micro_batches: ", micro_batches));
  }
  WriteFile(dir + "/job.textproto", job);
  CommandResult r = RunCommand({BinaryPath("launcher/lmps_local"),
                         "--job=" + dir + "/job.textproto", "--run_dir=" + dir,
                         absl::StrCat("--workers=", workers),
                         absl::StrCat("--shards=", shards), "--quiet"},
                        180);
  EXPECT_EQ(r.exit_code, 0) << r.output;
  auto model = ReadSafetensorsFile(dir + "/model.safetensors");
  EXPECT_TRUE(model.ok()) << model.status() << r.output;
  return model.ok() ? *model : SafetensorsContents();
}

class EquivalenceTest : public ::testing::TestWithParam<std::pair<int, int>> {
 protected:
  static const SafetensorsContents& Baseline() {
    static const SafetensorsContents* baseline =
        new SafetensorsContents(Train(1, 1));
    return *baseline;
  }
};

TEST_P(EquivalenceTest, MatchesOneWorkerOneShard) {
  const auto [workers, shards] = GetParam();
  SafetensorsContents got = Train(workers, shards);
  auto diff = MaxAbsDiff(Baseline(), got);
  ASSERT_TRUE(diff.ok()) << diff.status();
  EXPECT_LE(*diff, kTolerance) << workers << " workers, " << shards << " shards";
  // And training really moved the parameters (the comparison is not vacuous):
  // the c_fc bias starts at zero.
  const SafeTensor* b = got.Find("h.0.mlp.c_fc.bias");
  ASSERT_NE(b, nullptr);
  double moved = 0;
  for (float v : b->data) moved = std::max(moved, static_cast<double>(std::fabs(v)));
  EXPECT_GT(moved, 1e-4);
}

// Gradient accumulation: 2 workers x 3 micro-batches of 2 sequences equal
// one worker computing all 12 at once.
TEST_F(EquivalenceTest, MicroBatchesMatchOneBatch) {
  auto diff = MaxAbsDiff(Baseline(), Train(2, 2, 3));
  ASSERT_TRUE(diff.ok()) << diff.status();
  EXPECT_LE(*diff, kTolerance);
}

// Layer-wise pull pipelining (train.layerwise_pull ON; CPU workers default
// to OFF, the whole pull before the forward pass, which every run above
// uses) is exact: it reaches the whole pull's parameters bit for bit, with
// 2 workers x 2 shards and with 2 micro-batches; with one shard the whole
// pull comes in the push's answer (PushRequest.then_pull, through shared
// memory).
TEST(LayerwisePullTest, BitIdenticalToTheWholePull) {
  for (const auto [shards, micro_batches] :
       {std::pair{2, 1}, {2, 2}, {1, 1}}) {
    SCOPED_TRACE(absl::StrCat(shards, " shards, ", micro_batches,
                              " micro-batches"));
    const SafetensorsContents on = Train(2, shards, micro_batches, kSgd,
                                         "layerwise_pull: LAYERWISE_PULL_ON");
    const SafetensorsContents off = Train(2, shards, micro_batches, kSgd);
    auto diff = MaxAbsDiff(on, off);
    ASSERT_TRUE(diff.ok()) << diff.status();
    EXPECT_EQ(*diff, 0.0);
  }
}

// The same with plain SGD, whose update is proportional to the gradient
// (see the top): data-parallel replicas, shards and micro-batches.
class SgdEquivalenceTest : public ::testing::TestWithParam<std::pair<int, int>> {
 protected:
  static const SafetensorsContents& Baseline() {
    static const SafetensorsContents* baseline =
        new SafetensorsContents(Train(1, 1, 1, kSgd));
    return *baseline;
  }
};

TEST_P(SgdEquivalenceTest, MatchesOneWorkerOneShard) {
  const auto [workers, micro_batches] = GetParam();
  SafetensorsContents got = Train(workers, 2, micro_batches, kSgd);
  auto diff = MaxAbsDiff(Baseline(), got);
  ASSERT_TRUE(diff.ok()) << diff.status();
  EXPECT_LE(*diff, kTolerance) << workers << " workers, " << micro_batches
                               << " micro-batches";
}

INSTANTIATE_TEST_SUITE_P(
    Layouts, SgdEquivalenceTest,
    ::testing::Values(std::make_pair(1, 3), std::make_pair(2, 1),
                      std::make_pair(2, 3), std::make_pair(3, 2)),
    [](const auto& info) {
      return absl::StrCat("w", info.param.first, "s2m", info.param.second);
    });

INSTANTIATE_TEST_SUITE_P(
    Layouts, EquivalenceTest,
    ::testing::Values(std::make_pair(1, 2), std::make_pair(1, 3),
                      std::make_pair(2, 1), std::make_pair(2, 2),
                      std::make_pair(2, 3), std::make_pair(3, 1),
                      std::make_pair(3, 2), std::make_pair(3, 3)),
    [](const auto& info) {
      return absl::StrCat("w", info.param.first, "s", info.param.second);
    });

}  // namespace
}  // namespace lmps::testing
