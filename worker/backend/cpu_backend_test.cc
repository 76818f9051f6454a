// CpuBackend vs ReferenceBackend, layer by layer, forward and backward, on
// random shapes including odd sizes and sizes that are not multiples of the
// SIMD width, for several thread counts.
//
// Tolerance: max-norm relative error (test_util.h AllClose) <= kRtol = 2e-5.
// The fast kernels work in fp32 (sgemm blocking, SIMD reductions, Cephes
// exp with ~2 ulp error) and the reference accumulates in double, so they
// differ by a few ulp times the reduction length's square root: ~1e-6 for
// the sizes here. A real bug (a wrong index, a missing term, overwrite
// instead of accumulate) gives errors of order 1.
//
// Backward tests pre-fill every gradient with random values so they also
// check that gradients are accumulated (+=), not overwritten.
#include <memory>
#include <vector>

#include "absl/strings/match.h"
#include "gtest/gtest.h"
#include "worker/backend/cpu_backend.h"
#include "worker/backend/cpu_reference.h"
#include "worker/backend/test_util.h"

namespace lmps {
namespace {

using ::lmps::testing::AllClose;
using ::lmps::testing::RandomTokens;
using ::lmps::testing::RandomVector;

constexpr double kRtol = 2e-5;

struct Shape {
  int B, T, C, NH;
};

// Odd, prime and SIMD-unfriendly sizes, plus a realistic one.
const Shape kShapes[] = {
    {1, 1, 4, 1}, {2, 5, 6, 2}, {3, 7, 15, 3}, {2, 17, 24, 4},
    {1, 33, 40, 5}, {4, 64, 64, 4},
};

class CpuVsReferenceTest : public ::testing::TestWithParam<int> {
 protected:
  void SetUp() override {
    auto cpu = CpuBackend::Create({.num_threads = GetParam()});
    ASSERT_TRUE(cpu.ok()) << cpu.status();
    cpu_ = std::move(*cpu);
    auto ref = ReferenceBackend::Create();
    ASSERT_TRUE(ref.ok()) << ref.status();
    ref_ = std::move(*ref);
  }

  std::unique_ptr<CpuBackend> cpu_;
  std::unique_ptr<ReferenceBackend> ref_;
};

TEST_P(CpuVsReferenceTest, Encoder) {
  for (const Shape& s : kShapes) {
    SCOPED_TRACE(::testing::Message() << "B=" << s.B << " T=" << s.T
                                      << " C=" << s.C);
    const int V = 11, N = s.B * s.T;
    // Few distinct tokens so that many positions share a row of dwte.
    const std::vector<int32_t> tok = RandomTokens(1, N, V);
    const std::vector<float> wte = RandomVector(2, V * s.C);
    const std::vector<float> wpe = RandomVector(3, (s.T + 2) * s.C);
    std::vector<float> out_c(N * s.C), out_r(N * s.C);
    cpu_->EncoderForward(out_c.data(), tok.data(), wte.data(), wpe.data(), s.B,
                         s.T, s.C);
    ref_->EncoderForward(out_r.data(), tok.data(), wte.data(), wpe.data(), s.B,
                         s.T, s.C);
    EXPECT_TRUE(AllClose(out_c, out_r, kRtol));

    const std::vector<float> dout = RandomVector(4, N * s.C);
    std::vector<float> dwte_c = RandomVector(5, V * s.C), dwte_r = dwte_c;
    std::vector<float> dwpe_c = RandomVector(6, (s.T + 2) * s.C),
                       dwpe_r = dwpe_c;
    cpu_->EncoderBackward(dwte_c.data(), dwpe_c.data(), dout.data(), tok.data(),
                          s.B, s.T, s.C);
    ref_->EncoderBackward(dwte_r.data(), dwpe_r.data(), dout.data(), tok.data(),
                          s.B, s.T, s.C);
    EXPECT_TRUE(AllClose(dwte_c, dwte_r, kRtol)) << "dwte";
    EXPECT_TRUE(AllClose(dwpe_c, dwpe_r, kRtol)) << "dwpe";
  }
}

TEST_P(CpuVsReferenceTest, LayerNorm) {
  for (const Shape& s : kShapes) {
    const int N = s.B * s.T, C = s.C;
    SCOPED_TRACE(::testing::Message() << "N=" << N << " C=" << C);
    // An offset mean checks the variance is computed stably.
    const std::vector<float> inp = RandomVector(7, N * C, 2.0f, 5.0f);
    const std::vector<float> w = RandomVector(8, C, 0.5f, 1.5f);
    const std::vector<float> b = RandomVector(9, C);
    std::vector<float> out_c(N * C), out_r(N * C), mean_c(N), mean_r(N),
        rstd_c(N), rstd_r(N);
    cpu_->LayerNormForward(out_c.data(), mean_c.data(), rstd_c.data(),
                           inp.data(), w.data(), b.data(), N, C);
    ref_->LayerNormForward(out_r.data(), mean_r.data(), rstd_r.data(),
                           inp.data(), w.data(), b.data(), N, C);
    EXPECT_TRUE(AllClose(out_c, out_r, kRtol)) << "out";
    EXPECT_TRUE(AllClose(mean_c, mean_r, kRtol)) << "mean";
    EXPECT_TRUE(AllClose(rstd_c, rstd_r, kRtol)) << "rstd";

    const std::vector<float> dout = RandomVector(10, N * C);
    std::vector<float> dinp_c = RandomVector(11, N * C), dinp_r = dinp_c;
    std::vector<float> dw_c = RandomVector(12, C), dw_r = dw_c;
    std::vector<float> db_c = RandomVector(13, C), db_r = db_c;
    cpu_->LayerNormBackward(dinp_c.data(), dw_c.data(), db_c.data(),
                            dout.data(), inp.data(), w.data(), mean_r.data(),
                            rstd_r.data(), N, C);
    ref_->LayerNormBackward(dinp_r.data(), dw_r.data(), db_r.data(),
                            dout.data(), inp.data(), w.data(), mean_r.data(),
                            rstd_r.data(), N, C);
    EXPECT_TRUE(AllClose(dinp_c, dinp_r, kRtol)) << "dinp";
    EXPECT_TRUE(AllClose(dw_c, dw_r, kRtol)) << "dweight";
    EXPECT_TRUE(AllClose(db_c, db_r, kRtol)) << "dbias";
  }
}

TEST_P(CpuVsReferenceTest, Matmul) {
  struct MShape {
    int N, C, OC;
  };
  // The larger shapes are split into several sgemm tasks, by rows of the
  // output (N >= OC) or by columns (N < OC).
  const MShape shapes[] = {{1, 1, 1},      {7, 3, 5},      {37, 19, 53},
                           {64, 96, 128},  {130, 64, 257}, {300, 96, 200},
                           {100, 80, 333}};
  for (const MShape& s : shapes) {
    for (bool with_bias : {true, false}) {
      SCOPED_TRACE(::testing::Message() << "N=" << s.N << " C=" << s.C
                                        << " OC=" << s.OC
                                        << " bias=" << with_bias);
      const std::vector<float> inp = RandomVector(14, s.N * s.C);
      const std::vector<float> w = RandomVector(15, s.OC * s.C);
      const std::vector<float> b = RandomVector(16, s.OC);
      const float* bias = with_bias ? b.data() : nullptr;
      std::vector<float> out_c(s.N * s.OC, 7.0f), out_r(s.N * s.OC);
      cpu_->MatmulForward(out_c.data(), inp.data(), w.data(), bias, s.N, s.C,
                          s.OC);
      ref_->MatmulForward(out_r.data(), inp.data(), w.data(), bias, s.N, s.C,
                          s.OC);
      EXPECT_TRUE(AllClose(out_c, out_r, kRtol)) << "out";

      const std::vector<float> dout = RandomVector(17, s.N * s.OC);
      std::vector<float> dinp_c = RandomVector(18, s.N * s.C), dinp_r = dinp_c;
      std::vector<float> dw_c = RandomVector(19, s.OC * s.C), dw_r = dw_c;
      std::vector<float> db_c = RandomVector(20, s.OC), db_r = db_c;
      float* dbias_c = with_bias ? db_c.data() : nullptr;
      float* dbias_r = with_bias ? db_r.data() : nullptr;
      cpu_->MatmulBackward(dinp_c.data(), dw_c.data(), dbias_c, dout.data(),
                           inp.data(), w.data(), s.N, s.C, s.OC);
      ref_->MatmulBackward(dinp_r.data(), dw_r.data(), dbias_r, dout.data(),
                           inp.data(), w.data(), s.N, s.C, s.OC);
      EXPECT_TRUE(AllClose(dinp_c, dinp_r, kRtol)) << "dinp";
      EXPECT_TRUE(AllClose(dw_c, dw_r, kRtol)) << "dweight";
      EXPECT_TRUE(AllClose(db_c, db_r, kRtol)) << "dbias";
    }
  }
}

TEST_P(CpuVsReferenceTest, Attention) {
  for (const Shape& s : kShapes) {
    SCOPED_TRACE(::testing::Message() << "B=" << s.B << " T=" << s.T
                                      << " C=" << s.C << " NH=" << s.NH);
    const int N = s.B * s.T, C = s.C;
    const size_t att_n = static_cast<size_t>(s.B) * s.NH * s.T * s.T;
    // Scores of order several units: a peaked softmax, as in training.
    const std::vector<float> qkv = RandomVector(21, N * 3 * C, -2.0f, 2.0f);
    std::vector<float> out_c(N * C), out_r(N * C);
    std::vector<float> att_c(att_n, 9.0f), att_r(att_n);
    cpu_->AttentionForward(out_c.data(), att_c.data(), qkv.data(), s.B, s.T, C,
                           s.NH);
    ref_->AttentionForward(out_r.data(), att_r.data(), qkv.data(), s.B, s.T, C,
                           s.NH);
    EXPECT_TRUE(AllClose(out_c, out_r, kRtol)) << "out";
    EXPECT_TRUE(AllClose(att_c, att_r, kRtol)) << "att";

    const std::vector<float> dout = RandomVector(22, N * C);
    std::vector<float> dqkv_c = RandomVector(23, N * 3 * C), dqkv_r = dqkv_c;
    std::vector<float> scratch_c(att_n, 5.0f), scratch_r(att_n);
    cpu_->AttentionBackward(dqkv_c.data(), scratch_c.data(), dout.data(),
                            qkv.data(), att_r.data(), s.B, s.T, C, s.NH);
    ref_->AttentionBackward(dqkv_r.data(), scratch_r.data(), dout.data(),
                            qkv.data(), att_r.data(), s.B, s.T, C, s.NH);
    EXPECT_TRUE(AllClose(dqkv_c, dqkv_r, kRtol)) << "dqkv";
  }
}

TEST_P(CpuVsReferenceTest, Gelu) {
  for (size_t n : {1, 7, 8, 9, 100, 4099, 70001}) {
    SCOPED_TRACE(::testing::Message() << "N=" << n);
    // Wide range: saturated tails on both sides.
    const std::vector<float> inp = RandomVector(24, n, -12.0f, 12.0f);
    std::vector<float> out_c(n), out_r(n);
    cpu_->GeluForward(out_c.data(), inp.data(), n);
    ref_->GeluForward(out_r.data(), inp.data(), n);
    EXPECT_TRUE(AllClose(out_c, out_r, kRtol)) << "out";
    // Near zero, where relative accuracy matters most.
    const std::vector<float> small = RandomVector(25, n, -0.5f, 0.5f);
    cpu_->GeluForward(out_c.data(), small.data(), n);
    ref_->GeluForward(out_r.data(), small.data(), n);
    EXPECT_TRUE(AllClose(out_c, out_r, kRtol)) << "out near 0";

    const std::vector<float> dout = RandomVector(26, n);
    std::vector<float> dinp_c = RandomVector(27, n), dinp_r = dinp_c;
    cpu_->GeluBackward(dinp_c.data(), inp.data(), dout.data(), n);
    ref_->GeluBackward(dinp_r.data(), inp.data(), dout.data(), n);
    EXPECT_TRUE(AllClose(dinp_c, dinp_r, kRtol)) << "dinp";
  }
}

TEST_P(CpuVsReferenceTest, Residual) {
  for (size_t n : {1, 9, 70001}) {
    const std::vector<float> a = RandomVector(28, n), b = RandomVector(29, n);
    std::vector<float> out_c(n), out_r(n);
    cpu_->ResidualForward(out_c.data(), a.data(), b.data(), n);
    ref_->ResidualForward(out_r.data(), a.data(), b.data(), n);
    EXPECT_TRUE(AllClose(out_c, out_r, kRtol));
    // In place, as documented.
    std::vector<float> inplace = a;
    cpu_->ResidualForward(inplace.data(), inplace.data(), b.data(), n);
    EXPECT_TRUE(AllClose(inplace, out_r, kRtol));

    const std::vector<float> dout = RandomVector(30, n);
    std::vector<float> d1_c = RandomVector(31, n), d1_r = d1_c;
    std::vector<float> d2_c = RandomVector(32, n), d2_r = d2_c;
    cpu_->ResidualBackward(d1_c.data(), d2_c.data(), dout.data(), n);
    ref_->ResidualBackward(d1_r.data(), d2_r.data(), dout.data(), n);
    EXPECT_TRUE(AllClose(d1_c, d1_r, kRtol));
    EXPECT_TRUE(AllClose(d2_c, d2_r, kRtol));
  }
}

TEST_P(CpuVsReferenceTest, CrossEntropy) {
  struct CShape {
    int N, V;
  };
  for (const CShape& s : {CShape{1, 1}, CShape{3, 7}, CShape{37, 256},
                          CShape{20, 1001}}) {
    SCOPED_TRACE(::testing::Message() << "N=" << s.N << " V=" << s.V);
    const std::vector<float> logits = RandomVector(33, s.N * s.V, -8.0f, 8.0f);
    const std::vector<int32_t> targets = RandomTokens(34, s.N, s.V);
    std::vector<float> loss_c(s.N), loss_r(s.N), probs_c(s.N * s.V),
        probs_r(s.N * s.V);
    cpu_->CrossEntropyForward(loss_c.data(), probs_c.data(), logits.data(),
                              targets.data(), s.N, s.V);
    ref_->CrossEntropyForward(loss_r.data(), probs_r.data(), logits.data(),
                              targets.data(), s.N, s.V);
    EXPECT_TRUE(AllClose(loss_c, loss_r, kRtol)) << "losses";
    EXPECT_TRUE(AllClose(probs_c, probs_r, kRtol)) << "probs";

    std::vector<float> d_c = RandomVector(35, s.N * s.V), d_r = d_c;
    cpu_->CrossEntropyBackward(d_c.data(), probs_r.data(), targets.data(),
                               0.37f, s.N, s.V);
    ref_->CrossEntropyBackward(d_r.data(), probs_r.data(), targets.data(),
                               0.37f, s.N, s.V);
    EXPECT_TRUE(AllClose(d_c, d_r, kRtol)) << "dlogits";
  }
}

TEST_P(CpuVsReferenceTest, ZeroAndAxpy) {
  for (size_t n : {0, 1, 9, 300001}) {
    std::vector<float> y = RandomVector(36, n), x = RandomVector(37, n);
    std::vector<float> expected(n);
    for (size_t i = 0; i < n; ++i) expected[i] = y[i] - 0.5f * x[i];
    cpu_->Axpy(y.data(), -0.5f, x.data(), n);
    EXPECT_TRUE(AllClose(y, expected, kRtol));
    cpu_->Zero(y.data(), n);
    EXPECT_TRUE(AllClose(y, std::vector<float>(n, 0.0f), 0.0));
  }
}

INSTANTIATE_TEST_SUITE_P(Threads, CpuVsReferenceTest,
                         ::testing::Values(1, 2, 3),
                         [](const ::testing::TestParamInfo<int>& info) {
                           return "threads" + std::to_string(info.param);
                         });

TEST(CpuBackendTest, RejectsNegativeThreads) {
  EXPECT_EQ(CpuBackend::Create({.num_threads = -1}).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(CpuBackendTest, MemoryRoundTrip) {
  auto cpu = CpuBackend::Create({.num_threads = 2});
  ASSERT_TRUE(cpu.ok());
  auto buf = (*cpu)->Alloc(1000);
  ASSERT_TRUE(buf.ok());
  for (int i = 0; i < 1000; ++i) ASSERT_EQ((*buf)[i], 0.0f) << "zero-filled";
  const std::vector<float> src = RandomVector(38, 1000);
  ASSERT_TRUE((*cpu)->CopyToBackend(*buf, src.data(), 1000).ok());
  std::vector<float> back(1000);
  ASSERT_TRUE((*cpu)->CopyToHost(back.data(), *buf, 1000).ok());
  EXPECT_EQ(back, src);
  EXPECT_TRUE((*cpu)->memory_is_host());
  // Logged by the worker: the threads and OpenBLAS's kernel family.
  EXPECT_TRUE(absl::StartsWith((*cpu)->notes(),
                               "2 threads, OpenBLAS kernels "))
      << (*cpu)->notes();
  (*cpu)->Free(*buf);
  auto empty = (*cpu)->Alloc(0);
  ASSERT_TRUE(empty.ok());
  EXPECT_NE(*empty, nullptr);
  (*cpu)->Free(*empty);
  auto ints = (*cpu)->AllocInt32(5);
  ASSERT_TRUE(ints.ok());
  const int32_t tok[5] = {1, 2, 3, 4, 5};
  ASSERT_TRUE((*cpu)->CopyToBackend(*ints, tok, 5).ok());
  EXPECT_EQ((*ints)[4], 5);
  (*cpu)->Free(*ints);
  EXPECT_TRUE((*cpu)->Synchronize().ok());
}

}  // namespace
}  // namespace lmps
