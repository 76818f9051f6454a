// The CUDA backend's GEMM plans (gemm_plan.h), run by a bounds-checked host
// implementation of the column-major strided batched GEMM that cuBLAS
// computes, composed exactly as cuda_backend_layers.cu composes them (with the
// kernels' softmax math from kernel_math.h), against the reference backend.
// This checks every transpose, leading dimension, stride and pointer offset
// of the matrix products on a machine without a GPU, and that no plan
// reads or writes outside its buffers.
//
// Tolerance: max-norm relative error <= 2e-5 (the host GEMM accumulates in
// double like the reference; the rest is fp32 rounding). On the GPU the
// same plans run in TF32 (cuda_backend_test bounds that at 1e-2) or on bf16
// operands (MatmulPrecision::kBf16). The tests also run every plan on
// operands rounded to bf16 by kernel_math.h's converter, with exact
// accumulation, against the per-element bound that cuda_backend_test uses
// for kBf16 (test_util.h Bf16ProductClose: |a - b| <= 2^-6 |b| + 2^-5
// Rms(b)), so that tolerance is measured here on the CPU, leaving the GPU
// only its fp32 accumulation order to add.
#include "worker/backend/cuda/gemm_plan.h"

#include <cmath>
#include <cstdint>
#include <memory>
#include <vector>

#include "gtest/gtest.h"
#include "worker/backend/cpu_reference.h"
#include "worker/backend/cuda/kernel_math.h"
#include "worker/backend/test_util.h"

namespace lmps {
namespace {

using ::lmps::cuda_gemm::GemmPlan;
using ::lmps::testing::AllClose;
using ::lmps::testing::Bf16ProductClose;
using ::lmps::testing::RandomVector;
namespace km = ::lmps::cuda_math;

constexpr double kRtol = 2e-5;

// x as the kBf16 products see it.
double Operand(float x, bool bf16) {
  return bf16 ? km::Bf16BitsToFloat(km::FloatToBf16Bits(x)) : x;
}

// A host buffer a plan may touch.
struct Span {
  const float* data;
  size_t size;
};

// Element (row, col) of a column-major matrix at `base` with leading
// dimension ld, checked against the buffer.
int64_t Index(const float* base, int64_t row, int64_t col, int64_t ld,
              const Span& buf, const char* what) {
  const int64_t i = (base - buf.data) + col * ld + row;
  EXPECT_GE(i, 0) << what << " below its buffer";
  EXPECT_LT(i, static_cast<int64_t>(buf.size)) << what << " past its buffer";
  return i;
}

// C_i = alpha op(A_i) op(B_i) + beta C_i, accumulating in double; with
// bf16, A and B are read rounded to bf16 (as MatmulPrecision::kBf16).
void RunPlan(const GemmPlan& p, Span a_buf, Span b_buf, std::vector<float>* c,
             bool bf16 = false) {
  const Span c_buf{c->data(), c->size()};
  ASSERT_GE(p.lda, p.trans_a ? p.k : p.m);
  ASSERT_GE(p.ldb, p.trans_b ? p.n : p.k);
  ASSERT_GE(p.ldc, p.m);
  for (int i = 0; i < p.batch; ++i) {
    const float* a = p.a + i * p.stride_a;
    const float* b = p.b + i * p.stride_b;
    const float* cc = p.c + i * p.stride_c;
    for (int col = 0; col < p.n; ++col) {
      for (int row = 0; row < p.m; ++row) {
        double acc = 0.0;
        for (int l = 0; l < p.k; ++l) {
          const int64_t ia = p.trans_a ? Index(a, l, row, p.lda, a_buf, "A")
                                       : Index(a, row, l, p.lda, a_buf, "A");
          const int64_t ib = p.trans_b ? Index(b, col, l, p.ldb, b_buf, "B")
                                       : Index(b, l, col, p.ldb, b_buf, "B");
          if (::testing::Test::HasFailure()) return;
          acc += Operand(a_buf.data[ia], bf16) * Operand(b_buf.data[ib], bf16);
        }
        const int64_t ic = Index(cc, row, col, p.ldc, c_buf, "C");
        if (::testing::Test::HasFailure()) return;
        float& out = (*c)[ic];
        out = static_cast<float>(p.alpha * acc +
                                 (p.beta == 0.0f ? 0.0 : p.beta * out));
      }
    }
  }
}

Span Of(const std::vector<float>& v) { return Span{v.data(), v.size()}; }

// Parameter: run the products on bf16-rounded operands (kBf16).
class GemmPlanTest : public ::testing::TestWithParam<bool> {
 protected:
  void SetUp() override {
    auto ref = ReferenceBackend::Create();
    ASSERT_TRUE(ref.ok()) << ref.status();
    ref_ = std::move(*ref);
  }
  bool bf16() const { return GetParam(); }
  // fp32 operands: max-norm 2e-5; bf16 operands: per element.
  ::testing::AssertionResult Close(const std::vector<float>& actual,
                                   const std::vector<float>& expected) const {
    return bf16() ? Bf16ProductClose(actual, expected)
                  : AllClose(actual, expected, kRtol);
  }
  std::unique_ptr<ReferenceBackend> ref_;
};

TEST_P(GemmPlanTest, Matmul) {
  const bool bf16 = this->bf16();
  struct MShape {
    int N, C, OC;
  };
  for (const MShape s : {MShape{1, 1, 1}, MShape{7, 3, 5}, MShape{37, 19, 53},
                         MShape{64, 96, 128}, MShape{128, 768, 256}}) {
    SCOPED_TRACE(::testing::Message() << "N=" << s.N << " C=" << s.C
                                      << " OC=" << s.OC << " bf16=" << bf16);
    const std::vector<float> inp = RandomVector(1, s.N * s.C);
    const std::vector<float> w = RandomVector(2, s.OC * s.C);
    const std::vector<float> bias = RandomVector(3, s.OC);
    // Forward: the plan, then the bias (the epilogue / AddBias kernel).
    std::vector<float> out(s.N * s.OC, 7.0f), out_r(s.N * s.OC);
    RunPlan(cuda_gemm::MatmulForward(out.data(), inp.data(), w.data(), s.N, s.C,
                                     s.OC),
            Of(w), Of(inp), &out, bf16);
    for (int n = 0; n < s.N; ++n) {
      for (int o = 0; o < s.OC; ++o) out[n * s.OC + o] += bias[o];
    }
    ref_->MatmulForward(out_r.data(), inp.data(), w.data(), bias.data(), s.N,
                        s.C, s.OC);
    EXPECT_TRUE(Close(out, out_r)) << "out";

    // Backward accumulates into random gradients.
    const std::vector<float> dout = RandomVector(4, s.N * s.OC);
    std::vector<float> dinp = RandomVector(5, s.N * s.C), dinp_r = dinp;
    std::vector<float> dw = RandomVector(6, s.OC * s.C), dw_r = dw;
    std::vector<float> db_r = RandomVector(7, s.OC);
    RunPlan(cuda_gemm::MatmulBackwardInput(dinp.data(), dout.data(), w.data(),
                                           s.N, s.C, s.OC),
            Of(w), Of(dout), &dinp, bf16);
    RunPlan(cuda_gemm::MatmulBackwardWeight(dw.data(), dout.data(), inp.data(),
                                            s.N, s.C, s.OC),
            Of(inp), Of(dout), &dw, bf16);
    ref_->MatmulBackward(dinp_r.data(), dw_r.data(), db_r.data(), dout.data(),
                         inp.data(), w.data(), s.N, s.C, s.OC);
    EXPECT_TRUE(Close(dinp, dinp_r)) << "dinp";
    EXPECT_TRUE(Close(dw, dw_r)) << "dweight";
  }
}

struct AShape {
  int B, T, C, NH;
};

// Odd head counts and sizes, T = 1, and a realistic one.
const AShape kAttentionShapes[] = {
    {1, 1, 4, 1},   {2, 5, 6, 2},   {3, 7, 15, 3},
    {2, 17, 24, 4}, {1, 33, 40, 5}, {2, 64, 64, 4},
};

// AttentionForward as cuda_backend_layers.cu runs it.
void AttentionForwardHost(std::vector<float>* out, std::vector<float>* att,
                          const std::vector<float>& qkv, const AShape& s,
                          bool bf16) {
  for (int b = 0; b < s.B; ++b) {
    RunPlan(
        cuda_gemm::AttentionScores(att->data(), qkv.data(), b, s.T, s.C, s.NH),
        Of(qkv), Of(qkv), att, bf16);
  }
  // The softmax kernel, row by row (row r has position t = r % T).
  const int64_t rows = static_cast<int64_t>(s.B) * s.NH * s.T;
  for (int64_t r = 0; r < rows; ++r) {
    const int t = static_cast<int>(r % s.T);
    float* x = att->data() + r * s.T;
    km::SoftmaxState st = km::SoftmaxEmpty();
    for (int j = 0; j <= t; ++j) km::SoftmaxUpdate(st, x[j]);
    for (int j = 0; j < s.T; ++j) {
      x[j] = j <= t ? km::SoftmaxProb(x[j], st) : 0.0f;
    }
  }
  for (int b = 0; b < s.B; ++b) {
    RunPlan(cuda_gemm::AttentionValues(out->data(), att->data(), qkv.data(), b,
                                       s.T, s.C, s.NH),
            Of(qkv), Of(*att), out, bf16);
  }
}

TEST_P(GemmPlanTest, AttentionForward) {
  const bool bf16 = this->bf16();
  for (const AShape& s : kAttentionShapes) {
    SCOPED_TRACE(::testing::Message()
                 << "B=" << s.B << " T=" << s.T << " C=" << s.C
                 << " NH=" << s.NH << " bf16=" << bf16);
    const size_t BT = static_cast<size_t>(s.B) * s.T;
    const size_t att_n = static_cast<size_t>(s.B) * s.NH * s.T * s.T;
    const std::vector<float> qkv = RandomVector(8, BT * 3 * s.C, -2.0f, 2.0f);
    // Garbage in the outputs checks they are overwritten.
    std::vector<float> out(BT * s.C, 5.0f), att(att_n, 5.0f);
    std::vector<float> out_r(BT * s.C), att_r(att_n);
    AttentionForwardHost(&out, &att, qkv, s, bf16);
    ref_->AttentionForward(out_r.data(), att_r.data(), qkv.data(), s.B, s.T,
                           s.C, s.NH);
    EXPECT_TRUE(Close(att, att_r)) << "att";
    EXPECT_TRUE(Close(out, out_r)) << "out";
  }
}

TEST_P(GemmPlanTest, AttentionBackward) {
  const bool bf16 = this->bf16();
  for (const AShape& s : kAttentionShapes) {
    SCOPED_TRACE(::testing::Message()
                 << "B=" << s.B << " T=" << s.T << " C=" << s.C
                 << " NH=" << s.NH << " bf16=" << bf16);
    const size_t BT = static_cast<size_t>(s.B) * s.T;
    const size_t att_n = static_cast<size_t>(s.B) * s.NH * s.T * s.T;
    const std::vector<float> qkv = RandomVector(9, BT * 3 * s.C, -2.0f, 2.0f);
    std::vector<float> out(BT * s.C), att(att_n);
    ref_->AttentionForward(out.data(), att.data(), qkv.data(), s.B, s.T, s.C,
                           s.NH);
    const std::vector<float> dout = RandomVector(10, BT * s.C);
    std::vector<float> dqkv = RandomVector(11, BT * 3 * s.C), dqkv_r = dqkv;
    std::vector<float> scratch(att_n, 3.0f), scratch_r(att_n);

    // As cuda_backend_layers.cu: datt and dv, softmax backward in place, dq
    // and dk.
    for (int b = 0; b < s.B; ++b) {
      RunPlan(cuda_gemm::AttentionBackwardAtt(scratch.data(), dout.data(),
                                              qkv.data(), b, s.T, s.C, s.NH),
              Of(qkv), Of(dout), &scratch, bf16);
      RunPlan(cuda_gemm::AttentionBackwardV(dqkv.data(), dout.data(),
                                            att.data(), b, s.T, s.C, s.NH),
              Of(dout), Of(att), &dqkv, bf16);
    }
    const float scale = cuda_gemm::AttentionScale(s.C, s.NH);
    const int64_t rows = static_cast<int64_t>(s.B) * s.NH * s.T;
    for (int64_t r = 0; r < rows; ++r) {
      const int t = static_cast<int>(r % s.T);
      float* d = scratch.data() + r * s.T;
      const float* a = att.data() + r * s.T;
      float dot = 0.0f;
      for (int j = 0; j <= t; ++j) dot += a[j] * d[j];
      for (int j = 0; j < s.T; ++j) {
        d[j] = j <= t ? km::SoftmaxBackward(a[j], d[j], dot, scale) : 0.0f;
      }
    }
    for (int b = 0; b < s.B; ++b) {
      RunPlan(cuda_gemm::AttentionBackwardQ(dqkv.data(), scratch.data(),
                                            qkv.data(), b, s.T, s.C, s.NH),
              Of(qkv), Of(scratch), &dqkv, bf16);
      RunPlan(cuda_gemm::AttentionBackwardK(dqkv.data(), scratch.data(),
                                            qkv.data(), b, s.T, s.C, s.NH),
              Of(qkv), Of(scratch), &dqkv, bf16);
    }
    ref_->AttentionBackward(dqkv_r.data(), scratch_r.data(), dout.data(),
                            qkv.data(), att.data(), s.B, s.T, s.C, s.NH);
    EXPECT_TRUE(Close(dqkv, dqkv_r)) << "dqkv";
  }
}

TEST(GemmPlanScaleTest, AttentionScale) {
  EXPECT_FLOAT_EQ(cuda_gemm::AttentionScale(768, 12), 0.125f);
  EXPECT_FLOAT_EQ(cuda_gemm::AttentionScale(6, 2), 1.0f / std::sqrt(3.0f));
}

INSTANTIATE_TEST_SUITE_P(Operands, GemmPlanTest, ::testing::Bool(),
                         [](const ::testing::TestParamInfo<bool>& info) {
                           return info.param ? "Bf16" : "Fp32";
                         });

}  // namespace
}  // namespace lmps
