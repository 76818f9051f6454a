// ParameterShard in SYNC: the rank-ordered sum of the replicas' gradients
// whatever the order the pushes arrive in (whole streams or chunk by chunk),
// and the memory that takes: one accumulator per chunk, plus a buffer only
// for a rank that arrives before an earlier rank (ranks 0 and 1 excepted).
#include <algorithm>
#include <cstring>
#include <random>

#include "server/shard_test_util.h"

namespace lmps {
namespace shard_test {
namespace {

constexpr int kDp = 4;

// Gradients of widely varying magnitude, so that float addition is not
// associative on them: [rank][chunk][element].
using Grads = std::vector<std::vector<std::vector<float>>>;

Grads RandomGrads(const ParameterShard& shard) {
  std::mt19937 rng(7);
  std::uniform_real_distribution<float> value(-1, 1), exponent(-4, 4);
  Grads g(kDp);
  for (int r = 0; r < kDp; ++r) {
    for (const ChunkDesc& c : ChunksOfShard(shard.partition(), shard.shard())) {
      std::vector<float> v(c.end() - c.begin());
      for (float& x : v) x = value(rng) * std::pow(10.0f, exponent(rng));
      g[r].push_back(std::move(v));
    }
  }
  return g;
}

// One push stream of `rank` holding only chunk `c` (two slices).
std::vector<PushRequest> ChunkStream(const ParameterShard& shard, int rank,
                                     int c, const Grads& g,
                                     DType dtype = F32) {
  const ChunkDesc desc = ChunksOfShard(shard.partition(), shard.shard())[c];
  const std::vector<float>& v = g[rank][c];
  const int64_t n = static_cast<int64_t>(v.size()), half = n / 2;
  std::vector<PushRequest> stream;
  for (auto [b, e] : {std::pair<int64_t, int64_t>{half, n}, {0, half}}) {
    PushRequest& m = stream.emplace_back();
    m.set_worker_id("w");
    m.set_dp_rank(rank);
    m.set_step(0);
    m.set_partition_version(shard.partition().version());
    ChunkSlice* s = m.add_slices();
    s->set_tensor(desc.tensor());
    s->set_chunk(desc.index());
    s->set_offset(b);
    s->set_dtype(dtype);
    EncodePayload(dtype, v.data() + b, e - b, s->mutable_data());
  }
  return stream;
}

// Every chunk of `rank` in one stream.
std::vector<PushRequest> WholeStream(const ParameterShard& shard, int rank,
                                     const Grads& g, DType dtype = F32) {
  std::vector<PushRequest> stream;
  for (size_t c = 0; c < g[rank].size(); ++c) {
    for (PushRequest& m : ChunkStream(shard, rank, c, g, dtype)) {
      stream.push_back(std::move(m));
    }
  }
  return stream;
}

// The average for element i of chunk c summed in the given rank order.
float Average(const Grads& g, int c, size_t i, const std::vector<int>& order) {
  float sum = g[order[0]][c][i];
  for (size_t k = 1; k < order.size(); ++k) sum += g[order[k]][c][i];
  return sum / static_cast<float>(kDp);
}

// With plain SGD (momentum 0, lr constant, no clipping) the momentum
// buffer after step 0 is the averaged gradient itself.
TEST(ShardAccumulateTest, EveryArrivalOrderGivesTheRankOrderedSum) {
  const JobSpec spec = Spec(kDp, 1, SGD);
  auto probe = MakeShard(Options(spec, 0));
  const Grads g = RandomGrads(*probe);
  const int chunks = static_cast<int>(g[0].size());
  ASSERT_GT(chunks, 2);
  // The data can tell orders apart: summing 3, 2, 1, 0 differs somewhere.
  int differs = 0;
  for (int c = 0; c < chunks; ++c) {
    for (size_t i = 0; i < g[0][c].size(); ++i) {
      differs += Average(g, c, i, {0, 1, 2, 3}) != Average(g, c, i, {3, 2, 1, 0});
    }
  }
  ASSERT_GT(differs, 0);

  std::vector<int> order = {0, 1, 2, 3};
  int orders = 0;
  do {
    for (const bool per_chunk : {false, true}) {
      SCOPED_TRACE(::testing::Message()
                   << "order " << order[0] << order[1] << order[2] << order[3]
                   << (per_chunk ? ", chunk by chunk" : ", whole streams"));
      auto shard = MakeShard(Options(spec, 0));
      if (per_chunk) {
        // Chunk c's ranks arrive in the order rotated by c, chunks
        // interleaved.
        for (int k = 0; k < kDp; ++k) {
          for (int c = 0; c < chunks; ++c) {
            const int rank = order[(k + c) % kDp];
            ASSERT_TRUE(shard->Push(ChunkStream(*shard, rank, c, g)).ok());
          }
        }
      } else {
        for (int rank : order) {
          ASSERT_TRUE(shard->Push(WholeStream(*shard, rank, g)).ok());
        }
      }
      // One accumulator per chunk is all that is left.
      EXPECT_EQ(shard->gradient_bytes(), 4 * shard->num_elements());
      SyncStep(shard.get(), 0);
      const ShardCheckpoint snap = shard->Snapshot();
      ASSERT_EQ(static_cast<int>(snap.chunks.size()), chunks);
      for (int c = 0; c < chunks; ++c) {
        const std::vector<float>& avg = snap.chunks[c].state[0];
        for (size_t i = 0; i < avg.size(); ++i) {
          const float want = Average(g, c, i, {0, 1, 2, 3});
          ASSERT_EQ(std::memcmp(&avg[i], &want, 4), 0)
              << "chunk " << c << " element " << i << ": " << avg[i]
              << " != " << want;
        }
      }
    }
    ++orders;
  } while (std::next_permutation(order.begin(), order.end()));
  EXPECT_EQ(orders, 24);
}

// The service hands the shard the messages as gRPC received them
// (common/wire/chunk_wire.h): payloads across many slices, elements split
// between two. Read in place they give bit for bit what the same messages
// give whole, in rank order and with ranks held for an earlier one.
TEST(ShardAccumulateTest, MessagesReadInPlaceFromSplitBuffersEqualWholeOnes) {
  const JobSpec spec = Spec(kDp, 1, SGD);
  auto probe = MakeShard(Options(spec, 0));
  const Grads g = RandomGrads(*probe);
  std::mt19937 rng(13);
  // A message's bytes in slices of 1 to 97 bytes.
  auto received = [&](const PushRequest& m) {
    const std::string bytes = m.SerializeAsString();
    std::vector<grpc::Slice> slices;
    for (size_t at = 0; at < bytes.size();) {
      const size_t n = std::min<size_t>(bytes.size() - at, 1 + rng() % 97);
      slices.emplace_back(bytes.data() + at, n);
      at += n;
    }
    return grpc::ByteBuffer(slices.data(), slices.size());
  };
  for (const DType dtype : {F32, BF16}) {
    for (const std::vector<int>& order :
         {std::vector<int>{0, 1, 2, 3}, std::vector<int>{3, 2, 1, 0}}) {
      SCOPED_TRACE(::testing::Message() << DType_Name(dtype) << " order "
                                        << order[0] << order[1] << order[2]
                                        << order[3]);
      auto whole = MakeShard(Options(spec, 0));
      auto split = MakeShard(Options(spec, 0));
      int64_t split_parts = 0;
      for (int rank : order) {
        const std::vector<PushRequest> stream =
            WholeStream(*whole, rank, g, dtype);
        ASSERT_TRUE(whole->Push(stream).ok());
        std::vector<PushRequestView> views(stream.size());
        for (size_t m = 0; m < stream.size(); ++m) {
          ASSERT_TRUE(ParsePushRequest(received(stream[m]), &views[m]).ok());
          for (const ChunkSliceView& v : views[m].slices) {
            split_parts += static_cast<int64_t>(v.data.parts().size());
          }
        }
        ASSERT_TRUE(split->Push(views).ok());
      }
      ASSERT_GT(split_parts, 100);  // the payloads did come in pieces
      SyncStep(whole.get(), 0);
      SyncStep(split.get(), 0);
      const ShardCheckpoint a = whole->Snapshot(), b = split->Snapshot();
      ASSERT_EQ(a.chunks.size(), b.chunks.size());
      for (size_t c = 0; c < a.chunks.size(); ++c) {
        const std::vector<float>& x = a.chunks[c].state[0];
        const std::vector<float>& y = b.chunks[c].state[0];
        ASSERT_EQ(x.size(), y.size());
        EXPECT_EQ(std::memcmp(x.data(), y.data(), 4 * x.size()), 0)
            << "chunk " << c;
      }
    }
  }
}

TEST(ShardAccumulateTest, OnlyRanksArrivingBeforeTheirTurnAreBuffered) {
  const JobSpec spec = Spec(kDp, 1, SGD);
  auto shard = MakeShard(Options(spec, 0));
  const Grads g = RandomGrads(*shard);
  const int64_t one = 4 * shard->num_elements();  // one gradient
  EXPECT_EQ(shard->gradient_bytes(), 0);
  // Rank 1 before rank 0: folded at once (the first addition commutes).
  ASSERT_TRUE(shard->Push(WholeStream(*shard, 1, g)).ok());
  EXPECT_EQ(shard->gradient_bytes(), one);
  // Rank 3 before rank 2: held until 2 is folded.
  ASSERT_TRUE(shard->Push(WholeStream(*shard, 3, g)).ok());
  EXPECT_EQ(shard->gradient_bytes(), 2 * one);
  ASSERT_TRUE(shard->Push(WholeStream(*shard, 0, g)).ok());
  EXPECT_EQ(shard->gradient_bytes(), 2 * one);
  ASSERT_TRUE(shard->Push(WholeStream(*shard, 2, g)).ok());
  EXPECT_EQ(shard->gradient_bytes(), one);
  SyncStep(shard.get(), 0);
  // The next step reuses the accumulator.
  for (int rank = 0; rank < kDp; ++rank) {
    ASSERT_TRUE(shard->Push(Stream(*shard, rank, 1)).ok());
    EXPECT_EQ(shard->gradient_bytes(), one);
  }
  SyncStep(shard.get(), 1);
}

}  // namespace
}  // namespace shard_test
}  // namespace lmps
