// CudaBackend vs the CPU: every layer forward and backward against the
// naive ReferenceBackend on random inputs, the memory functions, and a
// whole GptModel training step against the CpuBackend.
//
// Every test runs once per MatmulPrecision (suffix /Tf32, /Bf16). It is
// skipped (GTEST_SKIP) only on a machine without an NVIDIA GPU (no device
// node, no NVIDIA display controller on the PCI bus); where a GPU is present
// but CUDA cannot use it (driver too old, ...) it fails with the runtime's
// message.
//
// Tolerances (max-norm relative error, test_util.h AllClose, unless said):
// - Outputs of matrix products (linear layers, attention), per precision
//   (MatmulTolerances):
//   - kTf32: 1e-2. TF32 inputs carry an 11-bit significand (unit roundoff
//     2^-11 = 4.9e-4), so products differ from the fp32/double reference by
//     ~1e-3 of the tensor's scale.
//   - kBf16: per element, |a - b| <= 2^-6 |b| + 2^-5 Rms(b) (test_util.h
//     Bf16ProductClose). bf16 inputs carry an 8-bit significand (unit
//     roundoff u = 2^-8 = 3.9e-3), accumulation is fp32; the bound is 4u
//     relative plus 8u of the tensor's RMS for cancelling elements, and
//     gemm_plan_test measures it on the host for every plan (worst 3u RMS).
// - kRtolElementwise = 1e-5 for elementwise kernels and kRtolReduction =
//   2e-5 for fp32 reductions (LayerNorm, softmax, cross-entropy, column
//   sums): a few ulp times the square root of the reduction length. These
//   kernels are fp32 in both precisions.
// - Whole model step, per precision: the loss within 1e-3 (TF32) / 4e-3
//   (bf16) relative, every parameter gradient within 2e-2 (TF32, max-norm)
//   / per element 4x Bf16ProductClose's bound (bf16): the per-product
//   errors compound over the layers of the backward pass. The bf16 figures
//   are estimates until a GPU run measures them.
// A real bug (a wrong index, a missing term, overwrite instead of
// accumulate, a stale bf16 weight) gives errors of order 1.
//
// Backward tests pre-fill every gradient with random values so they also
// check accumulation (+=).
#include "worker/backend/cuda/cuda_backend.h"

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "common/model/model_spec.h"
#include "gtest/gtest.h"
#include "worker/backend/cpu_backend.h"
#include "worker/backend/cpu_reference.h"
#include "worker/backend/test_util.h"
#include "worker/model/gpt.h"

namespace lmps {
namespace {

using ::lmps::testing::AllClose;
using ::lmps::testing::Bf16ProductClose;
using ::lmps::testing::ElementwiseClose;
using ::lmps::testing::kBf16ProductAtolPerRms;
using ::lmps::testing::kBf16ProductRtol;
using ::lmps::testing::Rms;
using ::lmps::testing::RandomTokens;
using ::lmps::testing::RandomVector;

constexpr double kRtolElementwise = 1e-5;
constexpr double kRtolReduction = 2e-5;

// The tolerances that depend on the matrix products' input precision.
struct MatmulTolerances {
  double gemm;        // a product's output
  double model_grad;  // a parameter gradient of a whole model step
  double loss;        // the loss of a whole model step
};

MatmulTolerances TolerancesFor(MatmulPrecision precision) {
  switch (precision) {
    case MatmulPrecision::kTf32:
      return {.gemm = 1e-2, .model_grad = 2e-2, .loss = 1e-3};
    case MatmulPrecision::kBf16:
      // Products and gradients: per element (GemmClose, CompareStep).
      return {.gemm = 0, .model_grad = 0, .loss = 4e-3};
  }
  return {};
}

template <typename T>
T Must(absl::StatusOr<T> v, const char* what) {
  if (!v.ok()) {
    std::fprintf(stderr, "%s: %s\n", what, v.status().ToString().c_str());
    std::abort();
  }
  return *std::move(v);
}

// Whether this machine has an NVIDIA GPU at all, whatever the driver says:
// a device node (/dev/nvidia0, ...) or an NVIDIA display controller on the
// PCI bus (vendor 0x10de, class 0x03xxxx).
bool GpuHardwarePresent() {
  std::error_code ec;
  for (const auto& e : std::filesystem::directory_iterator("/dev", ec)) {
    const std::string name = e.path().filename().string();
    if (name.size() > 6 && name.rfind("nvidia", 0) == 0 &&
        std::isdigit(static_cast<unsigned char>(name[6]))) {
      return true;
    }
  }
  for (const auto& e :
       std::filesystem::directory_iterator("/sys/bus/pci/devices", ec)) {
    std::ifstream vendor(e.path() / "vendor"), cls(e.path() / "class");
    std::string v, c;
    vendor >> v;
    cls >> c;
    if (v == "0x10de" && c.rfind("0x03", 0) == 0) return true;
  }
  return false;
}

// Skips (with one "LMPS_SKIP(environment): ..." line for scripts/test.sh)
// only where there is no GPU at all; a GPU that is present but that CUDA
// cannot use (driver too old, out of memory, ...) fails with the runtime's
// message. Returns "" when a device is usable.
std::string NoGpuReason() {
  int count = 0;
  const cudaError_t e = cudaGetDeviceCount(&count);
  if (e == cudaSuccess && count > 0) return "";
  return e != cudaSuccess
             ? std::string("cudaGetDeviceCount failed: ") + cudaGetErrorString(e)
             : std::string("cudaGetDeviceCount found 0 devices");
}

class CudaBackendTest : public ::testing::TestWithParam<MatmulPrecision> {
 protected:
  void SetUp() override {
    if (const std::string why = NoGpuReason(); !why.empty()) {
      if (GpuHardwarePresent()) {
        FAIL() << "an NVIDIA GPU is present but CUDA cannot use it: " << why;
      }
      static const bool said = [&] {
        std::printf("LMPS_SKIP(environment): no NVIDIA GPU on this machine "
                    "(no /dev/nvidia* device or NVIDIA PCI display "
                    "controller; %s)\n", why.c_str());
        return true;
      }();
      (void)said;
      GTEST_SKIP() << "no NVIDIA GPU (" << why << ")";
    }
    auto cuda =
        CudaBackend::Create({.device = 0, .matmul_precision = GetParam()});
    ASSERT_TRUE(cuda.ok()) << cuda.status();
    cuda_ = std::move(*cuda);
    auto ref = ReferenceBackend::Create();
    ASSERT_TRUE(ref.ok()) << ref.status();
    ref_ = std::move(*ref);
  }

  void TearDown() override {
    if (cuda_ == nullptr) return;
    for (float* p : floats_) cuda_->Free(p);
    for (int32_t* p : ints_) cuda_->Free(p);
    EXPECT_TRUE(cuda_->Synchronize().ok());
  }

  // Device copies of host vectors, freed in TearDown.
  float* Up(const std::vector<float>& v) {
    float* p = Must(cuda_->Alloc(v.size()), "Alloc");
    floats_.push_back(p);
    const absl::Status s = cuda_->CopyToBackend(p, v.data(), v.size());
    EXPECT_TRUE(s.ok()) << s;
    return p;
  }
  int32_t* Up(const std::vector<int32_t>& v) {
    int32_t* p = Must(cuda_->AllocInt32(v.size()), "AllocInt32");
    ints_.push_back(p);
    const absl::Status s = cuda_->CopyToBackend(p, v.data(), v.size());
    EXPECT_TRUE(s.ok()) << s;
    return p;
  }
  float* Empty(size_t n) {
    float* p = Must(cuda_->Alloc(n), "Alloc");
    floats_.push_back(p);
    return p;
  }
  std::vector<float> Down(const float* p, size_t n) {
    std::vector<float> v(n);
    const absl::Status s = cuda_->CopyToHost(v.data(), p, n);
    EXPECT_TRUE(s.ok()) << s;
    return v;
  }

  // The tolerances of this run's precision.
  MatmulTolerances tol() const { return TolerancesFor(GetParam()); }
  // A matrix product's output: TF32 max-norm relative (tol().gemm); bf16
  // per element (test_util.h Bf16ProductClose, measured on the host by
  // gemm_plan_test; the GPU adds only its fp32 accumulation order).
  ::testing::AssertionResult GemmClose(const std::vector<float>& actual,
                                       const std::vector<float>& expected) const {
    return GetParam() == MatmulPrecision::kBf16
               ? Bf16ProductClose(actual, expected)
               : GemmClose(actual, expected);
  }

  std::unique_ptr<CudaBackend> cuda_;
  std::unique_ptr<ReferenceBackend> ref_;
  std::vector<float*> floats_;
  std::vector<int32_t*> ints_;
};

struct Shape {
  int B, T, C, NH;
};

// Odd, prime and warp-unfriendly sizes, T = 1, and a realistic one.
const Shape kShapes[] = {
    {1, 1, 4, 1},   {2, 5, 6, 2},   {3, 7, 15, 3},     {2, 17, 24, 4},
    {1, 33, 40, 5}, {4, 64, 64, 4}, {2, 128, 768, 12},
};

// ---------------------------------------------------------------------------
// Setup and memory.
// ---------------------------------------------------------------------------

TEST_P(CudaBackendTest, CreateAndDescribe) {
  EXPECT_EQ(cuda_->name(), "cuda");
  EXPECT_EQ(cuda_->device(), 0);
  EXPECT_EQ(cuda_->matmul_precision(), GetParam());
  EXPECT_FALSE(cuda_->device_description().empty());
  const int count = Must(CudaBackend::DeviceCount(), "DeviceCount");
  EXPECT_GE(count, 1);
  auto bad = CudaBackend::Create({.device = count});
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument)
      << bad.status();
  bad = CudaBackend::Create({.device = -1});
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument)
      << bad.status();
}

TEST_P(CudaBackendTest, AllocIsZeroFilledAndAllocZeroIsValid) {
  float* p = Empty(1000);
  EXPECT_EQ(Down(p, 1000), std::vector<float>(1000, 0.0f));
  float* z = Must(cuda_->Alloc(0), "Alloc(0)");
  EXPECT_NE(z, nullptr);
  cuda_->Free(z);
  int32_t* zi = Must(cuda_->AllocInt32(0), "AllocInt32(0)");
  EXPECT_NE(zi, nullptr);
  cuda_->Free(zi);
  cuda_->Free(static_cast<float*>(nullptr));
  cuda_->Free(static_cast<int32_t*>(nullptr));
  EXPECT_TRUE(cuda_->Synchronize().ok());
}

TEST_P(CudaBackendTest, AllocTooMuchIsResourceExhausted) {
  auto p = cuda_->Alloc(size_t{1} << 50);  // 4 PiB
  EXPECT_EQ(p.status().code(), absl::StatusCode::kResourceExhausted)
      << p.status();
  // The backend still works.
  EXPECT_EQ(Down(Up(std::vector<float>{1, 2, 3}), 3),
            (std::vector<float>{1, 2, 3}));
}

TEST_P(CudaBackendTest, CopiesRoundTripExactly) {
  // Small (direct), just over the staging chunk, and several chunks with an
  // odd tail (pipelined through the pinned buffers).
  for (size_t n : {size_t{1}, size_t{1000}, size_t{(8 << 20) / 4 + 1},
                   size_t{5'000'003}}) {
    SCOPED_TRACE(n);
    const std::vector<float> v = RandomVector(1, n);
    float* p = Up(v);
    EXPECT_EQ(Down(p, n), v);
    // A copy into the middle of a buffer.
    const std::vector<float> w = RandomVector(2, n / 2);
    ASSERT_TRUE(cuda_->CopyToBackend(p + n / 4, w.data(), w.size()).ok());
    EXPECT_EQ(Down(p + n / 4, n / 2), w);
  }
}

TEST_P(CudaBackendTest, CopiesFromPinnedHostMemory) {
  const size_t n = 3'000'000;
  float* pinned = nullptr;
  ASSERT_EQ(cudaMallocHost(reinterpret_cast<void**>(&pinned), n * 4),
            cudaSuccess);
  const std::vector<float> v = RandomVector(3, n);
  std::copy(v.begin(), v.end(), pinned);
  float* p = Empty(n);
  EXPECT_TRUE(cuda_->CopyToBackend(p, pinned, n).ok());
  std::fill(pinned, pinned + n, 0.0f);
  EXPECT_TRUE(cuda_->CopyToHost(pinned, p, n).ok());
  EXPECT_TRUE(std::equal(v.begin(), v.end(), pinned));
  cudaFreeHost(pinned);
}

// CopyToHostAsync: into registered (PinHostMemory) memory it returns
// tickets in order and the data is there after WaitCopy, even while later
// kernels overwrite the source; WaitCopy works from another thread and
// for tickets already waited for; into pageable memory it copies at once.
TEST_P(CudaBackendTest, AsyncCopiesToPinnedHostMemory) {
  const size_t n = 1'000'003;
  std::vector<float> host(2 * n, -1.0f);
  ASSERT_TRUE(cuda_->PinHostMemory(host.data(), host.size() * 4).ok());
  const std::vector<float> a = RandomVector(4, n), b = RandomVector(5, n);
  float* p = Up(a);
  float* q = Up(b);
  absl::StatusOr<uint64_t> t1 = cuda_->CopyToHostAsync(host.data(), p, n);
  ASSERT_TRUE(t1.ok()) << t1.status();
  cuda_->Zero(p, n);  // issued after the copy: must not reach it
  absl::StatusOr<uint64_t> t2 = cuda_->CopyToHostAsync(host.data() + n, q, n);
  ASSERT_TRUE(t2.ok()) << t2.status();
  EXPECT_GT(*t1, 0u);
  EXPECT_GT(*t2, *t1);
  absl::Status waited;
  std::thread waiter([&] { waited = cuda_->WaitCopy(*t2); });
  waiter.join();
  EXPECT_TRUE(waited.ok()) << waited;
  EXPECT_TRUE(cuda_->WaitCopy(*t1).ok());  // covered by t2 already
  EXPECT_TRUE(std::equal(a.begin(), a.end(), host.begin()));
  EXPECT_TRUE(std::equal(b.begin(), b.end(), host.begin() + n));
  EXPECT_EQ(Down(p, 4), std::vector<float>(4, 0.0f));
  cuda_->UnpinHostMemory(host.data());

  std::vector<float> pageable(n, -1.0f);
  absl::StatusOr<uint64_t> t3 = cuda_->CopyToHostAsync(pageable.data(), q, n);
  ASSERT_TRUE(t3.ok()) << t3.status();
  EXPECT_EQ(*t3, 0u);
  EXPECT_EQ(pageable, b);
}

TEST_P(CudaBackendTest, ZeroAndAxpy) {
  const size_t n = 100'003;
  const std::vector<float> x = RandomVector(4, n), y = RandomVector(5, n);
  float* dx = Up(x);
  float* dy = Up(y);
  cuda_->Axpy(dy, -0.75f, dx, n);
  std::vector<float> expected = y;
  ref_->Axpy(expected.data(), -0.75f, x.data(), n);
  EXPECT_TRUE(AllClose(Down(dy, n), expected, kRtolElementwise));
  cuda_->Zero(dy + 3, n - 5);
  const std::vector<float> z = Down(dy, n);
  EXPECT_EQ(z[2], expected[2]);
  EXPECT_EQ(z[3], 0.0f);
  EXPECT_EQ(z[n - 3], 0.0f);
  EXPECT_EQ(z[n - 2], expected[n - 2]);
}

// ---------------------------------------------------------------------------
// Layers.
// ---------------------------------------------------------------------------

TEST_P(CudaBackendTest, Encoder) {
  for (const Shape& s : kShapes) {
    SCOPED_TRACE(::testing::Message()
                 << "B=" << s.B << " T=" << s.T << " C=" << s.C);
    const int V = 11, N = s.B * s.T;
    // Few distinct tokens: many positions share a row of dwte.
    const std::vector<int32_t> tok = RandomTokens(1, N, V);
    const std::vector<float> wte = RandomVector(2, V * s.C);
    const std::vector<float> wpe = RandomVector(3, (s.T + 2) * s.C);
    std::vector<float> out_r(N * s.C);
    float* out = Empty(N * s.C);
    int32_t* dtok = Up(tok);
    cuda_->EncoderForward(out, dtok, Up(wte), Up(wpe), s.B, s.T, s.C);
    ref_->EncoderForward(out_r.data(), tok.data(), wte.data(), wpe.data(), s.B,
                         s.T, s.C);
    EXPECT_TRUE(AllClose(Down(out, N * s.C), out_r, kRtolElementwise));

    const std::vector<float> dout = RandomVector(4, N * s.C);
    std::vector<float> dwte_r = RandomVector(5, V * s.C);
    std::vector<float> dwpe_r = RandomVector(6, (s.T + 2) * s.C);
    float* dwte = Up(dwte_r);
    float* dwpe = Up(dwpe_r);
    float* ddout = Up(dout);
    cuda_->EncoderBackward(dwte, dwpe, ddout, dtok, s.B, s.T, s.C);
    ref_->EncoderBackward(dwte_r.data(), dwpe_r.data(), dout.data(), tok.data(),
                          s.B, s.T, s.C);
    const std::vector<float> dwte_1 = Down(dwte, V * s.C);
    EXPECT_TRUE(AllClose(dwte_1, dwte_r, kRtolReduction)) << "dwte";
    EXPECT_TRUE(AllClose(Down(dwpe, (s.T + 2) * s.C), dwpe_r, kRtolReduction))
        << "dwpe";

    // Deterministic: the same accumulation again gives the same bits.
    float* dwte2 = Up(RandomVector(5, V * s.C));
    cuda_->EncoderBackward(dwte2, dwpe, ddout, dtok, s.B, s.T, s.C);
    EXPECT_EQ(Down(dwte2, V * s.C), dwte_1);
  }
}

TEST_P(CudaBackendTest, LayerNorm) {
  for (const Shape& s : kShapes) {
    const int N = s.B * s.T, C = s.C;
    SCOPED_TRACE(::testing::Message() << "N=" << N << " C=" << C);
    const std::vector<float> inp = RandomVector(7, N * C, 2.0f, 5.0f);
    const std::vector<float> w = RandomVector(8, C, 0.5f, 1.5f);
    const std::vector<float> b = RandomVector(9, C);
    std::vector<float> out_r(N * C), mean_r(N), rstd_r(N);
    float* out = Empty(N * C);
    float* mean = Empty(N);
    float* rstd = Empty(N);
    float* dinp_ = Up(inp);
    float* dw_ = Up(w);
    cuda_->LayerNormForward(out, mean, rstd, dinp_, dw_, Up(b), N, C);
    ref_->LayerNormForward(out_r.data(), mean_r.data(), rstd_r.data(),
                           inp.data(), w.data(), b.data(), N, C);
    EXPECT_TRUE(AllClose(Down(out, N * C), out_r, kRtolReduction)) << "out";
    EXPECT_TRUE(AllClose(Down(mean, N), mean_r, kRtolReduction)) << "mean";
    EXPECT_TRUE(AllClose(Down(rstd, N), rstd_r, kRtolReduction)) << "rstd";

    const std::vector<float> dout = RandomVector(10, N * C);
    std::vector<float> dinp_r = RandomVector(11, N * C);
    std::vector<float> dw_r = RandomVector(12, C);
    std::vector<float> db_r = RandomVector(13, C);
    float* dinp = Up(dinp_r);
    float* dweight = Up(dw_r);
    float* dbias = Up(db_r);
    // Both backends use the reference's saved statistics.
    cuda_->LayerNormBackward(dinp, dweight, dbias, Up(dout), dinp_, dw_,
                             Up(mean_r), Up(rstd_r), N, C);
    ref_->LayerNormBackward(dinp_r.data(), dw_r.data(), db_r.data(),
                            dout.data(), inp.data(), w.data(), mean_r.data(),
                            rstd_r.data(), N, C);
    EXPECT_TRUE(AllClose(Down(dinp, N * C), dinp_r, kRtolReduction)) << "dinp";
    EXPECT_TRUE(AllClose(Down(dweight, C), dw_r, kRtolReduction)) << "dweight";
    EXPECT_TRUE(AllClose(Down(dbias, C), db_r, kRtolReduction)) << "dbias";
  }
}

TEST_P(CudaBackendTest, Matmul) {
  struct MShape {
    int N, C, OC;
  };
  // Odd shapes (unaligned rows: cuBLASLt with 4-byte alignment or the
  // cublasGemmEx fallback) and aligned ones (the tensor-core fast path).
  const MShape shapes[] = {{1, 1, 1},       {7, 3, 5},      {37, 19, 53},
                           {64, 96, 128},   {130, 64, 257}, {256, 768, 2304},
                           {128, 3072, 768}};
  for (const MShape& s : shapes) {
    for (bool with_bias : {true, false}) {
      SCOPED_TRACE(::testing::Message() << "N=" << s.N << " C=" << s.C << " OC="
                                        << s.OC << " bias=" << with_bias);
      const std::vector<float> inp = RandomVector(14, s.N * s.C);
      const std::vector<float> w = RandomVector(15, s.OC * s.C);
      const std::vector<float> b = RandomVector(16, s.OC);
      float* dinp_ = Up(inp);
      float* dw_ = Up(w);
      float* bias = with_bias ? Up(b) : nullptr;
      // Garbage in out checks it is overwritten.
      float* out = Up(std::vector<float>(s.N * s.OC, 7.0f));
      std::vector<float> out_r(s.N * s.OC);
      cuda_->MatmulForward(out, dinp_, dw_, bias, s.N, s.C, s.OC);
      ref_->MatmulForward(out_r.data(), inp.data(), w.data(),
                          with_bias ? b.data() : nullptr, s.N, s.C, s.OC);
      EXPECT_TRUE(GemmClose(Down(out, s.N * s.OC), out_r)) << "out";

      const std::vector<float> dout = RandomVector(17, s.N * s.OC);
      std::vector<float> dinp_r = RandomVector(18, s.N * s.C);
      std::vector<float> dw_r = RandomVector(19, s.OC * s.C);
      std::vector<float> db_r = RandomVector(20, s.OC);
      float* dinp = Up(dinp_r);
      float* dweight = Up(dw_r);
      float* dbias = with_bias ? Up(db_r) : nullptr;
      cuda_->MatmulBackward(dinp, dweight, dbias, Up(dout), dinp_, dw_, s.N,
                            s.C, s.OC);
      ref_->MatmulBackward(dinp_r.data(), dw_r.data(),
                           with_bias ? db_r.data() : nullptr, dout.data(),
                           inp.data(), w.data(), s.N, s.C, s.OC);
      EXPECT_TRUE(GemmClose(Down(dinp, s.N * s.C), dinp_r))
          << "dinp";
      EXPECT_TRUE(GemmClose(Down(dweight, s.OC * s.C), dw_r))
          << "dweight";
      if (with_bias) {
        // A column sum in fp32, not a tensor-core product.
        EXPECT_TRUE(AllClose(Down(dbias, s.OC), db_r, kRtolReduction))
            << "dbias";
      }
    }
  }
}

TEST_P(CudaBackendTest, MatmulUsesCublasLtForAlignedShapes) {
  const int N = 256, C = 768, OC = 3072;
  float* out = Empty(static_cast<size_t>(N) * OC);
  float* inp = Up(RandomVector(21, N * C));
  float* w = Up(RandomVector(22, OC * C));
  float* b = Up(RandomVector(23, OC));
  const int64_t before = cuda_->gemm_fallbacks();
  cuda_->MatmulForward(out, inp, w, b, N, C, OC);
  cuda_->MatmulForward(out, inp, w, nullptr, N, C, OC);
  float* dinp = Empty(static_cast<size_t>(N) * C);
  float* dw = Empty(static_cast<size_t>(OC) * C);
  float* db = Empty(OC);
  cuda_->MatmulBackward(dinp, dw, db, out, inp, w, N, C, OC);
  ASSERT_TRUE(cuda_->Synchronize().ok());
  EXPECT_EQ(cuda_->gemm_fallbacks(), before);
}

TEST_P(CudaBackendTest, Attention) {
  for (const Shape& s : kShapes) {
    SCOPED_TRACE(::testing::Message() << "B=" << s.B << " T=" << s.T
                                      << " C=" << s.C << " NH=" << s.NH);
    const size_t BT = static_cast<size_t>(s.B) * s.T;
    const size_t att_n = static_cast<size_t>(s.B) * s.NH * s.T * s.T;
    const std::vector<float> qkv = RandomVector(24, BT * 3 * s.C, -2.0f, 2.0f);
    float* dqkv_in = Up(qkv);
    float* out = Up(std::vector<float>(BT * s.C, 5.0f));
    float* att = Up(std::vector<float>(att_n, 5.0f));
    std::vector<float> out_r(BT * s.C), att_r(att_n);
    cuda_->AttentionForward(out, att, dqkv_in, s.B, s.T, s.C, s.NH);
    ref_->AttentionForward(out_r.data(), att_r.data(), qkv.data(), s.B, s.T,
                           s.C, s.NH);
    const std::vector<float> att_c = Down(att, att_n);
    EXPECT_TRUE(GemmClose(att_c, att_r)) << "att";
    EXPECT_TRUE(GemmClose(Down(out, BT * s.C), out_r)) << "out";
    // The causal mask is exact: zeros above the diagonal.
    bool masked = true;
    for (size_t r = 0; r < att_n / s.T && masked; ++r) {
      const int t = static_cast<int>(r % s.T);
      for (int j = t + 1; j < s.T; ++j) masked &= att_c[r * s.T + j] == 0.0f;
    }
    EXPECT_TRUE(masked);

    // Backward from the reference's att, so only the backward differs.
    const std::vector<float> dout = RandomVector(25, BT * s.C);
    std::vector<float> dqkv_r = RandomVector(26, BT * 3 * s.C);
    std::vector<float> scratch_r(att_n);
    float* dqkv = Up(dqkv_r);
    float* scratch = Up(std::vector<float>(att_n, 3.0f));
    cuda_->AttentionBackward(dqkv, scratch, Up(dout), dqkv_in, Up(att_r), s.B,
                             s.T, s.C, s.NH);
    ref_->AttentionBackward(dqkv_r.data(), scratch_r.data(), dout.data(),
                            qkv.data(), att_r.data(), s.B, s.T, s.C, s.NH);
    EXPECT_TRUE(GemmClose(Down(dqkv, BT * 3 * s.C), dqkv_r))
        << "dqkv";
  }
}

TEST_P(CudaBackendTest, Gelu) {
  const size_t n = 1'000'003;
  const std::vector<float> inp = RandomVector(27, n, -6.0f, 6.0f);
  float* dinp_ = Up(inp);
  float* out = Empty(n);
  std::vector<float> out_r(n);
  cuda_->GeluForward(out, dinp_, n);
  ref_->GeluForward(out_r.data(), inp.data(), n);
  EXPECT_TRUE(AllClose(Down(out, n), out_r, kRtolElementwise));

  const std::vector<float> dout = RandomVector(28, n);
  std::vector<float> dinp_r = RandomVector(29, n);
  float* dinp = Up(dinp_r);
  cuda_->GeluBackward(dinp, dinp_, Up(dout), n);
  ref_->GeluBackward(dinp_r.data(), inp.data(), dout.data(), n);
  EXPECT_TRUE(AllClose(Down(dinp, n), dinp_r, kRtolElementwise));
}

TEST_P(CudaBackendTest, Residual) {
  const size_t n = 300'007;
  const std::vector<float> a = RandomVector(30, n), b = RandomVector(31, n);
  float* da = Up(a);
  float* db = Up(b);
  float* out = Empty(n);
  std::vector<float> out_r(n);
  cuda_->ResidualForward(out, da, db, n);
  ref_->ResidualForward(out_r.data(), a.data(), b.data(), n);
  EXPECT_EQ(Down(out, n), out_r);  // one fp32 addition: exact
  // out may alias an input.
  cuda_->ResidualForward(da, da, db, n);
  EXPECT_EQ(Down(da, n), out_r);

  const std::vector<float> dout = RandomVector(32, n);
  std::vector<float> d1_r = RandomVector(33, n), d2_r = RandomVector(34, n);
  float* d1 = Up(d1_r);
  float* d2 = Up(d2_r);
  cuda_->ResidualBackward(d1, d2, Up(dout), n);
  ref_->ResidualBackward(d1_r.data(), d2_r.data(), dout.data(), n);
  EXPECT_EQ(Down(d1, n), d1_r);
  EXPECT_EQ(Down(d2, n), d2_r);
}

TEST_P(CudaBackendTest, CrossEntropy) {
  struct CShape {
    int N, V;
  };
  for (const CShape& s :
       {CShape{1, 1}, CShape{5, 7}, CShape{33, 257}, CShape{64, 50257}}) {
    SCOPED_TRACE(::testing::Message() << "N=" << s.N << " V=" << s.V);
    const size_t NV = static_cast<size_t>(s.N) * s.V;
    const std::vector<float> logits = RandomVector(35, NV, -10.0f, 10.0f);
    const std::vector<int32_t> targets = RandomTokens(36, s.N, s.V);
    float* dlogits_in = Up(logits);
    int32_t* dtargets = Up(targets);
    float* losses = Empty(s.N);
    float* probs = Empty(NV);
    std::vector<float> losses_r(s.N), probs_r(NV);
    cuda_->CrossEntropyForward(losses, probs, dlogits_in, dtargets, s.N, s.V);
    ref_->CrossEntropyForward(losses_r.data(), probs_r.data(), logits.data(),
                              targets.data(), s.N, s.V);
    EXPECT_TRUE(AllClose(Down(losses, s.N), losses_r, kRtolReduction))
        << "losses";
    EXPECT_TRUE(AllClose(Down(probs, NV), probs_r, kRtolReduction)) << "probs";

    const float dloss = 1.0f / s.N;
    std::vector<float> dlogits_r = RandomVector(37, NV);
    float* dlogits = Up(dlogits_r);
    cuda_->CrossEntropyBackward(dlogits, Up(probs_r), dtargets, dloss, s.N,
                                s.V);
    ref_->CrossEntropyBackward(dlogits_r.data(), probs_r.data(), targets.data(),
                               dloss, s.N, s.V);
    EXPECT_TRUE(AllClose(Down(dlogits, NV), dlogits_r, kRtolElementwise))
        << "dlogits";
  }
}

TEST_P(CudaBackendTest, ParameterGradientsAreDeterministic) {
  // Column sums (LayerNorm and bias gradients) over many rows: same bits
  // every time.
  const int N = 4096, C = 768;
  float* inp = Up(RandomVector(38, N * C));
  float* dout = Up(RandomVector(39, N * C));
  float* w = Up(RandomVector(40, C, 0.5f, 1.5f));
  float* mean = Up(RandomVector(41, N));
  float* rstd = Up(RandomVector(42, N, 0.5f, 2.0f));
  std::vector<float> first;
  for (int run = 0; run < 3; ++run) {
    float* dinp = Empty(static_cast<size_t>(N) * C);
    float* dw = Empty(C);
    float* db = Empty(C);
    cuda_->LayerNormBackward(dinp, dw, db, dout, inp, w, mean, rstd, N, C);
    std::vector<float> got = Down(dw, C);
    const std::vector<float> got_b = Down(db, C);
    got.insert(got.end(), got_b.begin(), got_b.end());
    if (run == 0) {
      first = got;
    } else {
      EXPECT_EQ(got, first) << "run " << run;
    }
  }
}

// ---------------------------------------------------------------------------
// A whole training step of the model: CUDA vs CPU.
// ---------------------------------------------------------------------------

ModelConfig StepConfig() {
  ModelConfig c;
  c.set_n_layer(2);
  c.set_n_embd(64);
  c.set_n_head(4);
  c.set_block_size(48);
  c.set_vocab_size(97);
  return c;
}

struct StepResult {
  float loss = 0.0f;
  std::vector<float> grads;
};

// ZeroGrad, Forward, Backward on `backend` from host parameters.
StepResult RunStep(Backend* backend, const ModelConfig& config,
                   const std::vector<float>& params,
                   const std::vector<int32_t>& tokens,
                   const std::vector<int32_t>& targets, int B, int T) {
  StepResult r;
  auto model = GptModel::Create(config, backend, B, T);
  EXPECT_TRUE(model.ok()) << model.status();
  if (!model.ok()) return r;
  EXPECT_TRUE((*model)->SetParametersFromHost(params.data()).ok());
  (*model)->ZeroGrad();
  auto loss = (*model)->Forward(tokens.data(), targets.data(), B, T);
  EXPECT_TRUE(loss.ok()) << loss.status();
  if (!loss.ok()) return r;
  r.loss = *loss;
  EXPECT_TRUE((*model)->Backward().ok());
  r.grads.resize((*model)->num_parameters());
  EXPECT_TRUE((*model)->GradientsToHost(r.grads.data()).ok());
  return r;
}

void CompareStep(CudaBackend* cuda, const ModelConfig& config,
                 const std::vector<float>& params, int B, int T,
                 MatmulPrecision precision) {
  const MatmulTolerances tol = TolerancesFor(precision);
  const std::vector<int32_t> tokens =
      RandomTokens(43, B * T, config.vocab_size());
  const std::vector<int32_t> targets =
      RandomTokens(44, B * T, config.vocab_size());
  auto cpu = CpuBackend::Create({.num_threads = 2});
  ASSERT_TRUE(cpu.ok()) << cpu.status();
  const StepResult want =
      RunStep(cpu->get(), config, params, tokens, targets, B, T);
  const StepResult got = RunStep(cuda, config, params, tokens, targets, B, T);
  ASSERT_EQ(got.grads.size(), want.grads.size());
  EXPECT_NEAR(got.loss, want.loss, tol.loss * std::fabs(want.loss));
  // Tensor by tensor, so each is measured against its own scale.
  int64_t offset = 0;
  for (const TensorSpec& spec : GptTensorSpecs(config)) {
    const int64_t n = spec.num_elements();
    const std::vector<float> g(got.grads.begin() + offset,
                               got.grads.begin() + offset + n);
    const std::vector<float> w(want.grads.begin() + offset,
                               want.grads.begin() + offset + n);
    // TF32: max-norm relative. bf16: per element, 4x the per-product bound
    // (test_util.h Bf16ProductClose) for the products compounding through
    // the backward pass: an estimate until measured on a GPU.
    if (precision == MatmulPrecision::kBf16) {
      EXPECT_TRUE(ElementwiseClose(g, w, 4 * kBf16ProductAtolPerRms * Rms(w),
                                   4 * kBf16ProductRtol))
          << spec.name;
    } else {
      EXPECT_TRUE(AllClose(g, w, tol.model_grad, 1e-8)) << spec.name;
    }
    offset += n;
  }
}

TEST_P(CudaBackendTest, GptTrainingStepMatchesCpu) {
  const ModelConfig config = StepConfig();
  // GPT-2 initialisation, and "trained-like" parameters of order 1 whose
  // activations and gradients are all far from zero.
  std::vector<float> gpt2(GptNumParameters(config));
  {
    auto cpu = CpuBackend::Create({.num_threads = 1});
    ASSERT_TRUE(cpu.ok());
    auto m = GptModel::Create(config, cpu->get(), 1, 1);
    ASSERT_TRUE(m.ok()) << m.status();
    ASSERT_TRUE((*m)->InitParameters(1234).ok());
    ASSERT_TRUE((*m)->ParametersToHost(gpt2.data()).ok());
  }
  std::vector<float> large;
  uint64_t seed = 100;
  for (const TensorSpec& spec : GptTensorSpecs(config)) {
    const std::vector<float> t =
        spec.init == InitKind::kOnes
            ? RandomVector(seed++, spec.num_elements(), 0.8f, 1.2f)
            : RandomVector(seed++, spec.num_elements(), -0.3f, 0.3f);
    large.insert(large.end(), t.begin(), t.end());
  }
  {
    SCOPED_TRACE("GPT-2 init, B=4 T=48");
    CompareStep(cuda_.get(), config, gpt2, 4, 48, GetParam());
  }
  {
    SCOPED_TRACE("large parameters, B=3 T=29");
    CompareStep(cuda_.get(), config, large, 3, 29, GetParam());
  }
}

// ---------------------------------------------------------------------------
// The bf16 weight copies (kBf16): converted once per parameter version.
// ---------------------------------------------------------------------------

TEST_P(CudaBackendTest, Bf16WeightCopyFollowsEveryWrite) {
  if (GetParam() != MatmulPrecision::kBf16) GTEST_SKIP() << "bf16 only";
  const int N = 64, C = 96, OC = 128;
  const std::vector<float> inp = RandomVector(50, N * C);
  std::vector<float> w = RandomVector(51, OC * C);
  float* dinp_ = Up(inp);
  float* dw_ = Up(w);
  float* out = Empty(static_cast<size_t>(N) * OC);
  std::vector<float> out_r(static_cast<size_t>(N) * OC);
  // Checks out against the reference with the current host weights w.
  auto check = [&](const char* what) {
    cuda_->MatmulForward(out, dinp_, dw_, nullptr, N, C, OC);
    ref_->MatmulForward(out_r.data(), inp.data(), w.data(), nullptr, N, C, OC);
    EXPECT_TRUE(GemmClose(Down(out, out_r.size()), out_r)) << what;
  };
  const int64_t c0 = cuda_->bf16_weight_conversions();
  check("first use");
  EXPECT_EQ(cuda_->bf16_weight_conversions(), c0 + 1);
  check("second use");
  // MatmulBackward reads the same copy; writes elsewhere keep it.
  float* dinp = Empty(static_cast<size_t>(N) * C);
  float* dweight = Empty(static_cast<size_t>(OC) * C);
  cuda_->MatmulBackward(dinp, dweight, nullptr, out, dinp_, dw_, N, C, OC);
  cuda_->Zero(dinp, static_cast<size_t>(N) * C);
  EXPECT_EQ(cuda_->bf16_weight_conversions(), c0 + 1);

  // A parameter pull (CopyToBackend) of one element in the middle.
  w[w.size() / 2] = 100.0f;
  ASSERT_TRUE(
      cuda_->CopyToBackend(dw_ + w.size() / 2, &w[w.size() / 2], 1).ok());
  check("after CopyToBackend");
  EXPECT_EQ(cuda_->bf16_weight_conversions(), c0 + 2);

  // An optimiser step on the device (Axpy), then Zero of the tail.
  const std::vector<float> g = RandomVector(52, OC * C);
  cuda_->Axpy(dw_, -0.5f, Up(g), w.size());
  for (size_t i = 0; i < w.size(); ++i) w[i] += -0.5f * g[i];
  check("after Axpy");
  cuda_->Zero(dw_ + w.size() - 7, 7);
  std::fill(w.end() - 7, w.end(), 0.0f);
  check("after Zero");
  // A layer output written over the weight.
  cuda_->GeluForward(dw_, Up(g), w.size());
  ref_->GeluForward(w.data(), g.data(), w.size());
  check("after GeluForward");
  EXPECT_EQ(cuda_->bf16_weight_conversions(), c0 + 5);
}

TEST_P(CudaBackendTest, Bf16WeightsConvertedOncePerParameterVersionInModel) {
  if (GetParam() != MatmulPrecision::kBf16) GTEST_SKIP() << "bf16 only";
  const ModelConfig config = StepConfig();
  const int B = 2, T = 16;
  auto model = GptModel::Create(config, cuda_.get(), B, T);
  ASSERT_TRUE(model.ok()) << model.status();
  ASSERT_TRUE((*model)->InitParameters(7).ok());
  const std::vector<int32_t> tokens =
      RandomTokens(53, B * T, config.vocab_size());
  auto step = [&]() {
    (*model)->ZeroGrad();
    auto loss = (*model)->Forward(tokens.data(), tokens.data(), B, T);
    ASSERT_TRUE(loss.ok()) << loss.status();
    ASSERT_TRUE((*model)->Backward().ok());
  };
  step();
  const int64_t per_version = cuda_->bf16_weight_conversions();
  // 4 linear layers per block and the tied LM head.
  EXPECT_EQ(per_version, 4 * config.n_layer() + 1);
  step();  // micro-batches of the same parameters: no conversion
  step();
  EXPECT_EQ(cuda_->bf16_weight_conversions(), per_version);
  std::vector<float> params((*model)->num_parameters());
  ASSERT_TRUE((*model)->ParametersToHost(params.data()).ok());
  ASSERT_TRUE((*model)->SetParametersFromHost(params.data()).ok());
  step();  // a new parameter version: each weight once more
  EXPECT_EQ(cuda_->bf16_weight_conversions(), 2 * per_version);
}

INSTANTIATE_TEST_SUITE_P(
    Precisions, CudaBackendTest,
    ::testing::Values(MatmulPrecision::kTf32, MatmulPrecision::kBf16),
    [](const ::testing::TestParamInfo<MatmulPrecision>& info) {
      return info.param == MatmulPrecision::kTf32 ? std::string("Tf32")
                                                  : std::string("Bf16");
    });

}  // namespace
}  // namespace lmps
