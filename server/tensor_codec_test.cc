#include "server/tensor_codec.h"

#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "gtest/gtest.h"

namespace lmps {
namespace {

std::string F32Bytes(const std::vector<float>& v) {
  return std::string(reinterpret_cast<const char*>(v.data()), 4 * v.size());
}

// FirstNonFinite scans whole blocks of 64 without an early exit, then the
// block that holds the first bad element and the tail one by one: every
// position, around block edges and in the tail, for Inf and NaN, and the
// first of two bad elements.
TEST(FirstNonFiniteTest, F32EveryPositionAroundBlocksAndTail) {
  const float kInf = std::numeric_limits<float>::infinity();
  const float kNan = std::numeric_limits<float>::quiet_NaN();
  for (int n : {0, 1, 63, 64, 65, 130, 200}) {
    std::vector<float> v(n);
    for (int i = 0; i < n; ++i) v[i] = (i % 7 - 3) * 1e30f;  // large, finite
    EXPECT_EQ(FirstNonFinite(F32, F32Bytes(v)), -1) << "n=" << n;
    for (int at = 0; at < n; ++at) {
      for (float bad : {kInf, -kInf, kNan}) {
        std::vector<float> w = v;
        w[at] = bad;
        if (at + 1 < n) w[n - 1] = kNan;  // a later one does not matter
        ASSERT_EQ(FirstNonFinite(F32, F32Bytes(w)), at)
            << "n=" << n << " bad=" << bad;
        ASSERT_EQ(FirstNonFinite(DTYPE_UNSPECIFIED, F32Bytes(w)), at);
      }
    }
  }
}

TEST(FirstNonFiniteTest, Bf16EveryPosition) {
  for (int n : {0, 5, 64, 129}) {
    std::vector<float> v(n, -3.0e38f);  // finite in bf16 too
    std::string b(2 * n, '\0');
    EncodePayloadTo(BF16, v.data(), n, b.data());
    EXPECT_EQ(FirstNonFinite(BF16, b), -1);
    for (int at = 0; at < n; ++at) {
      std::string w = b;
      const uint16_t nan = 0x7fc1, inf = 0xff80;
      std::memcpy(w.data() + 2 * at, at % 2 ? &nan : &inf, 2);
      ASSERT_EQ(FirstNonFinite(BF16, w), at) << "n=" << n;
    }
  }
}

}  // namespace
}  // namespace lmps
