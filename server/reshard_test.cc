#include "server/reshard.h"

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "common/model/job_spec.h"
#include "common/model/partition.h"
#include "gtest/gtest.h"
#include "server/checkpoint.h"
#include "server/shard.h"

namespace lmps {
namespace {

namespace fs = std::filesystem;

// A tiny model (1 layer, width 8, vocabulary 16); `max_chunk_bytes` decides
// how tensors are cut, so two specs can differ in chunk boundaries too.
JobSpec Spec(int num_shards, OptimizerType type, int64_t max_chunk_bytes) {
  JobSpec spec;
  ModelConfig* m = spec.mutable_model();
  m->set_n_layer(1);
  m->set_n_head(2);
  m->set_n_embd(8);
  m->set_block_size(4);
  m->set_vocab_size(16);
  spec.mutable_layout()->set_num_shards(num_shards);
  spec.mutable_train()->set_batch_size(2);
  spec.mutable_train()->set_steps(10);
  spec.mutable_optimizer()->set_type(type);
  spec.set_max_chunk_bytes(max_chunk_bytes);
  ApplyJobSpecDefaults(&spec);
  return spec;
}

PartitionMap Map(const JobSpec& spec) {
  return *ComputePartition(spec.model(), spec.layout().num_shards(),
                           spec.max_chunk_bytes());
}

std::string TestDir(const std::string& name) {
  const char* tmp = std::getenv("TEST_TMPDIR");
  std::string dir = std::string(tmp ? tmp : "/tmp") + "/reshard_" + name;
  fs::remove_all(dir);
  return dir;
}

// A distinct, non-round value for (tensor, element, buffer); buffer 0 is the
// parameter, 1.. the optimizer state buffers.
float Value(const std::string& tensor, int64_t element, int buffer) {
  uint64_t h = std::hash<std::string>()(tensor) ^
               (static_cast<uint64_t>(element) * 0x9E3779B97F4A7C15ULL) ^
               (static_cast<uint64_t>(buffer + 1) << 56);
  h ^= h >> 29;
  h *= 0xBF58476D1CE4E5B9ULL;
  h ^= h >> 32;
  return static_cast<float>(static_cast<int64_t>(h % 2000001) - 1000000) *
             3.1e-7f +
         static_cast<float>(buffer) * 1e-3f;
}

int StateBuffers(OptimizerType type) { return type == SGD ? 1 : 2; }

ChunkData MakeChunk(const ChunkDesc& desc, int buffers) {
  ChunkData c;
  c.desc = desc;
  for (int64_t e = desc.begin(); e < desc.end(); ++e) {
    c.params.push_back(Value(desc.tensor(), e, 0));
  }
  c.state.resize(buffers);
  for (int k = 0; k < buffers; ++k) {
    for (int64_t e = desc.begin(); e < desc.end(); ++e) {
      c.state[k].push_back(Value(desc.tensor(), e, k + 1));
    }
  }
  return c;
}

// Writes step `step` of every shard of `spec`'s layout with Value() data.
void WriteStep(const std::string& dir, const JobSpec& spec, int64_t step) {
  const PartitionMap map = Map(spec);
  const OptimizerType type = spec.optimizer().type();
  for (int s = 0; s < spec.layout().num_shards(); ++s) {
    ShardCheckpoint ckpt;
    ckpt.header.step = step;
    ckpt.header.shard = s;
    ckpt.header.num_shards = spec.layout().num_shards();
    ckpt.header.partition_version = map.version();
    ckpt.header.optimizer = type;
    ckpt.header.state_buffers = StateBuffers(type);
    ckpt.header.spec = spec;
    for (const ChunkDesc& d : ChunksOfShard(map, s)) {
      ckpt.chunks.push_back(MakeChunk(d, StateBuffers(type)));
    }
    ASSERT_TRUE(WriteShardCheckpoint(dir, ckpt).ok());
  }
}

std::vector<ReshardRange> RangesOf(const PartitionMap& map, int shard) {
  std::vector<ReshardRange> out;
  for (const ChunkDesc& d : ChunksOfShard(map, shard)) {
    out.push_back({d.tensor(), d.begin(), d.end()});
  }
  return out;
}

bool SameBytes(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() &&
         std::memcmp(a.data(), b.data(), 4 * a.size()) == 0;
}

// Every chunk of every shard of `to` read from the checkpoint equals
// Value() byte for byte, parameters and every state buffer.
void ExpectExactReshard(const std::string& dir, int64_t step,
                        const JobSpec& to, int old_shards) {
  const PartitionMap map = Map(to);
  const int buffers = StateBuffers(to.optimizer().type());
  int64_t elements = 0;
  for (int s = 0; s < to.layout().num_shards(); ++s) {
    ReshardRequest req;
    req.dir = dir;
    req.step = step;
    req.ranges = RangesOf(map, s);
    req.model = to.model();
    req.optimizer = to.optimizer().type();
    absl::StatusOr<ReshardResult> got = ReadCheckpointRanges(req);
    ASSERT_TRUE(got.ok()) << got.status();
    EXPECT_EQ(got->source.num_shards, old_shards);
    ASSERT_EQ(got->ranges.size(), req.ranges.size());
    for (size_t i = 0; i < req.ranges.size(); ++i) {
      const ChunkDesc d = ChunksOfShard(map, s)[i];
      const ChunkData want = MakeChunk(d, buffers);
      ASSERT_EQ(got->ranges[i].state.size(), static_cast<size_t>(buffers));
      EXPECT_TRUE(SameBytes(got->ranges[i].params, want.params))
          << d.ShortDebugString();
      for (int k = 0; k < buffers; ++k) {
        EXPECT_TRUE(SameBytes(got->ranges[i].state[k], want.state[k]))
            << d.ShortDebugString() << " state " << k;
      }
      elements += d.end() - d.begin();
    }
  }
  int64_t total = 0;
  for (const ChunkDesc& d : map.chunks()) total += d.end() - d.begin();
  EXPECT_EQ(elements, total);
}

TEST(ReshardTest, TwoShardsToThreeIsByteExactWithAdamWState) {
  const std::string dir = TestDir("2to3");
  const JobSpec from = Spec(2, ADAMW, 256);
  WriteStep(dir, from, 7);
  // Another shard count and other chunk boundaries.
  const JobSpec to = Spec(3, ADAMW, 96);
  ASSERT_NE(Map(from).version(), Map(to).version());
  ExpectExactReshard(dir, 7, to, 2);
}

TEST(ReshardTest, ThreeShardsToOneIsByteExactWithSgdMomentum) {
  const std::string dir = TestDir("3to1");
  const JobSpec from = Spec(3, SGD, 128);
  WriteStep(dir, from, 4);
  const JobSpec to = Spec(1, SGD, 4 << 20);
  ExpectExactReshard(dir, 4, to, 3);
  ReshardRequest req;
  req.dir = dir;
  req.step = 4;
  req.ranges = RangesOf(Map(to), 0);
  absl::StatusOr<ReshardResult> got = ReadCheckpointRanges(req);
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ(got->shards_read, (std::vector<int>{0, 1, 2}));
}

TEST(ReshardTest, ReadsOnlyTheOldFilesHoldingWantedElements) {
  const std::string dir = TestDir("only");
  const JobSpec from = Spec(3, ADAMW, 256);
  WriteStep(dir, from, 2);
  const PartitionMap old_map = Map(from);
  ReshardRequest req;
  req.dir = dir;
  req.step = 2;
  req.ranges = RangesOf(old_map, 1);  // exactly old shard 1's chunks
  absl::StatusOr<ReshardResult> got = ReadCheckpointRanges(req);
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ(got->shards_read, std::vector<int>{1});
  // Every file of the old layout must still be there (all headers are
  // checked, as the scheduler's rule requires), even one whose data is not
  // needed.
  fs::remove(CheckpointPath(dir, 2, 0));
  EXPECT_EQ(ReadCheckpointRanges(req).status().code(),
            absl::StatusCode::kNotFound);
}

// ParameterShard::Create resumes under another layout through the resharded
// load, and a round trip 2 -> 3 -> 2 shards gives back the original files'
// contents byte for byte.
TEST(ReshardTest, ParameterShardResumesUnderAnotherLayoutAndBack) {
  const std::string dir = TestDir("shard_2");
  const JobSpec two = Spec(2, ADAMW, 256);
  WriteStep(dir, two, 6);
  const JobSpec three = Spec(3, ADAMW, 96);
  const std::string dir3 = TestDir("shard_3");
  for (int s = 0; s < 3; ++s) {
    ShardOptions o;
    o.shard = s;
    o.spec = three;
    o.map = Map(three);
    o.checkpoint_dir = dir;
    o.start_step = 6;
    std::vector<std::string> log;
    o.log = [&](const std::string& line) { log.push_back(line); };
    absl::StatusOr<std::unique_ptr<ParameterShard>> shard =
        ParameterShard::Create(o);
    ASSERT_TRUE(shard.ok()) << shard.status();
    EXPECT_EQ((*shard)->version(), 6);
    ASSERT_FALSE(log.empty());
    EXPECT_TRUE(absl::StrContains(log.back(), "written by 2 shards"))
        << log.back();
    ShardCheckpoint snap = (*shard)->Snapshot();
    for (const ChunkData& c : snap.chunks) {
      const ChunkData want = MakeChunk(c.desc, 2);
      EXPECT_TRUE(SameBytes(c.params, want.params)) << c.desc.ShortDebugString();
      EXPECT_TRUE(SameBytes(c.state[0], want.state[0]));
      EXPECT_TRUE(SameBytes(c.state[1], want.state[1]));
    }
    ASSERT_TRUE(WriteShardCheckpoint(dir3, snap).ok());
  }
  for (int s = 0; s < 2; ++s) {
    ShardOptions o;
    o.shard = s;
    o.spec = two;
    o.map = Map(two);
    o.checkpoint_dir = dir3;
    o.start_step = 6;
    absl::StatusOr<std::unique_ptr<ParameterShard>> shard =
        ParameterShard::Create(o);
    ASSERT_TRUE(shard.ok()) << shard.status();
    absl::StatusOr<ShardCheckpoint> original =
        ReadShardCheckpoint(CheckpointPath(dir, 6, s));
    ASSERT_TRUE(original.ok());
    ShardCheckpoint snap = (*shard)->Snapshot();
    ASSERT_EQ(snap.chunks.size(), original->chunks.size());
    for (size_t i = 0; i < snap.chunks.size(); ++i) {
      EXPECT_TRUE(SameBytes(snap.chunks[i].params, original->chunks[i].params));
      for (int k = 0; k < 2; ++k) {
        EXPECT_TRUE(
            SameBytes(snap.chunks[i].state[k], original->chunks[i].state[k]));
      }
    }
  }
}

TEST(ReshardTest, SameLayoutStillLoadsItsOwnFile) {
  const std::string dir = TestDir("same");
  const JobSpec spec = Spec(2, SGD, 256);
  WriteStep(dir, spec, 3);
  ShardOptions o;
  o.shard = 1;
  o.spec = spec;
  o.map = Map(spec);
  o.checkpoint_dir = dir;
  o.start_step = 3;
  EXPECT_FALSE(CheckpointNeedsReshard(CheckpointPath(dir, 3, 1), o.map));
  std::vector<std::string> log;
  o.log = [&](const std::string& line) { log.push_back(line); };
  auto shard = ParameterShard::Create(o);
  ASSERT_TRUE(shard.ok()) << shard.status();
  ASSERT_FALSE(log.empty());
  EXPECT_TRUE(absl::StrContains(log.back(), "resumed from checkpoint"))
      << log.back();
  EXPECT_TRUE(CheckpointNeedsReshard(CheckpointPath(dir, 3, 2), o.map));
  EXPECT_TRUE(CheckpointNeedsReshard(CheckpointPath(dir, 3, 0),
                                     Map(Spec(3, SGD, 256))));
}

TEST(ReshardTest, MissingOldShardFileSaysEveryFileMustBeReachable) {
  const std::string dir = TestDir("missing");
  WriteStep(dir, Spec(2, ADAMW, 256), 5);
  fs::remove(CheckpointPath(dir, 5, 1));
  const JobSpec to = Spec(3, ADAMW, 256);
  ShardOptions o;
  o.shard = 2;
  o.spec = to;
  o.map = Map(to);
  o.checkpoint_dir = dir;
  o.start_step = 5;
  absl::Status s = ParameterShard::Create(o).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kNotFound) << s;
  const std::string m(s.message());
  for (const char* needle :
       {"shard 2: cannot resume from step 5", "written by 2 shards",
        "missing shard_1.ckpt",
        "every old shard file of the step reachable from every new shard",
        "shared by all shards", "copy", "step_00000005/shard_*.ckpt",
        "all 2 old shards"}) {
    EXPECT_TRUE(absl::StrContains(m, needle)) << needle << " in " << m;
  }
  // Only shard 1's file present (shard 0's missing): still named.
  WriteStep(dir, Spec(2, ADAMW, 256), 5);
  fs::remove(CheckpointPath(dir, 5, 0));
  s = ReadCheckpointLayout(dir, 5).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kNotFound);
  EXPECT_TRUE(absl::StrContains(s.message(), "missing shard_0.ckpt")) << s;
  // No file of the step at all (a new shard's empty volume).
  s = ReadCheckpointLayout(TestDir("empty"), 5).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kNotFound);
  EXPECT_TRUE(absl::StrContains(s.message(), "step_00000005 does not exist"))
      << s;
  EXPECT_TRUE(absl::StrContains(s.message(), "reachable from every new shard"))
      << s;
}

TEST(ReshardTest, CorruptFileIsDataLoss) {
  const std::string dir = TestDir("corrupt");
  WriteStep(dir, Spec(2, ADAMW, 256), 5);
  const std::string path = CheckpointPath(dir, 5, 1);
  {
    std::fstream f(path, std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(static_cast<std::streamoff>(fs::file_size(path) - 20));
    f.put('\x7f');
  }
  ReshardRequest req;
  req.dir = dir;
  req.step = 5;
  req.ranges = RangesOf(Map(Spec(1, ADAMW, 256)), 0);
  absl::Status s = ReadCheckpointRanges(req).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kDataLoss) << s;
  EXPECT_TRUE(absl::StrContains(s.message(), "checksum")) << s;
  EXPECT_TRUE(absl::StrContains(s.message(), "shard_1.ckpt")) << s;
}

TEST(ReshardTest, RangesNotInTheCheckpointAreNamed) {
  const std::string dir = TestDir("ranges");
  const JobSpec spec = Spec(2, ADAMW, 256);
  WriteStep(dir, spec, 5);
  ReshardRequest req;
  req.dir = dir;
  req.step = 5;
  req.ranges = {{"nope.weight", 0, 4}, {"ln_f.bias", 0, 8}, {"ln_f.bias", 6, 12}};
  absl::Status s = ReadCheckpointRanges(req).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kDataLoss) << s;
  EXPECT_TRUE(absl::StrContains(s.message(),
                                "tensor 'nope.weight' (not in the checkpoint)"))
      << s;
  EXPECT_TRUE(absl::StrContains(s.message(), "tensor 'ln_f.bias' elements [8, 12)"))
      << s;
  req.ranges = {{"ln_f.bias", 4, 4}};
  EXPECT_EQ(ReadCheckpointRanges(req).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(ReshardTest, OtherModelOrOptimizerIsRefused) {
  const std::string dir = TestDir("other");
  WriteStep(dir, Spec(2, ADAMW, 256), 5);
  ReshardRequest req;
  req.dir = dir;
  req.step = 5;
  req.ranges = {{"ln_f.bias", 0, 8}};
  req.optimizer = SGD;
  absl::Status s = ReadCheckpointRanges(req).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition) << s;
  EXPECT_TRUE(absl::StrContains(s.message(), "optimizer")) << s;
  req.optimizer = ADAMW;
  ModelConfig wider = Spec(2, ADAMW, 256).model();
  wider.set_n_embd(16);
  req.model = wider;
  s = ReadCheckpointRanges(req).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition) << s;
  EXPECT_TRUE(absl::StrContains(s.message(), "model")) << s;
}

TEST(ReshardTest, ListsStepsWithEveryShardFileOfTheirLayout) {
  const std::string dir = TestDir("list");
  EXPECT_TRUE(ListRelayoutCheckpointSteps(dir)->empty());  // no directory
  WriteStep(dir, Spec(2, ADAMW, 256), 3);
  WriteStep(dir, Spec(3, ADAMW, 256), 5);
  fs::remove(CheckpointPath(dir, 5, 2));  // incomplete
  WriteStep(dir, Spec(3, ADAMW, 256), 7);
  // Step 9: shard 0 rewritten by a 2-shard layout over a 3-shard step, and
  // shard 1 still of the 3-shard layout: not one complete layout.
  WriteStep(dir, Spec(3, ADAMW, 256), 9);
  {
    const JobSpec two = Spec(2, ADAMW, 256);
    ShardCheckpoint c;
    c.header.step = 9;
    c.header.shard = 0;
    c.header.num_shards = 2;
    c.header.partition_version = Map(two).version();
    c.header.optimizer = ADAMW;
    c.header.state_buffers = 2;
    c.header.spec = two;
    for (const ChunkDesc& d : ChunksOfShard(Map(two), 0)) {
      c.chunks.push_back(MakeChunk(d, 2));
    }
    ASSERT_TRUE(WriteShardCheckpoint(dir, c).ok());
  }
  // Step 11: a complete 2-shard step with a stale shard_2 of a 3-shard
  // layout beside it (shard 0 decides the layout): complete.
  WriteStep(dir, Spec(3, ADAMW, 256), 11);
  WriteStep(dir, Spec(2, ADAMW, 256), 11);
  absl::StatusOr<std::vector<int64_t>> steps = ListRelayoutCheckpointSteps(dir);
  ASSERT_TRUE(steps.ok()) << steps.status();
  EXPECT_EQ(*steps, (std::vector<int64_t>{3, 7, 11}));
  absl::StatusOr<CheckpointHeader> layout = ReadCheckpointLayout(dir, 11);
  ASSERT_TRUE(layout.ok()) << layout.status();
  EXPECT_EQ(layout->num_shards, 2);
  ExpectExactReshard(dir, 11, Spec(3, ADAMW, 96), 2);
  absl::Status s = ReadCheckpointLayout(dir, 9).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition) << s;
  EXPECT_TRUE(absl::StrContains(s.message(), "of another step or layout"))
      << s;
}

}  // namespace
}  // namespace lmps
