#include "worker/data/dataset.h"

#include <string>
#include <vector>

#include "gtest/gtest.h"

namespace lmps {
namespace {

std::string Text(int n) {
  std::string s;
  for (int i = 0; i < n; ++i) s.push_back(static_cast<char>('a' + i % 26));
  return s;
}

TEST(DatasetTest, TargetsAreTokensShiftedByOne) {
  auto ds = TextDataset::FromText(Text(1000), 0.1f, 8);
  ASSERT_TRUE(ds.ok());
  std::vector<int32_t> x(4 * 8), y(4 * 8);
  (*ds)->Batch(Split::kTrain, 1, 3, 4, 0, 4, x.data(), y.data());
  for (int i = 0; i < 4; ++i) {
    for (int t = 0; t + 1 < 8; ++t) EXPECT_EQ(y[i * 8 + t], x[i * 8 + t + 1]);
    for (int t = 0; t < 8; ++t) {
      EXPECT_EQ((x[i * 8 + t] - 'a' + 1) % 26, (y[i * 8 + t] - 'a') % 26);
    }
  }
}

// The global batch is the same however it is split across replicas.
TEST(DatasetTest, ReplicaSlicesComposeTheGlobalBatch) {
  auto ds = TextDataset::FromText(Text(5000), 0.1f, 16);
  ASSERT_TRUE(ds.ok());
  std::vector<int32_t> all(6 * 16), ally(6 * 16);
  (*ds)->Batch(Split::kTrain, 7, 11, 6, 0, 6, all.data(), ally.data());
  for (int dp : {2, 3}) {
    const int n = 6 / dp;
    for (int r = 0; r < dp; ++r) {
      std::vector<int32_t> x(n * 16), y(n * 16);
      (*ds)->Batch(Split::kTrain, 7, 11, 6, r * n, n, x.data(), y.data());
      for (int i = 0; i < n * 16; ++i) EXPECT_EQ(x[i], all[r * n * 16 + i]);
    }
  }
  // Another step or seed gives other samples.
  std::vector<int32_t> other(6 * 16), othery(6 * 16);
  (*ds)->Batch(Split::kTrain, 7, 12, 6, 0, 6, other.data(), othery.data());
  EXPECT_NE(other, all);
}

TEST(DatasetTest, SplitsDoNotOverlap) {
  // Train part is all 'a', validation part is all 'b'.
  std::string text(900, 'a');
  text += std::string(100, 'b');
  auto ds = TextDataset::FromText(text, 0.1f, 8);
  ASSERT_TRUE(ds.ok());
  std::vector<int32_t> x(16 * 8), y(16 * 8);
  (*ds)->Batch(Split::kTrain, 1, 0, 16, 0, 16, x.data(), y.data());
  for (int32_t v : y) EXPECT_EQ(v, 'a');
  (*ds)->Batch(Split::kVal, 1, 0, 16, 0, 16, x.data(), y.data());
  for (int32_t v : x) EXPECT_EQ(v, 'b');
}

TEST(DatasetTest, ErrorsAreClear) {
  auto missing = TextDataset::Create("/nonexistent/data.txt", 0.1f, 8);
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kNotFound);
  EXPECT_NE(missing.status().message().find("/nonexistent/data.txt"),
            std::string::npos);
  auto tiny = TextDataset::FromText("hello", 0.1f, 8);
  EXPECT_EQ(tiny.status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(DatasetTest, TokenizerRoundTrips) {
  std::string s = "GNU \xff\x01 licence";
  EXPECT_EQ(TextDataset::Decode(TextDataset::Encode(s)), s);
  EXPECT_EQ(TextDataset::Encode("\xff")[0], 255);
}

}  // namespace
}  // namespace lmps
