// CompressSlice: the fast paths equal the naive references; every kind
// round-trips through the shard's decoder (server/tensor_codec.h); error
// feedback keeps exactly what was not sent (sparse kinds: sent + residual
// == gradient + previous residual, bit for bit); int8's error is within
// half a step; RANDOMK is a pure function of its key; the wire bytes shrink
// by the expected factor.
#include "worker/compression.h"

#include <cmath>
#include <cstdint>
#include <vector>

#include "common/model/rng.h"
#include "gtest/gtest.h"
#include "server/tensor_codec.h"

namespace lmps {
namespace {

std::vector<float> Gaussian(uint64_t key, int64_t n, float sd) {
  std::vector<float> v(n);
  for (int64_t i = 0; i < n; ++i) v[i] = sd * StandardNormal(key, i);
  return v;
}

CompressionConfig Config(CompressionKind kind, float ratio = 0) {
  CompressionConfig c;
  c.set_kind(kind);
  c.set_ratio(ratio);
  return c;
}

SliceKey Key(int64_t step = 3) {
  SliceKey k;
  k.seed = 1337;
  k.step = step;
  k.dp_rank = 1;
  k.tensor = "h.0.mlp.c_fc.weight";
  k.chunk = 2;
  k.offset = 512;
  return k;
}

// The shard's view of the slice: validated and decoded.
std::vector<float> Decode(const ChunkSlice& slice, int64_t n) {
  const ChunkSliceView s = ViewOf(slice);
  absl::StatusOr<int64_t> covered = SliceElements(s);
  EXPECT_TRUE(covered.ok()) << covered.status();
  EXPECT_EQ(*covered, n);
  EXPECT_EQ(FirstNonFiniteElement(s), -1);
  std::vector<float> out(n, -1.0f);
  DecodeSlice(s, out.data());
  return out;
}

TEST(CompressionTest, SparseCount) {
  EXPECT_EQ(SparseCount(0.01f, 0), 0);
  EXPECT_EQ(SparseCount(0.01f, 1), 1);
  EXPECT_EQ(SparseCount(0.01f, 1000), 10);
  EXPECT_EQ(SparseCount(0.01f, 1001), 11);  // ceil
  EXPECT_EQ(SparseCount(0.5f, 3), 2);
  EXPECT_EQ(SparseCount(1e-9f, 100), 1);  // at least one
}

TEST(CompressionTest, FastPathsEqualNaiveReferences) {
  for (int64_t n : {1, 2, 7, 100, 1000, 4097}) {
    std::vector<float> v = Gaussian(n, n, 1.0f);
    // Ties: equal magnitudes of either sign, broken by index.
    for (int64_t i = 0; i + 3 < n; i += 4) v[i + 1] = -v[i];
    for (int64_t k : {int64_t{1}, n / 3, n / 2, n}) {
      EXPECT_EQ(TopKIndices(v.data(), n, k),
                ReferenceTopKIndices(v.data(), n, k))
          << n << " " << k;
      EXPECT_EQ(RandomKIndices(42 + n, n, k),
                ReferenceRandomKIndices(42 + n, n, k))
          << n << " " << k;
    }
  }
  // Top-k takes the largest magnitudes, lower index first on ties.
  const std::vector<float> v = {0.5f, -3.0f, 2.0f, -2.0f, 0.0f, 3.0f};
  EXPECT_EQ(TopKIndices(v.data(), 6, 3), (std::vector<uint32_t>{1, 2, 5}));
}

TEST(CompressionTest, SparseKindsKeepExactlyWhatIsNotSent) {
  const int64_t n = 1000;
  for (CompressionKind kind : {TOPK, RANDOMK}) {
    const std::vector<float> g = Gaussian(1, n, 1e-3f);
    const std::vector<float> r = Gaussian(2, n, 5e-4f);
    std::vector<float> r_next(n);
    ChunkSlice s;
    ASSERT_TRUE(CompressSlice(Config(kind, 0.01f), Key(), g.data(), r.data(),
                              n, r_next.data(), &s)
                    .ok());
    EXPECT_TRUE(s.sparse());
    EXPECT_EQ(s.num_elements(), n);
    EXPECT_EQ(s.indices().size(), 4u * 10);
    const std::vector<float> sent = Decode(s, n);
    int nonzero_both = 0;
    for (int64_t i = 0; i < n; ++i) {
      const float v = g[i] + r[i];
      // Exactly one of sent and residual holds v; the other is 0.
      EXPECT_EQ(sent[i] + r_next[i], v) << i;
      nonzero_both += sent[i] != 0 && r_next[i] != 0;
    }
    EXPECT_EQ(nonzero_both, 0);
    if (kind == TOPK) {
      // Everything sent is at least as large as everything kept.
      float min_sent = INFINITY, max_kept = 0;
      for (int64_t i = 0; i < n; ++i) {
        if (sent[i] != 0) min_sent = std::min(min_sent, std::fabs(sent[i]));
        max_kept = std::max(max_kept, std::fabs(r_next[i]));
      }
      EXPECT_GE(min_sent, max_kept);
    }
  }
}

TEST(CompressionTest, ErrorFeedbackSendsEverythingEventually) {
  // A constant gradient over 10 steps with top-k 10%: the residual carries
  // what was not sent, so what arrived plus the residual is the sum of the
  // gradients, exactly (all values are small integers: no rounding).
  const int64_t n = 100;
  std::vector<float> g(n), r(n, 0.0f), arrived(n, 0.0f);
  for (int64_t i = 0; i < n; ++i) g[i] = static_cast<float>(i % 7) - 3.0f;
  for (int step = 0; step < 10; ++step) {
    ChunkSlice s;
    ASSERT_TRUE(CompressSlice(Config(TOPK, 0.1f), Key(step), g.data(),
                              r.data(), n, r.data(), &s)
                    .ok());
    const std::vector<float> sent = Decode(s, n);
    for (int64_t i = 0; i < n; ++i) arrived[i] += sent[i];
  }
  for (int64_t i = 0; i < n; ++i) EXPECT_EQ(arrived[i] + r[i], 10 * g[i]) << i;
}

TEST(CompressionTest, Int8ErrorIsWithinHalfAStep) {
  const int64_t n = 4096;
  const std::vector<float> g = Gaussian(3, n, 2e-3f);
  const std::vector<float> r = Gaussian(4, n, 1e-4f);
  std::vector<float> r_next(n);
  ChunkSlice s;
  ASSERT_TRUE(CompressSlice(Config(QUANT_INT8), Key(), g.data(), r.data(), n,
                            r_next.data(), &s)
                  .ok());
  EXPECT_EQ(s.dtype(), INT8);
  EXPECT_FALSE(s.sparse());
  EXPECT_EQ(s.data().size(), static_cast<size_t>(n));
  float max = 0;
  for (int64_t i = 0; i < n; ++i) max = std::max(max, std::fabs(g[i] + r[i]));
  EXPECT_EQ(s.scale(), max / 127.0f);
  const std::vector<float> sent = Decode(s, n);
  for (int64_t i = 0; i < n; ++i) {
    const float v = g[i] + r[i];
    EXPECT_LE(std::fabs(v - sent[i]), 0.5f * s.scale() * (1 + 1e-5f)) << i;
    EXPECT_EQ(r_next[i], v - sent[i]) << i;  // residual: exactly the error
  }
  // All zeros: scale 0, everything decodes to 0.
  std::vector<float> zeros(8, 0.0f), out(8, 1.0f);
  ASSERT_TRUE(CompressSlice(Config(QUANT_INT8), Key(), zeros.data(),
                            zeros.data(), 8, out.data(), &s)
                  .ok());
  EXPECT_EQ(s.scale(), 0.0f);
  for (float x : Decode(s, 8)) EXPECT_EQ(x, 0.0f);
  for (float x : out) EXPECT_EQ(x, 0.0f);
}

TEST(CompressionTest, RandomKIsAPureFunctionOfItsKey) {
  const int64_t n = 500;
  const std::vector<float> g = Gaussian(5, n, 1.0f);
  const std::vector<float> zero(n, 0.0f);
  std::vector<float> r1(n), r2(n);
  ChunkSlice a, b, c;
  ASSERT_TRUE(CompressSlice(Config(RANDOMK, 0.1f), Key(), g.data(),
                            zero.data(), n, r1.data(), &a)
                  .ok());
  ASSERT_TRUE(CompressSlice(Config(RANDOMK, 0.1f), Key(), g.data(),
                            zero.data(), n, r2.data(), &b)
                  .ok());
  EXPECT_EQ(a.SerializeAsString(), b.SerializeAsString());
  EXPECT_EQ(r1, r2);
  // Another step (or rank, chunk, offset) picks other indices.
  ASSERT_TRUE(CompressSlice(Config(RANDOMK, 0.1f), Key(4), g.data(),
                            zero.data(), n, r2.data(), &c)
                  .ok());
  EXPECT_NE(a.indices(), c.indices());
  SliceKey other = Key();
  other.dp_rank = 0;
  EXPECT_NE(RandomKStreamKey(other), RandomKStreamKey(Key()));
  other = Key();
  other.offset = 0;
  EXPECT_NE(RandomKStreamKey(other), RandomKStreamKey(Key()));
}

TEST(CompressionTest, WireBytesShrinkByTheExpectedFactor) {
  const int64_t n = 10000;
  const std::vector<float> g = Gaussian(6, n, 1.0f);
  const std::vector<float> zero(n, 0.0f);
  std::vector<float> r(n);
  const double dense = 4.0 * n;
  ChunkSlice s;
  ASSERT_TRUE(CompressSlice(Config(TOPK, 0.01f), Key(), g.data(), zero.data(),
                            n, r.data(), &s)
                  .ok());
  EXPECT_EQ(CompressedWireBytes(s), 100 * 8);  // 2 * ratio of dense
  EXPECT_DOUBLE_EQ(dense / CompressedWireBytes(s), 50.0);
  ASSERT_TRUE(CompressSlice(Config(RANDOMK, 0.25f), Key(), g.data(),
                            zero.data(), n, r.data(), &s)
                  .ok());
  EXPECT_EQ(CompressedWireBytes(s), 2500 * 8);
  ASSERT_TRUE(CompressSlice(Config(QUANT_INT8), Key(), g.data(), zero.data(),
                            n, r.data(), &s)
                  .ok());
  EXPECT_EQ(CompressedWireBytes(s), n + 4);  // ~4x
}

TEST(CompressionTest, RefusesNonFiniteAndBadConfigs) {
  std::vector<float> g = {1.0f, NAN, 2.0f}, r(3, 0.0f), out(3);
  ChunkSlice s;
  for (CompressionKind kind : {TOPK, RANDOMK, QUANT_INT8}) {
    absl::Status st =
        CompressSlice(Config(kind, kind == QUANT_INT8 ? 0 : 0.5f), Key(),
                      g.data(), r.data(), 3, out.data(), &s);
    EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument) << st;
    EXPECT_NE(st.message().find("non-finite gradient"), std::string::npos)
        << st;
  }
  g[1] = 3e38f;
  r[1] = 3e38f;  // the sum overflows to Inf
  EXPECT_FALSE(CompressSlice(Config(QUANT_INT8), Key(), g.data(), r.data(), 3,
                             out.data(), &s)
                   .ok());
  g[1] = 3.4e38f;
  r[1] = 0;  // finite, but 128 * scale is not
  EXPECT_FALSE(CompressSlice(Config(QUANT_INT8), Key(), g.data(), r.data(), 3,
                             out.data(), &s)
                   .ok());
  g[1] = 1;
  EXPECT_FALSE(CompressSlice(Config(TOPK, 0.9f), Key(), g.data(), r.data(), 3,
                             out.data(), &s)
                   .ok());
  EXPECT_FALSE(CompressSlice(Config(COMPRESSION_NONE), Key(), g.data(),
                             r.data(), 3, out.data(), &s)
                   .ok());
}

}  // namespace
}  // namespace lmps
