// Gradient compression with error feedback (train.compression) with the
// real binaries: a small job (2 workers, 2 shards, SGD with momentum, 200
// steps) ends within 2% of the uncompressed run's evaluation loss with
// top-k (ratio 0.1), random-k (0.5) and int8, and the progress line's push
// bytes per step shrink by the expected factor. Compression also composes
// with pipeline and tensor parallelism (each stage and tp rank compresses
// its own part of the push) and with ASYNC mode: each of those ends within
// 2% (5% for ASYNC, whose runs are not deterministic) of the same layout or
// mode uncompressed. Figures: docs/configuration.md, "Gradient
// compression".
#include <cmath>
#include <cstdlib>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "tests/test_util.h"

namespace lmps::testing {
namespace {

std::string Job(const std::string& train_extra) {
  return absl::StrCat(R"(
model { n_layer: 2 n_head: 2 n_embd: 32 block_size: 32 }
optimizer { type: SGD lr: 0.5 momentum: 0.9 warmup_steps: 2 }
max_chunk_bytes: 4096
max_message_bytes: 2048
train { batch_size: 8 steps: 200 eval_interval: 1000 eval_batches: 16
        sample_tokens: 0 checkpoint_interval: -1 )",
                      train_extra, " }\n");
}

// The final progress line's eval loss and push bytes (the last step's, all
// workers). `train_extra`: more fields of `train { }` (compression, mode);
// `flags`: more lmps_local flags (the layout; the default is --workers=2).
FinalProgress RunJob(const std::string& name, const std::string& train_extra,
                     std::vector<std::string> flags = {"--workers=2"}) {
  flags.push_back("--shards=2");
  return RunLocalJob(name, Job(train_extra), flags, 200);
}

TEST(CompressionTest, LossWithinTwoPercentAndFewerBytes) {
  const FinalProgress none = RunJob("none", "");
  ASSERT_TRUE(std::isfinite(none.eval));
  ASSERT_LT(none.eval, 4.0f);  // it trained (ln 256 = 5.55)
  struct Case {
    const char* name;
    const char* spec;
    double bytes_factor;  // of the dense push, expected
  };
  for (const Case& c : std::vector<Case>{
           {"topk", "compression { kind: TOPK ratio: 0.1 }", 2 * 0.1},
           {"randomk", "compression { kind: RANDOMK ratio: 0.5 }", 2 * 0.5},
           {"int8", "compression { kind: QUANT_INT8 }", 0.25},
       }) {
    SCOPED_TRACE(c.name);
    const FinalProgress r = RunJob(c.name, c.spec);
    EXPECT_LT(std::fabs(r.eval - none.eval), 0.02 * none.eval)
        << r.eval << " vs " << none.eval;
    // ceil(ratio * n) per slice and int8's scales: a little above.
    EXPECT_GE(r.push_bytes, 0.99 * c.bytes_factor * none.push_bytes);
    EXPECT_LE(r.push_bytes, 1.05 * c.bytes_factor * none.push_bytes);
  }
}

// Each case against the same layout and mode uncompressed.
TEST(CompressionTest, WithPipelineTensorParallelismAndAsync) {
  struct Case {
    const char* name;
    std::vector<std::string> flags;
    const char* mode;         // extra train fields of both runs
    const char* compression;  // of the compressed run
    double tolerance;         // relative, of the eval loss
  };
  for (const Case& c : std::vector<Case>{
           {"pp2_topk", {"--workers=1", "--pp=2"}, "",
            "compression { kind: TOPK ratio: 0.1 }", 0.02},
           {"dp2_tp2_int8", {"--workers=2", "--tp=2"}, "",
            "compression { kind: QUANT_INT8 }", 0.02},
           // ASYNC is timing-dependent: two uncompressed runs alone have
           // ended 3.35 and 3.59 (7%), so its bound is 8%.
           {"async_int8", {"--workers=2"}, "mode: ASYNC",
            "compression { kind: QUANT_INT8 }", 0.08},
       }) {
    SCOPED_TRACE(c.name);
    const FinalProgress none =
        RunJob(absl::StrCat(c.name, "_none"), c.mode, c.flags);
    ASSERT_TRUE(std::isfinite(none.eval));
    ASSERT_LT(none.eval, 4.0f);  // it trained (ln 256 = 5.55)
    const FinalProgress r = RunJob(c.name, absl::StrCat(c.mode, " ", c.compression),
                            c.flags);
    EXPECT_LT(std::fabs(r.eval - none.eval), c.tolerance * none.eval)
        << r.eval << " vs " << none.eval;
    EXPECT_LT(r.push_bytes, 0.3 * none.push_bytes);
  }
}

}  // namespace
}  // namespace lmps::testing
