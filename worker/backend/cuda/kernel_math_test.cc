// The CUDA kernels' per-element math (kernel_math.h), compiled by g++ and
// run on the CPU, against the naive reference backend (cpu_reference.h).
//
// Where a kernel reduces across a warp, the host code below reproduces the
// kernel's order exactly (lane-strided partials combined by an xor
// butterfly), so these tests check the same float arithmetic the GPU does,
// up to the few-ulp differences of expf/tanhf/logf between libm and CUDA.
//
// The bf16 conversion of the matrix-product inputs is checked bit for bit
// against common/model/bf16.h, and its rounding error against the 2^-8 bound.
//
// Tolerance: max-norm relative error (test_util.h AllClose) <= 1e-5 for
// elementwise functions and 2e-5 for row reductions (LayerNorm, softmax,
// cross-entropy). fp32 against the reference's double differs by a few ulp
// times the square root of the reduction length (~1e-6 here); a wrong
// formula gives errors of order 1.
#include "worker/backend/cuda/kernel_math.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <vector>

#include "common/model/bf16.h"
#include "gtest/gtest.h"
#include "worker/backend/cpu_reference.h"
#include "worker/backend/test_util.h"

namespace lmps {
namespace {

using ::lmps::testing::AllClose;
using ::lmps::testing::RandomTokens;
using ::lmps::testing::RandomVector;
namespace km = ::lmps::cuda_math;

constexpr double kRtolElementwise = 1e-5;
constexpr double kRtolReduction = 2e-5;
constexpr int kWarp = 32;

// The kernels' WarpSum: lane l starts with partial[l]; after the xor
// butterfly every lane holds the same value, returned here.
float WarpSum(std::array<float, kWarp> v) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    std::array<float, kWarp> next;
    for (int l = 0; l < kWarp; ++l) next[l] = v[l] + v[l ^ offset];
    v = next;
  }
  return v[0];
}

km::SoftmaxState WarpSoftmax(std::array<km::SoftmaxState, kWarp> v) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    std::array<km::SoftmaxState, kWarp> next;
    for (int l = 0; l < kWarp; ++l) {
      next[l] = v[l];
      km::SoftmaxMerge(next[l], v[l ^ offset]);
    }
    v = next;
  }
  // Merge is symmetric: all lanes agree.
  for (int l = 1; l < kWarp; ++l) {
    EXPECT_EQ(v[l].max, v[0].max);
    EXPECT_EQ(v[l].sum, v[0].sum);
  }
  return v[0];
}

// The attention/LayerNorm kernels' row softmax state of x[0..n).
km::SoftmaxState WarpRowSoftmax(const float* x, int n) {
  std::array<km::SoftmaxState, kWarp> lanes;
  for (int l = 0; l < kWarp; ++l) {
    lanes[l] = km::SoftmaxEmpty();
    for (int j = l; j < n; j += kWarp) km::SoftmaxUpdate(lanes[l], x[j]);
  }
  return WarpSoftmax(lanes);
}

class KernelMathTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto ref = ReferenceBackend::Create();
    ASSERT_TRUE(ref.ok()) << ref.status();
    ref_ = std::move(*ref);
  }
  std::unique_ptr<ReferenceBackend> ref_;
};

TEST_F(KernelMathTest, Gelu) {
  // Covers the tails (tanh saturating) and the origin.
  std::vector<float> x = RandomVector(1, 4001, -8.0f, 8.0f);
  x.push_back(0.0f);
  x.push_back(-0.0f);
  x.push_back(1e-20f);
  const size_t n = x.size();
  std::vector<float> out(n), expected(n);
  for (size_t i = 0; i < n; ++i) out[i] = km::GeluForward(x[i]);
  ref_->GeluForward(expected.data(), x.data(), n);
  EXPECT_TRUE(AllClose(out, expected, kRtolElementwise));
  // Near the origin the max-norm scale is large; check small values too.
  for (size_t i = 0; i < n; ++i) {
    EXPECT_NEAR(out[i], expected[i], 1e-6 * (1.0 + std::fabs(expected[i])))
        << "x = " << x[i];
  }

  // Backward accumulates: start from random dinp.
  const std::vector<float> dout = RandomVector(2, n);
  std::vector<float> dinp = RandomVector(3, n), dinp_ref = dinp;
  for (size_t i = 0; i < n; ++i) dinp[i] += km::GeluGrad(x[i]) * dout[i];
  ref_->GeluBackward(dinp_ref.data(), x.data(), dout.data(), n);
  EXPECT_TRUE(AllClose(dinp, dinp_ref, kRtolElementwise));
}

TEST_F(KernelMathTest, GeluGradMatchesFiniteDifference) {
  for (float x = -5.0f; x <= 5.0f; x += 0.37f) {
    const double h = 1e-3;
    const double fd = (km::GeluForward(static_cast<float>(x + h)) -
                       km::GeluForward(static_cast<float>(x - h))) /
                      (2 * h);
    EXPECT_NEAR(km::GeluGrad(x), fd, 2e-3) << "x = " << x;
  }
}

// The LayerNorm kernels' algorithm, one row at a time on the host.
void LayerNormForwardHost(float* out, float* mean, float* rstd,
                          const float* inp, const float* w, const float* b,
                          int N, int C) {
  for (int n = 0; n < N; ++n) {
    const float* x = inp + static_cast<size_t>(n) * C;
    std::array<float, kWarp> part{};
    for (int l = 0; l < kWarp; ++l) {
      for (int i = l; i < C; i += kWarp) part[l] += x[i];
    }
    const float m = WarpSum(part) / C;
    part = {};
    for (int l = 0; l < kWarp; ++l) {
      for (int i = l; i < C; i += kWarp) part[l] += (x[i] - m) * (x[i] - m);
    }
    const float s = km::LayerNormRstd(WarpSum(part) / C);
    for (int i = 0; i < C; ++i) {
      out[static_cast<size_t>(n) * C + i] =
          km::LayerNormOut(x[i], m, s, w[i], b[i]);
    }
    mean[n] = m;
    rstd[n] = s;
  }
}

void LayerNormBackwardHost(float* dinp, float* dw, float* db, const float* dout,
                           const float* inp, const float* w, const float* mean,
                           const float* rstd, int N, int C) {
  std::vector<float> sum_w(C, 0.0f), sum_b(C, 0.0f);
  for (int n = 0; n < N; ++n) {
    const size_t base = static_cast<size_t>(n) * C;
    std::array<float, kWarp> p1{}, p2{};
    for (int l = 0; l < kWarp; ++l) {
      for (int i = l; i < C; i += kWarp) {
        const float norm = km::LayerNormNorm(inp[base + i], mean[n], rstd[n]);
        const float dnorm = w[i] * dout[base + i];
        p1[l] += dnorm;
        p2[l] += dnorm * norm;
      }
    }
    const float dnorm_mean = WarpSum(p1) / C;
    const float dnorm_norm_mean = WarpSum(p2) / C;
    for (int i = 0; i < C; ++i) {
      const float norm = km::LayerNormNorm(inp[base + i], mean[n], rstd[n]);
      const float dnorm = w[i] * dout[base + i];
      dinp[base + i] +=
          km::LayerNormDinp(dnorm, dnorm_mean, norm, dnorm_norm_mean, rstd[n]);
      sum_w[i] += norm * dout[base + i];
      sum_b[i] += dout[base + i];
    }
  }
  for (int i = 0; i < C; ++i) {
    dw[i] += sum_w[i];
    db[i] += sum_b[i];
  }
}

TEST_F(KernelMathTest, LayerNorm) {
  struct Shape {
    int N, C;
  };
  for (const Shape s :
       {Shape{1, 1}, Shape{3, 7}, Shape{5, 33}, Shape{16, 64}, Shape{7, 768}}) {
    const int N = s.N, C = s.C;
    SCOPED_TRACE(::testing::Message() << "N=" << N << " C=" << C);
    // An offset mean checks the two-pass variance.
    const std::vector<float> inp = RandomVector(4, N * C, 2.0f, 5.0f);
    const std::vector<float> w = RandomVector(5, C, 0.5f, 1.5f);
    const std::vector<float> b = RandomVector(6, C);
    std::vector<float> out(N * C), mean(N), rstd(N);
    std::vector<float> out_r(N * C), mean_r(N), rstd_r(N);
    LayerNormForwardHost(out.data(), mean.data(), rstd.data(), inp.data(),
                         w.data(), b.data(), N, C);
    ref_->LayerNormForward(out_r.data(), mean_r.data(), rstd_r.data(),
                           inp.data(), w.data(), b.data(), N, C);
    EXPECT_TRUE(AllClose(out, out_r, kRtolReduction)) << "out";
    EXPECT_TRUE(AllClose(mean, mean_r, kRtolReduction)) << "mean";
    EXPECT_TRUE(AllClose(rstd, rstd_r, kRtolReduction)) << "rstd";

    const std::vector<float> dout = RandomVector(7, N * C);
    std::vector<float> dinp = RandomVector(8, N * C), dinp_r = dinp;
    std::vector<float> dw = RandomVector(9, C), dw_r = dw;
    std::vector<float> db = RandomVector(10, C), db_r = db;
    LayerNormBackwardHost(dinp.data(), dw.data(), db.data(), dout.data(),
                          inp.data(), w.data(), mean_r.data(), rstd_r.data(), N,
                          C);
    ref_->LayerNormBackward(dinp_r.data(), dw_r.data(), db_r.data(),
                            dout.data(), inp.data(), w.data(), mean_r.data(),
                            rstd_r.data(), N, C);
    EXPECT_TRUE(AllClose(dinp, dinp_r, kRtolReduction)) << "dinp";
    EXPECT_TRUE(AllClose(dw, dw_r, kRtolReduction)) << "dweight";
    EXPECT_TRUE(AllClose(db, db_r, kRtolReduction)) << "dbias";
  }
}

TEST_F(KernelMathTest, LayerNormRstdIsExactForUnitVariance) {
  EXPECT_FLOAT_EQ(km::LayerNormRstd(1.0f - km::kLayerNormEps), 1.0f);
  EXPECT_FLOAT_EQ(km::LayerNormRstd(4.0f - km::kLayerNormEps), 0.5f);
}

TEST_F(KernelMathTest, SoftmaxStateEdgeCases) {
  km::SoftmaxState s = km::SoftmaxEmpty();
  km::SoftmaxMerge(s, km::SoftmaxEmpty());
  EXPECT_EQ(s.sum, 0.0f);
  EXPECT_EQ(s.max, -INFINITY);

  km::SoftmaxUpdate(s, 3.0f);
  EXPECT_EQ(s.max, 3.0f);
  EXPECT_EQ(s.sum, 1.0f);
  // Merging empty states in either order changes nothing.
  km::SoftmaxState e = km::SoftmaxEmpty();
  km::SoftmaxMerge(e, s);
  EXPECT_EQ(e.max, s.max);
  EXPECT_EQ(e.sum, s.sum);
  km::SoftmaxMerge(s, km::SoftmaxEmpty());
  EXPECT_EQ(s.max, 3.0f);
  EXPECT_EQ(s.sum, 1.0f);

  // Huge spreads do not overflow: exp is only taken of values <= 0.
  km::SoftmaxState big = km::SoftmaxEmpty();
  for (float x : {-1000.0f, 1000.0f, 999.0f, -1e30f}) km::SoftmaxUpdate(big, x);
  EXPECT_EQ(big.max, 1000.0f);
  EXPECT_NEAR(big.sum, 1.0 + std::exp(-1.0), 1e-6);
  EXPECT_FLOAT_EQ(km::SoftmaxProb(1000.0f, big),
                  static_cast<float>(1.0 / (1.0 + std::exp(-1.0))));
  EXPECT_EQ(km::SoftmaxProb(-1000.0f, big), 0.0f);
}

TEST_F(KernelMathTest, SoftmaxMergeIsSymmetricAndMatchesSequential) {
  const std::vector<float> x = RandomVector(11, 1000, -20.0f, 20.0f);
  // Sequential state of the whole row vs merge of two halves, both orders.
  km::SoftmaxState all = km::SoftmaxEmpty(), lo = km::SoftmaxEmpty(),
                   hi = km::SoftmaxEmpty();
  for (size_t i = 0; i < x.size(); ++i) {
    km::SoftmaxUpdate(all, x[i]);
    km::SoftmaxUpdate(i < 400 ? lo : hi, x[i]);
  }
  km::SoftmaxState a = lo, b = hi;
  km::SoftmaxMerge(a, hi);
  km::SoftmaxMerge(b, lo);
  EXPECT_EQ(a.max, b.max);
  EXPECT_EQ(a.sum, b.sum);
  EXPECT_EQ(a.max, all.max);
  EXPECT_NEAR(a.sum, all.sum, 1e-5 * all.sum);

  double maxval = -INFINITY, sum = 0.0;
  for (float v : x) maxval = std::max<double>(maxval, v);
  for (float v : x) sum += std::exp(v - maxval);
  EXPECT_NEAR(a.sum, sum, 1e-5 * sum);
}

// The cross-entropy kernels' math (per row: one block; here a warp-like
// split, which has the same merge structure) vs the reference.
TEST_F(KernelMathTest, CrossEntropy) {
  struct Shape {
    int N, V;
  };
  for (const Shape s :
       {Shape{1, 1}, Shape{3, 7}, Shape{8, 257}, Shape{2, 50257}}) {
    const int N = s.N, V = s.V;
    SCOPED_TRACE(::testing::Message() << "N=" << N << " V=" << V);
    const std::vector<float> logits = RandomVector(12, N * V, -10.0f, 10.0f);
    const std::vector<int32_t> targets = RandomTokens(13, N, V);
    std::vector<float> losses(N), probs(static_cast<size_t>(N) * V);
    std::vector<float> losses_r(N), probs_r(static_cast<size_t>(N) * V);
    for (int n = 0; n < N; ++n) {
      const float* x = logits.data() + static_cast<size_t>(n) * V;
      const km::SoftmaxState st = WarpRowSoftmax(x, V);
      for (int v = 0; v < V; ++v) {
        probs[static_cast<size_t>(n) * V + v] = km::SoftmaxProb(x[v], st);
      }
      losses[n] = km::CrossEntropyLoss(st, x[targets[n]]);
    }
    ref_->CrossEntropyForward(losses_r.data(), probs_r.data(), logits.data(),
                              targets.data(), N, V);
    EXPECT_TRUE(AllClose(losses, losses_r, kRtolReduction)) << "losses";
    EXPECT_TRUE(AllClose(probs, probs_r, kRtolReduction)) << "probs";

    const float dloss = 1.0f / N;
    std::vector<float> dlogits = RandomVector(14, N * V), dlogits_r = dlogits;
    for (int n = 0; n < N; ++n) {
      for (int v = 0; v < V; ++v) {
        const size_t i = static_cast<size_t>(n) * V + v;
        dlogits[i] += km::CrossEntropyGrad(probs_r[i], v == targets[n], dloss);
      }
    }
    ref_->CrossEntropyBackward(dlogits_r.data(), probs_r.data(), targets.data(),
                               dloss, N, V);
    EXPECT_TRUE(AllClose(dlogits, dlogits_r, kRtolElementwise)) << "dlogits";
  }
}

TEST_F(KernelMathTest, CrossEntropyLossOfUnderflowingTarget) {
  // The target's probability underflows to 0 in fp32; the log-sum-exp form
  // still gives the exact loss (the difference of logits).
  const float x[2] = {0.0f, 200.0f};
  km::SoftmaxState s = km::SoftmaxEmpty();
  for (float v : x) km::SoftmaxUpdate(s, v);
  EXPECT_EQ(km::SoftmaxProb(x[0], s), 0.0f);
  EXPECT_FLOAT_EQ(km::CrossEntropyLoss(s, x[0]), 200.0f);
  EXPECT_FLOAT_EQ(km::CrossEntropyLoss(s, x[1]), 0.0f);
}

// The attention softmax kernels' row math (causal, scaled scores already
// in the row) vs a double-precision computation.
TEST_F(KernelMathTest, AttentionSoftmaxRows) {
  const int T = 77;
  const float scale = 0.125f;
  const std::vector<float> scores = RandomVector(15, T * T, -6.0f, 6.0f);
  const std::vector<float> datt = RandomVector(16, T * T);
  std::vector<float> att(T * T), att_r(T * T), d(T * T), d_r(T * T);
  for (int t = 0; t < T; ++t) {
    const float* x = scores.data() + t * T;
    const km::SoftmaxState st = WarpRowSoftmax(x, t + 1);
    for (int j = 0; j < T; ++j) {
      att[t * T + j] = j <= t ? km::SoftmaxProb(x[j], st) : 0.0f;
    }
    // Reference, in double.
    double maxval = -INFINITY, sum = 0.0;
    for (int j = 0; j <= t; ++j) maxval = std::max<double>(maxval, x[j]);
    for (int j = 0; j <= t; ++j) sum += std::exp(x[j] - maxval);
    for (int j = 0; j < T; ++j) {
      att_r[t * T + j] =
          j <= t ? static_cast<float>(std::exp(x[j] - maxval) / sum) : 0.0f;
    }
  }
  EXPECT_TRUE(AllClose(att, att_r, kRtolReduction)) << "att";

  for (int t = 0; t < T; ++t) {
    const float* a = att_r.data() + t * T;
    const float* g = datt.data() + t * T;
    std::array<float, kWarp> part{};
    for (int l = 0; l < kWarp; ++l) {
      for (int j = l; j <= t; j += kWarp) part[l] += a[j] * g[j];
    }
    const float dot = WarpSum(part);
    double dot_r = 0.0;
    for (int j = 0; j <= t; ++j) dot_r += static_cast<double>(a[j]) * g[j];
    for (int j = 0; j < T; ++j) {
      d[t * T + j] = j <= t ? km::SoftmaxBackward(a[j], g[j], dot, scale) : 0;
      d_r[t * T + j] =
          j <= t ? static_cast<float>(a[j] * (g[j] - dot_r) * scale) : 0.0f;
    }
  }
  EXPECT_TRUE(AllClose(d, d_r, kRtolReduction)) << "dpreatt";
}

// ---------------------------------------------------------------------------
// bf16 conversion (the kBf16 matrix products' inputs).
// ---------------------------------------------------------------------------

float FromBits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

TEST(Bf16Test, MatchesCommonBf16BitForBit) {
  // Every 16-bit prefix with the low halves at and around the rounding
  // boundary (0x8000 is the tie), plus a stride through all 2^32 patterns
  // (NaNs, infinities, subnormals and zeros included).
  const uint32_t lows[] = {0x0000u, 0x0001u, 0x7fffu, 0x8000u,
                           0x8001u, 0xbeefu, 0xffffu};
  int64_t checked = 0;
  for (uint32_t hi = 0; hi <= 0xffffu; ++hi) {
    for (uint32_t lo : lows) {
      const float f = FromBits((hi << 16) | lo);
      ASSERT_EQ(km::FloatToBf16Bits(f), FloatToBf16Bits(f))
          << std::hex << "bits 0x" << ((hi << 16) | lo);
      ++checked;
    }
  }
  for (uint64_t u = 0; u <= 0xffffffffull; u += 0x10101ull) {
    const float f = FromBits(static_cast<uint32_t>(u));
    ASSERT_EQ(km::FloatToBf16Bits(f), FloatToBf16Bits(f))
        << std::hex << "bits 0x" << u;
    ++checked;
  }
  EXPECT_GT(checked, 500000);
  for (uint32_t b = 0; b <= 0xffffu; ++b) {
    const float x = km::Bf16BitsToFloat(static_cast<uint16_t>(b));
    const float y = Bf16BitsToFloat(static_cast<uint16_t>(b));
    ASSERT_EQ(std::memcmp(&x, &y, sizeof(x)), 0) << std::hex << b;
    // Exactly representable: converts back to itself (NaN stays NaN).
    if (!std::isnan(x)) {
      ASSERT_EQ(km::FloatToBf16Bits(x), b) << std::hex << b;
    } else {
      ASSERT_TRUE(std::isnan(km::Bf16BitsToFloat(km::FloatToBf16Bits(x))));
    }
  }
}

TEST(Bf16Test, RoundsToNearestEven) {
  auto round_trip = [](float f) {
    return km::Bf16BitsToFloat(km::FloatToBf16Bits(f));
  };
  // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties to the even 1.
  EXPECT_EQ(round_trip(1.0f + 0x1p-8f), 1.0f);
  // 1 + 3 * 2^-8 is halfway between 1 + 2^-7 and 1 + 2^-6: to 1 + 2^-6.
  EXPECT_EQ(round_trip(1.0f + 3 * 0x1p-8f), 1.0f + 0x1p-6f);
  EXPECT_EQ(round_trip(1.0f + 0x1p-8f + 0x1p-20f), 1.0f + 0x1p-7f);
  EXPECT_EQ(round_trip(-1.0f - 0x1p-8f - 0x1p-20f), -1.0f - 0x1p-7f);
  EXPECT_EQ(round_trip(0.0f), 0.0f);
  EXPECT_TRUE(std::signbit(round_trip(-0.0f)));
  const float inf = std::numeric_limits<float>::infinity();
  EXPECT_EQ(round_trip(inf), inf);
  EXPECT_EQ(round_trip(-inf), -inf);
  EXPECT_EQ(round_trip(std::numeric_limits<float>::max()), inf);
  EXPECT_TRUE(std::isnan(round_trip(std::numeric_limits<float>::quiet_NaN())));
  // A signalling NaN must not become infinity.
  EXPECT_TRUE(std::isnan(round_trip(FromBits(0x7f800001u))));
}

TEST(Bf16Test, RelativeErrorIsAtMostTwoToTheMinusEight) {
  const std::vector<float> x = RandomVector(50, 100000, -1e4f, 1e4f);
  double worst = 0.0;
  for (float f : x) {
    if (f == 0.0f) continue;
    const double r = km::Bf16BitsToFloat(km::FloatToBf16Bits(f));
    worst = std::max(worst, std::fabs(r - f) / std::fabs(f));
  }
  // Unit roundoff of an 8-bit significand (7 stored + the implicit bit).
  EXPECT_LE(worst, std::ldexp(1.0, -8));
  EXPECT_GT(worst, std::ldexp(1.0, -9));  // and not a wider format
}

}  // namespace
}  // namespace lmps
