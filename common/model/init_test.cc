#include "common/model/init.h"

#include <cmath>
#include <vector>

#include "common/model/model_spec.h"
#include "common/model/rng.h"
#include "gtest/gtest.h"

namespace lmps {
namespace {

TensorSpec Normal() {
  return {"h.0.attn.c_attn.weight", {96, 32}, InitKind::kNormal, 0.02f, true};
}

TEST(InitTest, NormalIsScaledStandardNormalOfNameAndIndex) {
  const TensorSpec spec = Normal();
  std::vector<float> out(10);
  InitTensorRange(spec, 7, 5, 15, out.data());
  const uint64_t key = StableKey(7, spec.name);
  for (int i = 0; i < 10; ++i) {
    EXPECT_EQ(out[i], StandardNormal(key, 5 + i) * 0.02f) << i;
  }
}

TEST(InitTest, ChunkAloneEqualsSameRangeOfWholeTensor) {
  const TensorSpec spec = Normal();
  const int64_t n = spec.num_elements();
  std::vector<float> whole(n);
  InitTensorRange(spec, 1337, 0, n, whole.data());
  for (auto [b, e] : {std::pair<int64_t, int64_t>{0, 1}, {17, 1000},
                      {1000, n}, {n - 1, n}, {5, 5}}) {
    std::vector<float> part(e - b);
    InitTensorRange(spec, 1337, b, e, part.data());
    for (int64_t i = b; i < e; ++i) {
      ASSERT_EQ(part[i - b], whole[i]) << "range [" << b << "," << e << ") at "
                                       << i;
    }
  }
}

TEST(InitTest, StatisticsLookNormal) {
  const TensorSpec spec = Normal();
  const int64_t n = spec.num_elements();
  std::vector<float> v(n);
  InitTensorRange(spec, 1, 0, n, v.data());
  double sum = 0, sq = 0;
  for (float x : v) {
    sum += x;
    sq += static_cast<double>(x) * x;
  }
  const double mean = sum / n;
  const double std = std::sqrt(sq / n - mean * mean);
  EXPECT_NEAR(mean, 0.0, 0.002);
  EXPECT_NEAR(std, 0.02, 0.001);
}

TEST(InitTest, DependsOnSeedAndName) {
  TensorSpec a = Normal();
  TensorSpec b = a;
  b.name = "h.1.attn.c_attn.weight";
  float x, y, z;
  InitTensorRange(a, 1, 3, 4, &x);
  InitTensorRange(b, 1, 3, 4, &y);
  InitTensorRange(a, 2, 3, 4, &z);
  EXPECT_NE(x, y);
  EXPECT_NE(x, z);
}

TEST(InitTest, ZerosAndOnes) {
  TensorSpec zeros{"ln_f.bias", {8}, InitKind::kZeros, 0.0f, false};
  TensorSpec ones{"ln_f.weight", {8}, InitKind::kOnes, 0.0f, false};
  std::vector<float> z(8, 5.0f), o(8, 5.0f);
  InitTensorRange(zeros, 1, 0, 8, z.data());
  InitTensorRange(ones, 1, 0, 8, o.data());
  for (int i = 0; i < 8; ++i) {
    EXPECT_EQ(z[i], 0.0f);
    EXPECT_EQ(o[i], 1.0f);
  }
}

}  // namespace
}  // namespace lmps
