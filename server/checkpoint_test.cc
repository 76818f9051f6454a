#include "server/checkpoint.h"

#include <dirent.h>
#include <signal.h>
#include <sys/resource.h>
#include <unistd.h>

#include <cstdlib>
#include <fstream>
#include <sstream>

#include "gtest/gtest.h"

namespace lmps {
namespace {

std::string TestDir(const std::string& name) {
  const char* tmp = std::getenv("TEST_TMPDIR");
  std::string dir = std::string(tmp ? tmp : "/tmp") + "/" + name;
  std::string cmd = "rm -rf '" + dir + "'";
  EXPECT_EQ(std::system(cmd.c_str()), 0);
  return dir;
}

ShardCheckpoint Sample(int64_t step, int shard, float base, int n = 1000) {
  ShardCheckpoint c;
  c.header.step = step;
  c.header.shard = shard;
  c.header.num_shards = 2;
  c.header.partition_version = 0x1234567890abcdefULL;
  c.header.optimizer = ADAMW;
  c.header.state_buffers = 2;
  c.header.spec.set_name("job");
  c.header.spec.mutable_train()->set_steps(77);
  for (int i = 0; i < 3; ++i) {
    ChunkData chunk;
    chunk.desc.set_tensor(i == 0 ? "wte.weight" : "ln_f.bias");
    chunk.desc.set_index(i);
    chunk.desc.set_begin(i * n);
    chunk.desc.set_end((i + 1) * n - i);  // sizes n, n-1, n-2
    chunk.desc.set_shard(shard);
    const int64_t len = chunk.desc.end() - chunk.desc.begin();
    for (int64_t j = 0; j < len; ++j) {
      chunk.params.push_back(base + i + 0.001f * j);
    }
    chunk.state = {std::vector<float>(len, base * 2),
                   std::vector<float>(len, base * 3)};
    c.chunks.push_back(std::move(chunk));
  }
  return c;
}

void ExpectSame(const ShardCheckpoint& a, const ShardCheckpoint& b) {
  EXPECT_EQ(a.header.step, b.header.step);
  EXPECT_EQ(a.header.shard, b.header.shard);
  EXPECT_EQ(a.header.num_shards, b.header.num_shards);
  EXPECT_EQ(a.header.partition_version, b.header.partition_version);
  EXPECT_EQ(a.header.optimizer, b.header.optimizer);
  EXPECT_EQ(a.header.state_buffers, b.header.state_buffers);
  EXPECT_EQ(a.header.spec.SerializeAsString(),
            b.header.spec.SerializeAsString());
  ASSERT_EQ(a.chunks.size(), b.chunks.size());
  for (size_t i = 0; i < a.chunks.size(); ++i) {
    EXPECT_EQ(a.chunks[i].desc.SerializeAsString(),
              b.chunks[i].desc.SerializeAsString());
    EXPECT_EQ(a.chunks[i].params, b.chunks[i].params);
    EXPECT_EQ(a.chunks[i].state, b.chunks[i].state);
  }
}

std::string Slurp(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

void Spit(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out << bytes;
}

std::vector<std::string> Files(const std::string& dir) {
  std::vector<std::string> names;
  DIR* d = opendir(dir.c_str());
  if (d == nullptr) return names;
  while (dirent* e = readdir(d)) {
    std::string n = e->d_name;
    if (n != "." && n != "..") names.push_back(n);
  }
  closedir(d);
  return names;
}

TEST(CheckpointTest, Paths) {
  EXPECT_EQ(CheckpointPath("/ck", 50, 1), "/ck/step_00000050/shard_1.ckpt");
  EXPECT_EQ(CheckpointStepDir("ck", 123456789), "ck/step_123456789");
}

TEST(CheckpointTest, RoundTrip) {
  const std::string dir = TestDir("roundtrip");
  const ShardCheckpoint c = Sample(50, 1, 0.5f);
  ASSERT_TRUE(WriteShardCheckpoint(dir + "/nested", c).ok());
  auto read = ReadShardCheckpoint(CheckpointPath(dir + "/nested", 50, 1));
  ASSERT_TRUE(read.ok()) << read.status();
  ExpectSame(c, *read);
  EXPECT_EQ(read->header.num_chunks, 3);
  auto header = ReadCheckpointHeader(CheckpointPath(dir + "/nested", 50, 1));
  ASSERT_TRUE(header.ok()) << header.status();
  EXPECT_EQ(header->partition_version, c.header.partition_version);
  EXPECT_EQ(header->spec.train().steps(), 77);
  EXPECT_TRUE(
      VerifyShardCheckpoint(CheckpointPath(dir + "/nested", 50, 1)).ok());
}

TEST(CheckpointTest, RoundTripSgdState) {
  const std::string dir = TestDir("sgd");
  ShardCheckpoint c = Sample(3, 0, 1.5f);
  c.header.optimizer = SGD;
  c.header.state_buffers = 1;
  for (ChunkData& chunk : c.chunks) chunk.state.pop_back();
  ASSERT_TRUE(WriteShardCheckpoint(dir, c).ok());
  auto read = ReadShardCheckpoint(CheckpointPath(dir, 3, 0));
  ASSERT_TRUE(read.ok()) << read.status();
  ExpectSame(c, *read);
}

TEST(CheckpointTest, OverwriteReplacesWholeFile) {
  const std::string dir = TestDir("overwrite");
  ASSERT_TRUE(WriteShardCheckpoint(dir, Sample(5, 0, 1.0f)).ok());
  ASSERT_TRUE(WriteShardCheckpoint(dir, Sample(5, 0, 2.0f, 10)).ok());
  auto read = ReadShardCheckpoint(CheckpointPath(dir, 5, 0));
  ASSERT_TRUE(read.ok());
  ExpectSame(Sample(5, 0, 2.0f, 10), *read);
  EXPECT_EQ(Files(CheckpointStepDir(dir, 5)),
            std::vector<std::string>{"shard_0.ckpt"});
}

TEST(CheckpointTest, CorruptionIsDetected) {
  const std::string dir = TestDir("corrupt");
  ASSERT_TRUE(WriteShardCheckpoint(dir, Sample(10, 0, 1.0f)).ok());
  ASSERT_TRUE(WriteShardCheckpoint(dir, Sample(20, 0, 1.0f)).ok());
  const std::string path = CheckpointPath(dir, 20, 0);
  const std::string good = Slurp(path);

  // One flipped bit in the middle of the parameters.
  std::string bad = good;
  bad[bad.size() / 2] ^= 0x10;
  Spit(path, bad);
  auto read = ReadShardCheckpoint(path);
  EXPECT_EQ(read.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_NE(read.status().message().find("checksum mismatch"),
            std::string::npos);
  EXPECT_NE(read.status().message().find(path), std::string::npos);
  EXPECT_FALSE(VerifyShardCheckpoint(path).ok());
  EXPECT_EQ(*ListCompleteCheckpointSteps(dir, 0), std::vector<int64_t>{10});

  // Truncated.
  Spit(path, good.substr(0, good.size() - 100));
  EXPECT_EQ(ReadShardCheckpoint(path).status().code(),
            absl::StatusCode::kDataLoss);
  EXPECT_EQ(*ListCompleteCheckpointSteps(dir, 0), std::vector<int64_t>{10});

  // Not a checkpoint at all.
  Spit(path, "hello");
  EXPECT_EQ(ReadShardCheckpoint(path).status().code(),
            absl::StatusCode::kDataLoss);

  Spit(path, good);
  EXPECT_TRUE(ReadShardCheckpoint(path).ok());
  EXPECT_EQ(*ListCompleteCheckpointSteps(dir, 0),
            (std::vector<int64_t>{10, 20}));
}

TEST(CheckpointTest, ListingIgnoresTempFilesAndOtherShards) {
  const std::string dir = TestDir("list");
  EXPECT_TRUE(ListCompleteCheckpointSteps(dir, 0)->empty());  // no dir yet
  ASSERT_TRUE(WriteShardCheckpoint(dir, Sample(50, 0, 1.0f)).ok());
  ASSERT_TRUE(WriteShardCheckpoint(dir, Sample(50, 1, 1.0f)).ok());
  ASSERT_TRUE(WriteShardCheckpoint(dir, Sample(100, 1, 1.0f)).ok());
  // A writer that crashed mid-way left a temporary file for step 100.
  const std::string good = Slurp(CheckpointPath(dir, 50, 0));
  Spit(CheckpointPath(dir, 100, 0) + ".tmp.999.0", good.substr(0, 64));
  // And a stray directory that is not a step.
  ASSERT_EQ(::mkdir((dir + "/step_abc").c_str(), 0755), 0);

  EXPECT_EQ(*ListCompleteCheckpointSteps(dir, 0), std::vector<int64_t>{50});
  EXPECT_EQ(*ListCompleteCheckpointSteps(dir, 1),
            (std::vector<int64_t>{50, 100}));
  EXPECT_EQ(*ListCheckpointStepDirs(dir), (std::vector<int64_t>{50, 100}));
  // A file copied under another shard's name does not count for it.
  Spit(CheckpointPath(dir, 100, 0), Slurp(CheckpointPath(dir, 100, 1)));
  EXPECT_EQ(*ListCompleteCheckpointSteps(dir, 0), std::vector<int64_t>{50});
}

TEST(CheckpointTest, FailedWriteLeavesPreviousFileIntact) {
  const std::string dir = TestDir("fullfs");
  const ShardCheckpoint old = Sample(7, 0, 1.0f);
  ASSERT_TRUE(WriteShardCheckpoint(dir, old).ok());

  // Simulate a full disk: files may not grow past 4 KiB.
  struct sigaction ignore = {}, previous = {};
  ignore.sa_handler = SIG_IGN;
  ASSERT_EQ(sigaction(SIGXFSZ, &ignore, &previous), 0);
  struct rlimit saved;
  ASSERT_EQ(getrlimit(RLIMIT_FSIZE, &saved), 0);
  struct rlimit small = saved;
  small.rlim_cur = 4096;
  ASSERT_EQ(setrlimit(RLIMIT_FSIZE, &small), 0);
  absl::Status s = WriteShardCheckpoint(dir, Sample(7, 0, 9.0f, 20000));
  ASSERT_EQ(setrlimit(RLIMIT_FSIZE, &saved), 0);
  sigaction(SIGXFSZ, &previous, nullptr);

  EXPECT_EQ(s.code(), absl::StatusCode::kResourceExhausted) << s;
  auto read = ReadShardCheckpoint(CheckpointPath(dir, 7, 0));
  ASSERT_TRUE(read.ok()) << read.status();
  ExpectSame(old, *read);
  // No temporary file is left behind.
  EXPECT_EQ(Files(CheckpointStepDir(dir, 7)),
            std::vector<std::string>{"shard_0.ckpt"});
}

TEST(CheckpointTest, RejectsMismatchedBuffers) {
  const std::string dir = TestDir("mismatch");
  ShardCheckpoint c = Sample(1, 0, 1.0f);
  c.chunks[1].params.pop_back();
  EXPECT_EQ(WriteShardCheckpoint(dir, c).code(),
            absl::StatusCode::kInvalidArgument);
  c = Sample(1, 0, 1.0f);
  c.chunks[0].state.pop_back();
  EXPECT_EQ(WriteShardCheckpoint(dir, c).code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(CheckpointTest, MissingFileIsNotFound) {
  const std::string dir = TestDir("missing");
  auto read = ReadShardCheckpoint(CheckpointPath(dir, 1, 0));
  EXPECT_EQ(read.status().code(), absl::StatusCode::kNotFound);
}

TEST(Checksum64Test, StreamingEqualsOneShot) {
  std::string data;
  for (int i = 0; i < 1000; ++i) data.push_back(static_cast<char>(i * 7));
  Checksum64 whole;
  whole.Update(data.data(), data.size());
  Checksum64 pieces;
  size_t pos = 0;
  for (size_t step : {1, 3, 8, 13, 100, 5}) {
    while (pos + step <= data.size() && step != 5) {
      pieces.Update(data.data() + pos, step);
      pos += step;
      if (pos > 500) break;
    }
  }
  pieces.Update(data.data() + pos, data.size() - pos);
  EXPECT_EQ(whole.Finish(), pieces.Finish());
  Checksum64 other;
  data[999] ^= 1;
  other.Update(data.data(), data.size());
  EXPECT_NE(whole.Finish(), other.Finish());
  Checksum64 shorter;
  shorter.Update(data.data(), data.size() - 1);
  EXPECT_NE(whole.Finish(), shorter.Finish());
}

}  // namespace
}  // namespace lmps
