#include "common/model/job_spec.h"

#include <cstdlib>
#include <string>
#include <vector>

#include "gtest/gtest.h"

namespace lmps {
namespace {

// The spec is refused with InvalidArgument and a message containing
// `needle` (the key phrase a user reads).
void ExpectInvalid(const std::string& text, const std::string& needle) {
  absl::StatusOr<JobSpec> spec = ParseJobSpec(text);
  ASSERT_FALSE(spec.ok()) << text;
  EXPECT_EQ(spec.status().code(), absl::StatusCode::kInvalidArgument)
      << text << " -> " << spec.status();
  EXPECT_NE(spec.status().message().find(needle), std::string::npos)
      << text << " -> " << spec.status() << "; want: " << needle;
}

TEST(JobSpecTest, EmptyTextGivesDefaults) {
  auto spec = ParseJobSpec("");
  ASSERT_TRUE(spec.ok()) << spec.status();
  EXPECT_EQ(spec->model().n_layer(), 4);
  EXPECT_EQ(spec->model().vocab_size(), 256);
  EXPECT_EQ(spec->optimizer().type(), ADAMW);
  EXPECT_EQ(spec->data().path(), kDefaultDataPath);
  EXPECT_EQ(spec->layout().dp(), 1);
  EXPECT_EQ(spec->max_message_bytes(), 4 << 20);
}

TEST(JobSpecTest, ParsesFields) {
  auto spec = ParseJobSpec(
      "model { n_layer: 2 n_embd: 64 } train { steps: 7 batch_size: 6 } "
      "layout { dp: 3 num_shards: 2 } optimizer { type: SGD lr: 0.1 }");
  ASSERT_TRUE(spec.ok()) << spec.status();
  EXPECT_EQ(spec->train().steps(), 7);
  EXPECT_EQ(LocalBatch(*spec), 2);
  EXPECT_FLOAT_EQ(spec->optimizer().momentum(), 0.9f);
}

TEST(JobSpecTest, SharedMemoryIsOnByDefaultAndCanBeTurnedOff) {
  auto spec = ParseJobSpec("");
  ASSERT_TRUE(spec.ok());
  EXPECT_EQ(spec->shared_memory(), SHARED_MEMORY_AUTO);
  spec = ParseJobSpec("shared_memory: SHARED_MEMORY_OFF");
  ASSERT_TRUE(spec.ok()) << spec.status();
  EXPECT_EQ(spec->shared_memory(), SHARED_MEMORY_OFF);
  ExpectInvalid("shared_memory: 7", "shared_memory 7 is not valid");
}

TEST(JobSpecTest, DefaultsAreIdempotent) {
  auto spec = ParseJobSpec(
      "optimizer { type: SGD momentum: -1 grad_clip: -1 weight_decay: -1 }");
  ASSERT_TRUE(spec.ok()) << spec.status();
  JobSpec again = *spec;
  ApplyJobSpecDefaults(&again);
  EXPECT_EQ(again.DebugString(), spec->DebugString());
  EXPECT_LT(again.optimizer().grad_clip(), 0);
  EXPECT_LT(again.optimizer().momentum(), 0);
}

TEST(JobSpecTest, NegativeIntervalsTurnEvalAndCheckpointsOff) {
  auto spec = ParseJobSpec("train { eval_interval: -1 checkpoint_interval: -1 }");
  ASSERT_TRUE(spec.ok()) << spec.status();
  EXPECT_EQ(spec->train().eval_interval(), -1);
  EXPECT_EQ(spec->train().checkpoint_interval(), -1);
}

TEST(JobSpecTest, MalformedTextNamesLineAndColumn) {
  ExpectInvalid("model {\n  n_layer: two\n}", "line 2");
}

TEST(JobSpecTest, UnknownFieldIsAnError) {
  ExpectInvalid("modle { n_layer: 2 }", "modle");
}

TEST(JobSpecTest, IndivisibleBatchSaysWhatIsValid) {
  ExpectInvalid("train { batch_size: 5 } layout { dp: 2 }", "multiples of 2");
}

TEST(JobSpecTest, RejectsBadModelAndLayout) {
  ExpectInvalid("model { n_embd: 30 n_head: 4 }",
                "n_embd (30) must be divisible by n_head (4)");
  ExpectInvalid("optimizer { lr: -1 }",
                "optimizer: need 0 < lr and 0 <= min_lr <= lr (got lr=-1");
}

TEST(JobSpecTest, ParallelLayoutsAreCheckedSayingWhatIsValid) {
  auto ok = ParseJobSpec("model { n_layer: 4 n_head: 4 } layout { pp: 2 tp: 2 }");
  ASSERT_TRUE(ok.ok()) << ok.status();
  EXPECT_EQ(ok->layout().schedule(), ONE_F_ONE_B);
  ExpectInvalid("model { n_head: 4 } layout { tp: 3 }", "valid tp: 1, 2, 4");
  ExpectInvalid("model { n_layer: 2 } layout { pp: 3 }", "valid: pp in [1, 2]");
  ExpectInvalid("train { mode: ASYNC } layout { pp: 2 }", "SYNC, BOUNDED_STALENESS");
}

// Sequence and vocabulary parallelism (issue 16): rejected at submission,
// saying why, when tp = 1, the sequence length or the vocabulary does not
// split evenly over the tp ranks.
TEST(JobSpecTest, SequenceAndVocabParallelAreCheckedSayingWhy) {
  auto ok = ParseJobSpec(
      "model { n_head: 4 block_size: 32 vocab_size: 256 } "
      "layout { tp: 4 sequence_parallel: true vocab_parallel: true }");
  ASSERT_TRUE(ok.ok()) << ok.status();
  ExpectInvalid("layout { sequence_parallel: true }",
                "sequence_parallel needs tensor parallelism (tp > 1)");
  ExpectInvalid("layout { vocab_parallel: true }",
                "vocab_parallel needs tensor parallelism (tp > 1)");
  ExpectInvalid(
      "model { n_head: 4 block_size: 30 } "
      "layout { tp: 4 sequence_parallel: true }",
      "the sequence length block_size=30 is not divisible by tp=4");
  ExpectInvalid(
      "model { n_head: 4 vocab_size: 258 } layout { tp: 4 vocab_parallel: true }",
      "vocab_size=258 is not divisible by tp=4; pad the vocabulary, e.g. "
      "vocab_size: 260");
  // Each alone is fine with the other's size indivisible.
  EXPECT_TRUE(ParseJobSpec("model { n_head: 4 vocab_size: 258 } "
                           "layout { tp: 4 sequence_parallel: true }")
                  .ok());
}

TEST(JobSpecTest, ConsistencyModesParse) {
  auto sync = ParseJobSpec("");
  ASSERT_TRUE(sync.ok());
  EXPECT_EQ(sync->train().mode(), SYNC);
  EXPECT_EQ(EffectiveStaleness(*sync), 0);
  auto async = ParseJobSpec("train { mode: ASYNC }");
  ASSERT_TRUE(async.ok()) << async.status();
  EXPECT_EQ(async->train().mode(), ASYNC);
  auto ssp = ParseJobSpec("train { mode: BOUNDED_STALENESS staleness: 3 }");
  ASSERT_TRUE(ssp.ok()) << ssp.status();
  EXPECT_EQ(EffectiveStaleness(*ssp), 3);
  auto ssp0 = ParseJobSpec("train { mode: BOUNDED_STALENESS }");
  ASSERT_TRUE(ssp0.ok()) << ssp0.status();
  EXPECT_EQ(EffectiveStaleness(*ssp0), 0);
  auto knobs = ParseJobSpec(
      "train { batch_size: 4 debug_slow_worker_rank: 1 "
      "debug_slow_worker_delay_ms: 50 debug_trace_steps: true } "
      "layout { dp: 2 }");
  ASSERT_TRUE(knobs.ok()) << knobs.status();
}

TEST(JobSpecTest, BadConsistencySettingsSayWhatIsValid) {
  struct Case {
    const char* text;
    const char* needle;
  };
  for (const Case& c : std::vector<Case>{
           {"train { mode: BOUNDED_STALENESS staleness: -1 }",
            "train.staleness must be >= 0"},
           {"train { mode: BOUNDED_STALENESS staleness: 5000 }",
            "at most 1000"},
           {"train { staleness: 2 }",
            "only applies to mode BOUNDED_STALENESS, but train.mode is SYNC"},
           {"train { mode: ASYNC staleness: 2 }", "train.mode is ASYNC"},
           {"train { mode: 7 }",
            "unknown value 7; valid: SYNC, ASYNC, BOUNDED_STALENESS"},
           {"train { debug_slow_worker_delay_ms: -5 }",
            "debug_slow_worker_delay_ms must be in [0, 60000]"},
           {"train { debug_slow_worker_rank: 2 debug_slow_worker_delay_ms: 5 "
            "batch_size: 4 } layout { dp: 2 }",
            "debug_slow_worker_rank 2 is not a data-parallel rank; valid: "
            "[0, 2)"},
       }) {
    ExpectInvalid(c.text, c.needle);
  }
  // A misspelt mode name is a parse error naming the value.
  ExpectInvalid("train { mode: EVENTUAL }", "EVENTUAL");
}

TEST(JobSpecTest, CompressionParsesAndBadSettingsSayWhatIsValid) {
  absl::StatusOr<JobSpec> off = ParseJobSpec("");
  ASSERT_TRUE(off.ok()) << off.status();
  EXPECT_EQ(off->train().compression().kind(), COMPRESSION_NONE);
  EXPECT_FALSE(off->train().has_compression());  // off: nothing on the wire
  for (const char* text :
       {"train { compression { kind: TOPK ratio: 0.01 } }",
        "train { compression { kind: RANDOMK ratio: 0.5 } }",
        "train { compression { kind: QUANT_INT8 } }",
        "train { compression { } }", "train { pull_dtype: BF16 }",
        "train { pull_dtype: F32 }", "train { layerwise_pull: LAYERWISE_PULL_OFF }"}) {
    absl::StatusOr<JobSpec> spec = ParseJobSpec(text);
    EXPECT_TRUE(spec.ok()) << text << " -> " << spec.status();
  }
  struct Case {
    const char* text;
    const char* needle;
  };
  for (const Case& c : std::vector<Case>{
           {"train { compression { kind: TOPK } }",
            "train.compression.ratio must be in (0, 0.5] for TOPK, got 0 "
            "(unset)"},
           {"train { compression { kind: RANDOMK ratio: -0.1 } }",
            "must be in (0, 0.5] for RANDOMK, got -0.1"},
           {"train { compression { kind: TOPK ratio: 0.75 } }",
            "larger than the dense one"},
           {"train { compression { kind: TOPK ratio: nan } }",
            "got nan"},
           {"train { compression { kind: QUANT_INT8 ratio: 0.1 } }",
            "is for TOPK and RANDOMK only; train.compression.kind is "
            "QUANT_INT8"},
           {"train { compression { ratio: 0.1 } }",
            "kind is COMPRESSION_NONE"},
           {"train { compression { kind: 9 } }",
            "train.compression.kind 9 is not valid; valid: COMPRESSION_NONE, "
            "TOPK, RANDOMK, QUANT_INT8"},
           {"train { pull_dtype: INT8 }",
            "train.pull_dtype INT8 is not valid; valid: F32, BF16"},
           {"train { pull_dtype: 7 }", "train.pull_dtype 7 is not valid"},
           {"train { layerwise_pull: 5 }",
            "train.layerwise_pull 5 is not valid; valid: LAYERWISE_PULL_ON, "
            "LAYERWISE_PULL_OFF"},
       }) {
    ExpectInvalid(c.text, c.needle);
  }
}

TEST(JobSpecTest, RingAllReduceCombinationsSayWhy) {
  absl::StatusOr<JobSpec> ring =
      ParseJobSpec("train { dp_aggregation: RING_ALLREDUCE }");
  ASSERT_TRUE(ring.ok()) << ring.status();
  EXPECT_EQ(ring->train().dp_aggregation(), RING_ALLREDUCE);
  ExpectInvalid("train { dp_aggregation: RING_ALLREDUCE pull_dtype: BF16 }",
                "RING_ALLREDUCE needs fp32 pulls");
  ExpectInvalid("train { dp_aggregation: RING_ALLREDUCE mode: ASYNC }",
                "RING_ALLREDUCE needs train.mode SYNC");
  ExpectInvalid(
      "train { dp_aggregation: RING_ALLREDUCE compression { kind: QUANT_INT8 } "
      "}",
      "RING_ALLREDUCE does not compress");
  ExpectInvalid("train { dp_aggregation: 4 }",
                "train.dp_aggregation: unknown value 4");
}

TEST(JobSpecTest, HierarchicalAggregationCombinationsSayWhy) {
  absl::StatusOr<JobSpec> hier =
      ParseJobSpec("layout { dp: 4 } train { workers_per_host: 2 }");
  ASSERT_TRUE(hier.ok()) << hier.status();
  EXPECT_EQ(WorkersPerHost(*hier), 2);
  EXPECT_EQ(PushingReplicas(*hier), 2);
  absl::StatusOr<JobSpec> flat = ParseJobSpec("layout { dp: 4 }");
  ASSERT_TRUE(flat.ok());
  EXPECT_EQ(WorkersPerHost(*flat), 1);
  EXPECT_EQ(PushingReplicas(*flat), 4);
  absl::StatusOr<JobSpec> ring =
      ParseJobSpec("layout { dp: 4 } train { dp_aggregation: RING_ALLREDUCE }");
  ASSERT_TRUE(ring.ok());
  EXPECT_EQ(PushingReplicas(*ring), 1);
  ExpectInvalid("layout { dp: 4 } train { workers_per_host: -1 }",
                "train.workers_per_host must be >= 0, got -1");
  ExpectInvalid("layout { dp: 4 } train { workers_per_host: 3 }",
                "train.workers_per_host 3 (hierarchical aggregation) must "
                "divide layout.dp 4");
  ExpectInvalid(
      "layout { dp: 4 } train { workers_per_host: 2 mode: BOUNDED_STALENESS "
      "staleness: 1 }",
      "needs train.mode SYNC, got BOUNDED_STALENESS");
  ExpectInvalid(
      "layout { dp: 2 pp: 2 } model { n_layer: 2 } "
      "train { workers_per_host: 2 }",
      "is not supported with pp=2 tp=1");
  ExpectInvalid(
      "layout { dp: 4 } train { workers_per_host: 2 dp_aggregation: "
      "RING_ALLREDUCE }",
      "RING_ALLREDUCE has none");
}

// The shipped examples parse, and default.textproto really is the defaults.
TEST(JobSpecTest, ExamplesParse) {
  const std::string dir = std::string(std::getenv("TEST_SRCDIR")) + "/" +
                          std::getenv("TEST_WORKSPACE") + "/examples/";
  for (const char* name : {"small.textproto", "main.textproto", "gpl3.textproto"}) {
    auto spec = LoadJobSpecFile(dir + name);
    ASSERT_TRUE(spec.ok()) << spec.status();
  }
  auto written = LoadJobSpecFile(dir + "default.textproto");
  ASSERT_TRUE(written.ok()) << written.status();
  auto defaults = ParseJobSpec("");
  ASSERT_TRUE(defaults.ok());
  EXPECT_EQ(written->DebugString(), defaults->DebugString());
}

TEST(JobSpecTest, MissingFileIsNotFound) {
  auto spec = LoadJobSpecFile("/nonexistent/job.textproto");
  EXPECT_EQ(spec.status().code(), absl::StatusCode::kNotFound);
}

}  // namespace
}  // namespace lmps
