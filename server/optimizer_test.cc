#include "server/optimizer.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <vector>

#include "gtest/gtest.h"

namespace lmps {
namespace {

OptimizerConfig Schedule() {
  OptimizerConfig c;
  c.set_lr(1e-3f);
  c.set_min_lr(1e-4f);
  c.set_warmup_steps(10);
  return c;
}

TEST(LearningRateTest, LinearWarmupThenCosine) {
  const OptimizerConfig c = Schedule();  // W = 10, S = 110
  // Warm-up: lr * (step + 1) / W.
  EXPECT_NEAR(LearningRate(c, 0, 110), 1e-4, 1e-10);
  EXPECT_NEAR(LearningRate(c, 4, 110), 5e-4, 1e-10);
  EXPECT_NEAR(LearningRate(c, 9, 110), 1e-3, 1e-10);
  // Cosine: p = (step - 10) / 100.
  EXPECT_NEAR(LearningRate(c, 10, 110), 1e-3, 1e-10);  // p = 0
  // p = 0.5: 1e-4 + 0.5 * (1 + 0) * 9e-4 = 5.5e-4.
  EXPECT_NEAR(LearningRate(c, 60, 110), 5.5e-4, 1e-10);
  // p = 0.25: 1e-4 + 0.5 * (1 + cos(pi/4)) * 9e-4 = 8.682e-4.
  EXPECT_NEAR(LearningRate(c, 35, 110),
              1e-4 + 0.5 * (1 + std::sqrt(0.5)) * 9e-4, 1e-10);
  EXPECT_NEAR(LearningRate(c, 110, 110), 1e-4, 1e-10);  // p = 1
  EXPECT_NEAR(LearningRate(c, 500, 110), 1e-4, 1e-10);  // clamped
  // The schedule never leaves [min_lr, lr].
  for (int s = 0; s < 120; ++s) {
    EXPECT_LE(LearningRate(c, s, 110), 1e-3 + 1e-9);
    EXPECT_GE(LearningRate(c, s, 110), 1e-4 - 1e-9);
  }
}

TEST(LearningRateTest, NoWarmupStartsAtPeak) {
  OptimizerConfig c = Schedule();
  c.set_warmup_steps(0);
  EXPECT_NEAR(LearningRate(c, 0, 100), 1e-3, 1e-10);
  EXPECT_NEAR(LearningRate(c, 50, 100), 5.5e-4, 1e-10);
  // A single-step job: p = 0 at step 0.
  EXPECT_NEAR(LearningRate(c, 0, 1), 1e-3, 1e-10);
}

TEST(ClipScaleTest, MatchesTorchClipGradNorm) {
  // torch: coef = max_norm / (total_norm + 1e-6), clamped to 1.
  EXPECT_DOUBLE_EQ(ClipScale(1.0, 4.0), 1.0 / (4.0 + 1e-6));
  EXPECT_DOUBLE_EQ(ClipScale(1.0, 0.5), 1.0);
  EXPECT_DOUBLE_EQ(ClipScale(1.0, 1.0), 1.0 / (1.0 + 1e-6));
  EXPECT_DOUBLE_EQ(ClipScale(0.0, 100.0), 1.0);  // disabled
  EXPECT_DOUBLE_EQ(ClipScale(2.0, 0.0), 1.0);
}

TEST(OptimizerTest, StateBuffers) {
  EXPECT_EQ(OptimizerStateBuffers(ADAMW), 2);
  EXPECT_EQ(OptimizerStateBuffers(OPTIMIZER_UNSPECIFIED), 2);
  EXPECT_EQ(OptimizerStateBuffers(SGD), 1);
}

TEST(AdamWTest, TwoHandComputedSteps) {
  // lr 0.1, beta1 0.9, beta2 0.95, eps 1e-8, weight decay 0.1, grad scale
  // 0.5 (e.g. clipping), p0 = 1.
  AdamWHyper h;
  h.lr = 0.1;
  h.beta1 = 0.9;
  h.beta2 = 0.95;
  h.eps = 1e-8;
  h.weight_decay = 0.1;
  std::vector<float> p = {1.0f}, m = {0.0f}, v = {0.0f};

  // Step 0 (t = 1), g = 1.0 * 0.5 = 0.5:
  //   decay: p = 1 * (1 - 0.1 * 0.1) = 0.99
  //   m = 0.1 * 0.5 = 0.05;  v = 0.05 * 0.25 = 0.0125
  //   step_size = 0.1 / (1 - 0.9) = 1.0
  //   denom = sqrt(0.0125) / sqrt(1 - 0.95) + 1e-8 = 0.5 + 1e-8
  //   p = 0.99 - 1.0 * 0.05 / 0.5 = 0.89
  h.step = 0;
  std::vector<float> g = {1.0f};
  AdamWStep(h, 0.5f, g, absl::MakeSpan(p), absl::MakeSpan(m),
            absl::MakeSpan(v));
  EXPECT_NEAR(m[0], 0.05, 1e-7);
  EXPECT_NEAR(v[0], 0.0125, 1e-8);
  EXPECT_NEAR(p[0], 0.89, 1e-6);

  // Step 1 (t = 2), g = -2.0 * 0.5 = -1:
  //   decay: p = 0.89 * 0.99 = 0.8811
  //   m = 0.9 * 0.05 + 0.1 * -1 = -0.055
  //   v = 0.95 * 0.0125 + 0.05 * 1 = 0.061875
  //   step_size = 0.1 / (1 - 0.81) = 0.5263158
  //   denom = sqrt(0.061875) / sqrt(1 - 0.9025) = 0.7966275
  //   p = 0.8811 + 0.5263158 * 0.055 / 0.7966275 = 0.9174374
  h.step = 1;
  g = {-2.0f};
  AdamWStep(h, 0.5f, g, absl::MakeSpan(p), absl::MakeSpan(m),
            absl::MakeSpan(v));
  EXPECT_NEAR(m[0], -0.055, 1e-7);
  EXPECT_NEAR(v[0], 0.061875, 1e-7);
  EXPECT_NEAR(p[0], 0.9174374, 1e-6);
}

TEST(AdamWTest, NoWeightDecayFirstStepMovesByLr) {
  // Without decay the first step moves every element by lr * sign(g)
  // (m / sqrt(v) after bias correction is +-1), whatever |g|.
  AdamWHyper h;
  h.lr = 0.01;
  std::vector<float> p = {1.0f, -2.0f, 0.0f}, m(3, 0.0f), v(3, 0.0f);
  std::vector<float> g = {3.0f, -0.001f, 0.0f};
  AdamWStep(h, 1.0f, g, absl::MakeSpan(p), absl::MakeSpan(m),
            absl::MakeSpan(v));
  EXPECT_NEAR(p[0], 0.99, 1e-6);
  EXPECT_NEAR(p[1], -1.99, 1e-5);  // eps matters slightly for tiny g
  EXPECT_EQ(p[2], 0.0f);           // zero gradient: 0 / (0 + eps)
}

TEST(SgdTest, MomentumHandComputed) {
  // lr 0.1, momentum 0.9, no decay, p0 = 1.
  //   step 0: g = 1:  b = 1;              p = 1 - 0.1 * 1 = 0.9
  //   step 1: g = 2:  b = 0.9 * 1 + 2 = 2.9; p = 0.9 - 0.29 = 0.61
  SgdHyper h;
  h.lr = 0.1;
  h.momentum = 0.9;
  std::vector<float> p = {1.0f}, b = {0.0f};
  std::vector<float> g = {1.0f};
  SgdMomentumStep(h, 1.0f, g, absl::MakeSpan(p), absl::MakeSpan(b));
  EXPECT_NEAR(b[0], 1.0, 1e-7);
  EXPECT_NEAR(p[0], 0.9, 1e-7);
  g = {2.0f};
  SgdMomentumStep(h, 1.0f, g, absl::MakeSpan(p), absl::MakeSpan(b));
  EXPECT_NEAR(b[0], 2.9, 1e-6);
  EXPECT_NEAR(p[0], 0.61, 1e-6);
}

TEST(SgdTest, DecoupledWeightDecayAndScale) {
  // lr 0.1, wd 0.5, scale 0.25, g = 4 -> 1:
  //   p = 1 * (1 - 0.05) = 0.95;  b = 1;  p = 0.95 - 0.1 = 0.85
  SgdHyper h;
  h.lr = 0.1;
  h.momentum = 0.9;
  h.weight_decay = 0.5;
  std::vector<float> p = {1.0f}, b = {0.0f};
  std::vector<float> g = {4.0f};
  SgdMomentumStep(h, 0.25f, g, absl::MakeSpan(p), absl::MakeSpan(b));
  EXPECT_NEAR(p[0], 0.85, 1e-7);
}

// The scalar loops the vectorized AdamWStep and SgdMomentumStep replaced,
// as the formulas in optimizer.h state them (this test is built with
// -ffp-contract=off too, so neither side fuses a multiply-add).
void AdamWReference(const AdamWHyper& h, float grad_scale,
                    const std::vector<float>& grads, std::vector<float>& params,
                    std::vector<float>& m, std::vector<float>& v) {
  const double t = static_cast<double>(h.step + 1);
  const float decay = static_cast<float>(1.0 - h.lr * h.weight_decay);
  const float step_size =
      static_cast<float>(h.lr / (1.0 - std::pow(h.beta1, t)));
  const float bc2_sqrt =
      static_cast<float>(std::sqrt(1.0 - std::pow(h.beta2, t)));
  for (size_t i = 0; i < params.size(); ++i) {
    const float g = grads[i] * grad_scale;
    float p = params[i];
    if (h.weight_decay != 0) p *= decay;
    const float mi = static_cast<float>(h.beta1) * m[i] +
                     static_cast<float>(1.0 - h.beta1) * g;
    const float vi = static_cast<float>(h.beta2) * v[i] +
                     static_cast<float>(1.0 - h.beta2) * (g * g);
    m[i] = mi;
    v[i] = vi;
    const float denom =
        std::sqrt(vi) / bc2_sqrt + static_cast<float>(h.eps);
    params[i] = p - step_size * (mi / denom);
  }
}

void SgdReference(const SgdHyper& h, float grad_scale,
                  const std::vector<float>& grads, std::vector<float>& params,
                  std::vector<float>& b) {
  const float decay = static_cast<float>(1.0 - h.lr * h.weight_decay);
  for (size_t i = 0; i < params.size(); ++i) {
    const float g = grads[i] * grad_scale;
    float p = params[i];
    if (h.weight_decay != 0) p *= decay;
    b[i] = static_cast<float>(h.momentum) * b[i] + g;
    params[i] = p - static_cast<float>(h.lr) * b[i];
  }
}

std::vector<float> Random(size_t n, float scale, std::mt19937* rng) {
  std::normal_distribution<float> d(0.0f, scale);
  std::vector<float> v(n);
  for (float& x : v) x = d(*rng);
  return v;
}

void ExpectBitwiseEqual(const std::vector<float>& a,
                        const std::vector<float>& b, const char* what) {
  ASSERT_EQ(a.size(), b.size());
  for (size_t i = 0; i < a.size(); ++i) {
    uint32_t x, y;
    std::memcpy(&x, &a[i], 4);
    std::memcpy(&y, &b[i], 4);
    ASSERT_EQ(x, y) << what << "[" << i << "] of " << a.size() << ": "
                    << a[i] << " vs " << b[i];
  }
}

// Several steps on lengths around the vector width, with and without weight
// decay, gradients spanning many magnitudes (and exact zeros).
TEST(AdamWTest, BitwiseEqualToTheScalarLoop) {
  std::mt19937 rng(7);
  for (size_t n : {1, 7, 8, 9, 31, 1000, 4099}) {
    for (double wd : {0.0, 0.1}) {
      AdamWHyper h;
      h.lr = 3e-3;
      h.weight_decay = wd;
      std::vector<float> p = Random(n, 1.0f, &rng), m(n), v(n);
      std::vector<float> rp = p, rm = m, rv = v;
      for (int step = 0; step < 4; ++step) {
        h.step = step;
        std::vector<float> g = Random(n, std::pow(10.0f, step - 2), &rng);
        g[n / 2] = 0.0f;
        AdamWStep(h, 0.75f, g, absl::MakeSpan(p), absl::MakeSpan(m),
                  absl::MakeSpan(v));
        AdamWReference(h, 0.75f, g, rp, rm, rv);
      }
      ExpectBitwiseEqual(p, rp, "params");
      ExpectBitwiseEqual(m, rm, "m");
      ExpectBitwiseEqual(v, rv, "v");
    }
  }
}

TEST(SgdTest, BitwiseEqualToTheScalarLoop) {
  std::mt19937 rng(11);
  for (size_t n : {1, 9, 1000, 4099}) {
    for (double wd : {0.0, 0.5}) {
      SgdHyper h;
      h.lr = 0.1;
      h.momentum = 0.9;
      h.weight_decay = wd;
      std::vector<float> p = Random(n, 1.0f, &rng), b(n);
      std::vector<float> rp = p, rb = b;
      for (int step = 0; step < 3; ++step) {
        std::vector<float> g = Random(n, 0.5f, &rng);
        SgdMomentumStep(h, 0.5f, g, absl::MakeSpan(p), absl::MakeSpan(b));
        SgdReference(h, 0.5f, g, rp, rb);
      }
      ExpectBitwiseEqual(p, rp, "params");
      ExpectBitwiseEqual(b, rb, "momentum");
    }
  }
}

// The shards' gradient norm: per chunk in blocks of kNormBlockElements,
// each block's squares summed in kNormLanes lanes (element i of the block
// to lane i % kNormLanes, in index order), the lanes added in order, the
// blocks' sums added in order; the same bits on one thread and on a pool
// of 3, and for one replica (no division).
TEST(ShardMeanAndSumSquaresTest, BlocksInOrderWhateverTheThreads) {
  std::mt19937 rng(3);
  const std::vector<size_t> sizes = {150000, 3, size_t{1} << 16, 0, 70001};
  std::vector<std::vector<float>> grads;
  for (size_t n : sizes) grads.push_back(Random(n, 3.0f, &rng));
  // The reference, written out.
  std::vector<std::vector<float>> ref = grads;
  double want = 0;
  for (std::vector<float>& g : ref) {
    for (size_t b = 0; b < g.size(); b += kNormBlockElements) {
      double lane[kNormLanes] = {};
      for (size_t i = b; i < std::min(g.size(), b + kNormBlockElements); ++i) {
        g[i] /= 3.0f;
        lane[(i - b) % kNormLanes] += static_cast<double>(g[i]) * g[i];
      }
      double block = 0;
      for (double l : lane) block += l;
      want += block;
    }
  }
  ThreadPool pool(3);
  for (ThreadPool* p : {static_cast<ThreadPool*>(nullptr), &pool}) {
    std::vector<std::vector<float>> g = grads;
    std::vector<absl::Span<float>> chunks;
    for (std::vector<float>& c : g) chunks.push_back(absl::MakeSpan(c));
    EXPECT_EQ(ShardMeanAndSumSquares(3.0f, chunks, p), want);  // bitwise
    for (size_t c = 0; c < g.size(); ++c) ExpectBitwiseEqual(g[c], ref[c], "g");
  }
  EXPECT_EQ(ShardMeanAndSumSquares(2.0f, {}, nullptr), 0.0);
  // One replica: the gradient is left as it is; the sum is the lanes'.
  std::vector<float> one = grads[0];
  double one_want = 0;
  for (size_t b = 0; b < one.size(); b += kNormBlockElements) {
    double lane[kNormLanes] = {};
    for (size_t i = b; i < std::min(one.size(), b + kNormBlockElements); ++i) {
      lane[(i - b) % kNormLanes] += static_cast<double>(one[i]) * one[i];
    }
    double block = 0;
    for (double l : lane) block += l;
    one_want += block;
  }
  std::vector<absl::Span<float>> single = {absl::MakeSpan(one)};
  EXPECT_EQ(ShardMeanAndSumSquares(1.0f, single, &pool), one_want);
  ExpectBitwiseEqual(one, grads[0], "one replica");
}

}  // namespace
}  // namespace lmps
