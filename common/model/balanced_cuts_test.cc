#include "common/model/balanced_cuts.h"

#include <random>
#include <vector>

#include "gtest/gtest.h"

namespace lmps {
namespace {

// Valid cut points of n items into `parts` non-empty ranges.
void ExpectValid(const std::vector<int>& cuts, int n, int parts) {
  ASSERT_EQ(cuts.size(), static_cast<size_t>(parts + 1));
  EXPECT_EQ(cuts.front(), 0);
  EXPECT_EQ(cuts.back(), n);
  for (int p = 0; p < parts; ++p) EXPECT_LT(cuts[p], cuts[p + 1]) << p;
}

// Equal costs (what ParallelLayout passes): the fast search returns exactly
// the reference's cuts, for every n, parts and many extras, including the
// GPT shape (head cost on the last part) and ties (zero extras).
TEST(BalancedCutsTest, EqualCostsMatchTheReference) {
  std::mt19937 rng(7);
  std::uniform_real_distribution<double> unit(0, 1);
  int cases = 0;
  for (int n = 1; n <= 40; ++n) {
    for (int parts = 1; parts <= n; ++parts) {
      for (int trial = 0; trial < 4; ++trial) {
        const double cost = trial == 0 ? 1.0 : 1e3 + 1e6 * unit(rng);
        std::vector<double> costs(n, cost);
        std::vector<double> extra(parts, 0);
        if (trial == 1) extra[parts - 1] = 4.5 * cost;  // a GPT head
        if (trial >= 2) {
          for (double& e : extra) e = unit(rng) < 0.5 ? 0 : cost * 10 * unit(rng);
        }
        const std::vector<int> want = BalancedCutsReference(costs, extra, parts);
        ExpectValid(want, n, parts);
        ASSERT_EQ(BalancedCuts(costs, extra, parts), want)
            << "n=" << n << " parts=" << parts << " trial=" << trial;
        ++cases;
      }
    }
  }
  EXPECT_GT(cases, 3000);
}

// Unequal costs take the reference.
TEST(BalancedCutsTest, UnequalCostsMatchTheReference) {
  std::mt19937 rng(11);
  std::uniform_real_distribution<double> unit(0, 1);
  for (int trial = 0; trial < 200; ++trial) {
    const int n = 1 + trial % 25;
    const int parts = 1 + (trial * 7) % n;
    std::vector<double> costs(n), extra(parts);
    for (double& c : costs) c = unit(rng);
    for (double& e : extra) e = unit(rng);
    ASSERT_EQ(BalancedCuts(costs, extra, parts),
              BalancedCutsReference(costs, extra, parts))
        << trial;
  }
}

// A deep model (jobspec_fuzzer once spent 76 s in the reference on 7,590
// layers and 8 stages): equal stages up to one layer, the head's stage the
// lightest in layers.
TEST(BalancedCutsTest, DeepModel) {
  const int n = 7590, parts = 8;
  std::vector<double> costs(n, 1.0), extra(parts, 0);
  extra[parts - 1] = 100;
  const std::vector<int> cuts = BalancedCuts(costs, extra, parts);
  ExpectValid(cuts, n, parts);
  double worst = 0;
  for (int p = 0; p < parts; ++p) {
    worst = std::max(worst, cuts[p + 1] - cuts[p] + extra[p]);
  }
  // The optimum is at least the average load, and within one layer of it.
  const double average = (n + 100.0) / parts;
  EXPECT_GE(worst, average);
  EXPECT_LE(worst, average + 1);
}

}  // namespace
}  // namespace lmps
