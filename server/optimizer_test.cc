#include "server/optimizer.h"

#include <cmath>
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

}  // namespace
}  // namespace lmps
