#include "common/model/partition.h"

#include <map>
#include <set>

#include "common/model/model_spec.h"
#include "gtest/gtest.h"

namespace lmps {
namespace {

ModelConfig Model() {
  ModelConfig m;
  m.set_n_layer(2);
  m.set_n_head(2);
  m.set_n_embd(32);
  m.set_block_size(16);
  m.set_vocab_size(256);
  return m;
}

// Every element of every tensor is covered by exactly one chunk, in order.
TEST(PartitionTest, ChunksTileEveryTensorExactly) {
  for (int shards : {1, 2, 3, 7}) {
    auto map = ComputePartition(Model(), shards, 1000);
    ASSERT_TRUE(map.ok()) << map.status();
    std::map<std::string, int64_t> next;
    for (const ChunkDesc& c : map->chunks()) {
      EXPECT_EQ(next[c.tensor()], c.begin()) << c.tensor();
      EXPECT_GT(c.end(), c.begin());
      EXPECT_LE((c.end() - c.begin()) * 4, 1000);
      EXPECT_GE(c.shard(), 0);
      EXPECT_LT(c.shard(), shards);
      next[c.tensor()] = c.end();
    }
    for (const TensorSpec& s : GptTensorSpecs(Model())) {
      EXPECT_EQ(next[s.name], s.num_elements()) << s.name;
    }
  }
}

TEST(PartitionTest, BalancesBytesAcrossShards) {
  auto map = ComputePartition(Model(), 3, 4096);
  ASSERT_TRUE(map.ok());
  int64_t total = 0;
  for (int64_t b : map->shard_bytes()) total += b;
  EXPECT_EQ(total, 4 * GptNumParameters(Model()));
  // Chunks are at most 4 KiB, so greedy placement is within one chunk of
  // perfect balance.
  for (int64_t b : map->shard_bytes()) EXPECT_LE(b, total / 3 + 4096);
  EXPECT_LT(map->imbalance(), 1.1);
  EXPECT_GE(map->imbalance(), 1.0);
}

TEST(PartitionTest, IsAPureFunctionWithAVersion) {
  auto a = ComputePartition(Model(), 2, 4096);
  auto b = ComputePartition(Model(), 2, 4096);
  auto c = ComputePartition(Model(), 3, 4096);
  ASSERT_TRUE(a.ok() && b.ok() && c.ok());
  EXPECT_EQ(a->SerializeAsString(), b->SerializeAsString());
  EXPECT_NE(a->version(), c->version());
  EXPECT_EQ(ChunksOfShard(*a, 0).size() + ChunksOfShard(*a, 1).size(),
            static_cast<size_t>(a->chunks_size()));
}

// Each bad argument is InvalidArgument naming what is wrong.
void ExpectInvalid(const absl::StatusOr<PartitionMap>& map,
                   const std::string& needle) {
  ASSERT_FALSE(map.ok()) << "want an error containing: " << needle;
  EXPECT_EQ(map.status().code(), absl::StatusCode::kInvalidArgument)
      << map.status();
  EXPECT_NE(map.status().message().find(needle), std::string::npos)
      << map.status() << "; want: " << needle;
}

TEST(PartitionTest, RejectsBadArguments) {
  ExpectInvalid(ComputePartition(Model(), 0, 4096),
                "num_shards must be positive, got 0");
  ExpectInvalid(ComputePartition(Model(), 2, 2),
                "max_chunk_bytes must be at least 4, got 2");
  ModelConfig bad = Model();
  bad.set_n_head(3);
  ExpectInvalid(ComputePartition(bad, 2, 4096),
                "n_embd (32) must be divisible by n_head (3)");
}

}  // namespace
}  // namespace lmps
