#include "common/model/rng.h"

#include <cmath>

#include "gtest/gtest.h"

namespace lmps {
namespace {

TEST(RngTest, StableAcrossCalls) {
  EXPECT_EQ(StableKey(1, "wte.weight"), StableKey(1, "wte.weight"));
  EXPECT_NE(StableKey(1, "wte.weight"), StableKey(2, "wte.weight"));
  EXPECT_NE(StableKey(1, "wte.weight"), StableKey(1, "wpe.weight"));
}

// Pinned values: changing the generator would silently change every
// initialisation and data order (and break the data order that
// docs/architecture.md documents and tests/torch_train_reference_test.py
// re-implements); this test makes that a visible decision.
TEST(RngTest, PinnedValues) {
  // SplitMix64's published first output for the seed 0.
  EXPECT_EQ(Mix64(0), 0xe220a8397b1dcdafULL);
  // Computed by an independent Python transcription of the definitions.
  EXPECT_EQ(StableKey(1, "wte.weight"), 0x6da43ef6e4453648ULL);
  EXPECT_EQ(StableKey(1337, "x"), 0x73b3188c448ab360ULL);
  EXPECT_EQ(RandomBits(StableKey(1337, "x"), 0), 0xf1a77a34b6acabdfULL);
  EXPECT_EQ(RandomBits(StableKey(1337, "x"), 12345), 0xa95eccf28a0d6707ULL);
  EXPECT_DOUBLE_EQ(UniformDouble(StableKey(1337, "x"), 0), 0.943961751813435);
  EXPECT_DOUBLE_EQ(UniformDouble(StableKey(1337, "x"), 1), 0.881437605292781);
  // sqrt(-2 ln u0) cos(2 pi u1) of the two values above.
  EXPECT_FLOAT_EQ(StandardNormal(StableKey(1337, "x"), 0), 0.24965949f);
}

TEST(RngTest, NormalHasUnitMoments) {
  const uint64_t key = StableKey(7, "moments");
  const int n = 200000;
  double sum = 0, sum2 = 0;
  for (int i = 0; i < n; ++i) {
    double x = StandardNormal(key, i);
    sum += x;
    sum2 += x * x;
  }
  EXPECT_NEAR(sum / n, 0.0, 0.01);
  EXPECT_NEAR(sum2 / n, 1.0, 0.02);
}

TEST(RngTest, UniformInRange) {
  for (int i = 0; i < 10000; ++i) {
    double u = UniformDouble(3, i);
    ASSERT_GE(u, 0.0);
    ASSERT_LT(u, 1.0);
  }
}

}  // namespace
}  // namespace lmps
