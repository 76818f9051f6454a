#include "worker/backend/sim_backend.h"

#include <cmath>
#include <vector>

#include "gtest/gtest.h"

namespace lmps {
namespace {

// A fake clock: records the sleeps asked for and oversleeps each by `over`.
struct FakeSleep {
  std::vector<absl::Duration> asked;
  absl::Duration over;
  absl::Duration total;
  std::function<absl::Duration(absl::Duration)> Fn() {
    return [this](absl::Duration d) {
      asked.push_back(d);
      total += d + over;
      return d + over;
    };
  }
};

TEST(SimBackendTest, ChargesTheFlopsOfProductsAndAttentionOnly) {
  FakeSleep sleep;
  SimBackendOptions o;
  o.flops_per_second = 1e12;
  o.min_sleep = absl::ZeroDuration();
  o.sleep = sleep.Fn();
  auto b = SimBackend::Create(o);
  ASSERT_TRUE(b.ok()) << b.status();
  SimBackend& sim = **b;
  sim.MatmulForward(nullptr, nullptr, nullptr, nullptr, 1000, 100, 50);
  EXPECT_EQ(sim.charged(), absl::Seconds(2.0 * 1000 * 100 * 50 / 1e12));
  sim.MatmulBackward(nullptr, nullptr, nullptr, nullptr, nullptr, nullptr,
                     1000, 100, 50);
  sim.AttentionForward(nullptr, nullptr, nullptr, 2, 64, 32, 4);
  sim.AttentionBackward(nullptr, nullptr, nullptr, nullptr, nullptr, 2, 64, 32,
                        4);
  sim.GeluForward(nullptr, nullptr, 1 << 20);
  sim.LayerNormForward(nullptr, nullptr, nullptr, nullptr, nullptr, nullptr,
                       1000, 100);
  const double flops = 6.0 * 1000 * 100 * 50 + 6.0 * 2 * 64 * 64 * 32;
  EXPECT_NEAR(absl::ToDoubleSeconds(sim.charged()), flops / 1e12, 1e-9);  // Duration: 1/4 ns
  EXPECT_EQ(sleep.asked.size(), 4u);  // no time for the other layers
  EXPECT_NEAR(absl::ToDoubleSeconds(sleep.total), flops / 1e12, 1e-9);  // Duration: 1/4 ns
}

TEST(SimBackendTest, SleepsInPiecesAndPaysBackOversleeping) {
  FakeSleep sleep;
  sleep.over = absl::Microseconds(300);
  SimBackendOptions o;
  o.flops_per_second = 1e9;  // 1 MFLOP = 1 ms
  o.min_sleep = absl::Milliseconds(1);
  o.sleep = sleep.Fn();
  auto b = SimBackend::Create(o);
  ASSERT_TRUE(b.ok());
  // 100 products of 0.25 ms each: 25 ms charged, slept in >= 1 ms pieces.
  for (int i = 0; i < 100; ++i) {
    (*b)->MatmulForward(nullptr, nullptr, nullptr, nullptr, 125, 1000, 1);
  }
  EXPECT_EQ((*b)->charged(), absl::Milliseconds(25));
  for (absl::Duration d : sleep.asked) EXPECT_GE(d, absl::Milliseconds(1));
  // Every oversleep is deducted later: the total slept is within one piece
  // (plus one oversleep) of the charge.
  EXPECT_LE(sleep.total, absl::Milliseconds(25) + absl::Microseconds(300));
  EXPECT_GE(sleep.total, absl::Milliseconds(24));
}

TEST(SimBackendTest, MemoryIsZeroedOnDemandAndCopiesAreReal) {
  auto b = SimBackend::Create({});
  ASSERT_TRUE(b.ok());
  // 64 GiB of address space: mapped lazily, never touched.
  auto big = (*b)->Alloc(size_t{16} << 30);
  ASSERT_TRUE(big.ok()) << big.status();
  auto p = (*b)->Alloc(4);
  ASSERT_TRUE(p.ok());
  EXPECT_EQ((*p)[3], 0.0f);
  const float in[4] = {1, 2, 3, 4};
  float out[4] = {};
  ASSERT_TRUE((*b)->CopyToBackend(*p, in, 4).ok());
  ASSERT_TRUE((*b)->CopyToHost(out, *p, 4).ok());
  EXPECT_EQ(out[3], 4.0f);
  // Collectives treat it as a device's memory (copies, as on a GPU).
  EXPECT_FALSE((*b)->memory_is_host());
  (*b)->Free(*big);
  (*b)->Free(*p);
}

TEST(SimBackendTest, RefusesABadThroughput) {
  for (double f : {0.0, -1.0, double{NAN}, double{INFINITY}}) {
    SimBackendOptions o;
    o.flops_per_second = f;
    EXPECT_EQ(SimBackend::Create(o).status().code(),
              absl::StatusCode::kInvalidArgument)
        << f;
  }
}

}  // namespace
}  // namespace lmps
