#include "worker/model/sampling.h"

#include <cmath>
#include <map>
#include <vector>

#include "gtest/gtest.h"

namespace lmps {
namespace {

// How often each token comes out over u = (i + 0.5) / n, i < n: the exact
// distribution, discretised.
std::map<int, int> Histogram(const std::vector<float>& logits,
                             const SamplingOptions& o, int n = 1000) {
  std::vector<double> scratch;
  std::map<int, int> h;
  for (int i = 0; i < n; ++i) ++h[SampleToken(logits, o, (i + 0.5) / n, &scratch)];
  return h;
}

TEST(SamplingTest, GreedyIsTheFirstArgmax) {
  std::vector<double> scratch;
  EXPECT_EQ(SampleToken({1, 5, 5, 2}, {}, 0.9, &scratch), 1);
  // Within the vocabulary limit only.
  EXPECT_EQ(SampleToken({1, 2, 3, 9}, {.vocab_limit = 3}, 0.5, &scratch), 2);
}

TEST(SamplingTest, TemperatureSamplesTheSoftmax) {
  // exp(0) : exp(log 3) = 1 : 3.
  const std::vector<float> logits = {0.0f, std::log(3.0f)};
  const std::map<int, int> h = Histogram(logits, {.temperature = 1});
  EXPECT_EQ(h.at(0), 250);
  EXPECT_EQ(h.at(1), 750);
  // Temperature 0.5 squares the ratio: 1 : 9.
  const std::map<int, int> cold = Histogram(logits, {.temperature = 0.5f});
  EXPECT_EQ(cold.at(0), 100);
  EXPECT_EQ(cold.at(1), 900);
}

TEST(SamplingTest, TopKKeepsTheLargestAndTheirTies) {
  const std::vector<float> logits = {1, 3, 2, 3, 0};
  const std::map<int, int> h = Histogram(logits, {.temperature = 1, .top_k = 1});
  EXPECT_EQ(h.size(), 2u);  // both 3s
  EXPECT_EQ(h.at(1), 500);
  EXPECT_EQ(h.at(3), 500);
  const std::map<int, int> k3 = Histogram(logits, {.temperature = 1, .top_k = 3});
  EXPECT_EQ(k3.count(0), 0u);
  EXPECT_EQ(k3.count(4), 0u);
  EXPECT_GT(k3.at(2), 0);
}

TEST(SamplingTest, TopPKeepsTheSmallestNucleus) {
  // Probabilities 0.5, 0.3, 0.2 (logits are their logs).
  const std::vector<float> logits = {std::log(0.2f), std::log(0.5f),
                                     std::log(0.3f)};
  // 0.5 alone reaches 0.5: only token 1.
  EXPECT_EQ(Histogram(logits, {.temperature = 1, .top_p = 0.5f}).size(), 1u);
  // 0.6 needs 0.5 + 0.3: tokens 1 and 2 in the ratio 5 : 3.
  const std::map<int, int> h =
      Histogram(logits, {.temperature = 1, .top_p = 0.6f}, 800);
  EXPECT_EQ(h.count(0), 0u);
  EXPECT_EQ(h.at(1), 500);
  EXPECT_EQ(h.at(2), 300);
  // top_p 1 keeps everything.
  EXPECT_EQ(Histogram(logits, {.temperature = 1, .top_p = 1}).size(), 3u);
}

TEST(SamplingTest, PaddingRowsAreNeverSampled) {
  // The padding row's logit is the largest: it must still never come out.
  const std::vector<float> logits = {0, 0, 50};
  for (const SamplingOptions& o :
       {SamplingOptions{.vocab_limit = 2},
        SamplingOptions{.temperature = 1, .vocab_limit = 2},
        SamplingOptions{.temperature = 2, .top_k = 1, .vocab_limit = 2},
        SamplingOptions{.temperature = 1, .top_p = 0.1f, .vocab_limit = 2}}) {
    EXPECT_EQ(Histogram(logits, o).count(2), 0u);
  }
}

TEST(SamplingTest, ValidateNamesTheBadOption) {
  EXPECT_TRUE(ValidateSampling({}, 10).ok());
  EXPECT_EQ(ValidateSampling({.temperature = -1}, 10).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ValidateSampling({.temperature = INFINITY}, 10).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ValidateSampling({.top_k = -1}, 10).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ValidateSampling({.top_p = 0}, 10).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ValidateSampling({.top_p = 1.5f}, 10).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_NE(ValidateSampling({.top_p = NAN}, 10).message().find("top_p"),
            std::string::npos);
  EXPECT_EQ(ValidateSampling({.vocab_limit = 11}, 10).code(),
            absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace lmps
