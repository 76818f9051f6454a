// Finite-difference checks of every layer's backward pass, on both the CPU
// backend and the reference backend.
//
// For a layer y = f(x, params) we take the scalar loss
//   L = sum_i y_i * r_i          (r fixed random weights, sum in double)
// so dL/dy = r; the analytic gradient is the layer's backward with dout = r
// accumulated into zeroed buffers, and the numeric one is the central
// difference (L(x + eps) - L(x - eps)) / (2 eps) in fp32 with eps = 1e-2
// (activations) or 5e-3 (LayerNorm, attention, which curve more).
//
// Tolerance: |numeric - analytic| <= kAtol + kRtol * max(|numeric|,
// |analytic|) with kAtol = 1e-3, kRtol = 1e-2. Error budget: fp32 rounding
// of L is ~1e-7 * sqrt(#outputs) ~ 1e-6, divided by 2 eps gives ~1e-4; the
// O(eps^2) truncation error is ~1e-4 for these smooth layers. A wrong
// gradient is off by O(|gradient|) ~ 0.1..1, far above the tolerance.
#include <cmath>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "worker/backend/backend.h"
#include "worker/backend/cpu_backend.h"
#include "worker/backend/cpu_reference.h"
#include "worker/backend/test_util.h"

namespace lmps {
namespace {

using ::lmps::testing::RandomTokens;
using ::lmps::testing::RandomVector;

constexpr double kAtol = 1e-3;
constexpr double kRtol = 1e-2;

double WeightedSum(const std::vector<float>& y, const std::vector<float>& r) {
  double s = 0.0;
  for (size_t i = 0; i < y.size(); ++i) s += double{y[i]} * r[i];
  return s;
}

// Compares analytic[i] with the central difference of loss() in (*x)[i],
// for every i (the tensors here are small).
void CheckGradient(const std::string& what, std::vector<float>* x,
                   const std::function<double()>& loss,
                   const std::vector<float>& analytic, float eps) {
  ASSERT_EQ(x->size(), analytic.size()) << what;
  int failures = 0;
  for (size_t i = 0; i < x->size() && failures < 5; ++i) {
    const float saved = (*x)[i];
    (*x)[i] = saved + eps;
    const double lp = loss();
    (*x)[i] = saved - eps;
    const double lm = loss();
    (*x)[i] = saved;
    const double numeric = (lp - lm) / (2.0 * eps);
    const double a = analytic[i];
    const double tol =
        kAtol + kRtol * std::max(std::fabs(numeric), std::fabs(a));
    if (!(std::fabs(numeric - a) <= tol)) {
      ADD_FAILURE() << what << "[" << i << "]: numeric " << numeric
                    << " vs analytic " << a;
      ++failures;
    }
  }
}

class GradCheckTest : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    if (GetParam() == "cpu") {
      auto b = CpuBackend::Create({.num_threads = 2});
      ASSERT_TRUE(b.ok()) << b.status();
      backend_ = std::move(*b);
    } else {
      auto b = ReferenceBackend::Create();
      ASSERT_TRUE(b.ok()) << b.status();
      backend_ = std::move(*b);
    }
  }

  // Host vectors are valid backend memory for both host backends.
  std::unique_ptr<Backend> backend_;
};

TEST_P(GradCheckTest, Encoder) {
  const int B = 2, T = 3, C = 5, V = 4;
  const std::vector<int32_t> tok = {0, 3, 3, 1, 0, 3};  // repeated tokens
  std::vector<float> wte = RandomVector(1, V * C), wpe = RandomVector(2, T * C);
  const std::vector<float> r = RandomVector(3, B * T * C);
  std::vector<float> out(B * T * C);
  auto loss = [&] {
    backend_->EncoderForward(out.data(), tok.data(), wte.data(), wpe.data(), B,
                             T, C);
    return WeightedSum(out, r);
  };
  std::vector<float> dwte(V * C, 0.0f), dwpe(T * C, 0.0f);
  backend_->EncoderBackward(dwte.data(), dwpe.data(), r.data(), tok.data(), B,
                            T, C);
  CheckGradient("wte", &wte, loss, dwte, 1e-2f);
  CheckGradient("wpe", &wpe, loss, dwpe, 1e-2f);
}

TEST_P(GradCheckTest, LayerNorm) {
  const int N = 4, C = 9;
  std::vector<float> inp = RandomVector(4, N * C, -2.0f, 2.0f);
  std::vector<float> w = RandomVector(5, C, 0.5f, 1.5f);
  std::vector<float> b = RandomVector(6, C);
  const std::vector<float> r = RandomVector(7, N * C);
  std::vector<float> out(N * C), mean(N), rstd(N);
  auto loss = [&] {
    backend_->LayerNormForward(out.data(), mean.data(), rstd.data(),
                               inp.data(), w.data(), b.data(), N, C);
    return WeightedSum(out, r);
  };
  loss();  // fills mean, rstd
  std::vector<float> dinp(N * C, 0.0f), dw(C, 0.0f), db(C, 0.0f);
  backend_->LayerNormBackward(dinp.data(), dw.data(), db.data(), r.data(),
                              inp.data(), w.data(), mean.data(), rstd.data(),
                              N, C);
  CheckGradient("inp", &inp, loss, dinp, 5e-3f);
  CheckGradient("weight", &w, loss, dw, 5e-3f);
  CheckGradient("bias", &b, loss, db, 5e-3f);
}

TEST_P(GradCheckTest, Matmul) {
  const int N = 5, C = 7, OC = 6;
  std::vector<float> inp = RandomVector(8, N * C), w = RandomVector(9, OC * C);
  std::vector<float> b = RandomVector(10, OC);
  const std::vector<float> r = RandomVector(11, N * OC);
  std::vector<float> out(N * OC);
  auto loss = [&] {
    backend_->MatmulForward(out.data(), inp.data(), w.data(), b.data(), N, C,
                            OC);
    return WeightedSum(out, r);
  };
  std::vector<float> dinp(N * C, 0.0f), dw(OC * C, 0.0f), db(OC, 0.0f);
  backend_->MatmulBackward(dinp.data(), dw.data(), db.data(), r.data(),
                           inp.data(), w.data(), N, C, OC);
  CheckGradient("inp", &inp, loss, dinp, 1e-2f);
  CheckGradient("weight", &w, loss, dw, 1e-2f);
  CheckGradient("bias", &b, loss, db, 1e-2f);
}

TEST_P(GradCheckTest, Attention) {
  const int B = 2, T = 5, C = 8, NH = 2;
  std::vector<float> qkv = RandomVector(12, B * T * 3 * C, -1.5f, 1.5f);
  const std::vector<float> r = RandomVector(13, B * T * C);
  std::vector<float> out(B * T * C), att(B * NH * T * T);
  auto loss = [&] {
    backend_->AttentionForward(out.data(), att.data(), qkv.data(), B, T, C,
                               NH);
    return WeightedSum(out, r);
  };
  loss();  // fills att
  std::vector<float> dqkv(qkv.size(), 0.0f), scratch(att.size());
  backend_->AttentionBackward(dqkv.data(), scratch.data(), r.data(),
                              qkv.data(), att.data(), B, T, C, NH);
  CheckGradient("qkv", &qkv, loss, dqkv, 5e-3f);
}

TEST_P(GradCheckTest, Gelu) {
  const size_t n = 61;
  std::vector<float> inp = RandomVector(14, n, -5.0f, 5.0f);
  const std::vector<float> r = RandomVector(15, n);
  std::vector<float> out(n);
  auto loss = [&] {
    backend_->GeluForward(out.data(), inp.data(), n);
    return WeightedSum(out, r);
  };
  std::vector<float> dinp(n, 0.0f);
  backend_->GeluBackward(dinp.data(), inp.data(), r.data(), n);
  CheckGradient("inp", &inp, loss, dinp, 1e-2f);
}

TEST_P(GradCheckTest, Residual) {
  const size_t n = 23;
  std::vector<float> a = RandomVector(16, n), b = RandomVector(17, n);
  const std::vector<float> r = RandomVector(18, n);
  std::vector<float> out(n);
  auto loss = [&] {
    backend_->ResidualForward(out.data(), a.data(), b.data(), n);
    return WeightedSum(out, r);
  };
  std::vector<float> da(n, 0.0f), db(n, 0.0f);
  backend_->ResidualBackward(da.data(), db.data(), r.data(), n);
  CheckGradient("inp1", &a, loss, da, 1e-2f);
  CheckGradient("inp2", &b, loss, db, 1e-2f);
}

TEST_P(GradCheckTest, CrossEntropy) {
  // The backward takes one dloss for all positions: L = dloss * sum(losses).
  const int N = 3, V = 11;
  const float dloss = 0.7f;
  std::vector<float> logits = RandomVector(19, N * V, -3.0f, 3.0f);
  const std::vector<int32_t> targets = RandomTokens(20, N, V);
  std::vector<float> losses(N), probs(N * V);
  auto loss = [&] {
    backend_->CrossEntropyForward(losses.data(), probs.data(), logits.data(),
                                  targets.data(), N, V);
    return WeightedSum(losses, std::vector<float>(N, dloss));
  };
  loss();  // fills probs
  std::vector<float> dlogits(N * V, 0.0f);
  backend_->CrossEntropyBackward(dlogits.data(), probs.data(), targets.data(),
                                 dloss, N, V);
  CheckGradient("logits", &logits, loss, dlogits, 1e-2f);
}

INSTANTIATE_TEST_SUITE_P(Backends, GradCheckTest,
                         ::testing::Values("cpu", "reference"),
                         [](const ::testing::TestParamInfo<std::string>& i) {
                           return i.param;
                         });

}  // namespace
}  // namespace lmps
