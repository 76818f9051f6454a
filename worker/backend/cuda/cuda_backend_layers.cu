// CudaBackend (cuda_backend.h): the layer functions of backend.h. Each makes
// the device current, marks its outputs as written (for the bf16 weight
// cache), and enqueues the custom kernels of kernels.h or the products of
// gemm_plan.h (through Gemm); errors are deferred to the next
// Copy*/Synchronize.
#include "worker/backend/cuda/cuda_backend.h"

#include <cuda_runtime.h>

#include <cstdint>

#include "worker/backend/cuda/cuda_backend_internal.h"
#include "worker/backend/cuda/gemm_plan.h"
#include "worker/backend/cuda/kernels.h"

namespace lmps {
namespace {

using cuda_backend_internal::CudaError;
using cuda_backend_internal::PadBf16;
using cuda_gemm::GemmPlan;

// The element of `image`, the bf16 copy of the fp32 tensor at `base`
// (element for element), that corresponds to `p`; null without an image
// (kTf32: Gemm then reads the fp32 operands).
const uint16_t* At(const uint16_t* image, const float* base, const float* p) {
  return image == nullptr ? nullptr : image + (p - base);
}

}  // namespace

// ---------------------------------------------------------------------------
// Vector utilities and layers.
// ---------------------------------------------------------------------------

void CudaBackend::Zero(float* p, size_t n) {
  if (n == 0) return;
  UseDevice();
  WroteFloats(p, n);
  const cudaError_t e = cudaMemsetAsync(p, 0, n * sizeof(float), stream_);
  if (e != cudaSuccess) Defer(CudaError(e, "cudaMemsetAsync"));
}

void CudaBackend::Axpy(float* y, float alpha, const float* x, size_t n) {
  UseDevice();
  WroteFloats(y, n);
  cuda_kernels::Axpy(stream_, y, alpha, x, n);
  CheckLaunch("Axpy");
}

void CudaBackend::EncoderForward(float* out, const int32_t* inp,
                                 const float* wte, const float* wpe, int B,
                                 int T, int C) {
  UseDevice();
  WroteFloats(out, static_cast<size_t>(B) * T * C);
  cuda_kernels::EncoderForward(stream_, out, inp, wte, wpe, B, T, C);
  CheckLaunch("EncoderForward");
}

void CudaBackend::EncoderBackward(float* dwte, float* dwpe, const float* dout,
                                  const int32_t* inp, int B, int T, int C) {
  UseDevice();
  // dwte is written at the rows of the tokens in inp, whose range [0, V)
  // the call does not know: everything from dwte to the end of its
  // allocation may be written.
  Wrote(dwte, AllocationBytesFrom(dwte));
  WroteFloats(dwpe, static_cast<size_t>(T) * C);
  cuda_kernels::EncoderBackwardWpe(stream_, dwpe, dout, B, T, C);
  CheckLaunch("EncoderBackward (wpe)");
  const int N = B * T;
  if (N == 0) return;
  void* scratch = Scratch(cuda_kernels::EncoderBackwardWteScratchBytes(N));
  if (scratch == nullptr) return;
  const cudaError_t e =
      cuda_kernels::EncoderBackwardWte(stream_, scratch, dwte, dout, inp, N, C);
  if (e != cudaSuccess) Defer(CudaError(e, "EncoderBackward (radix sort)"));
  CheckLaunch("EncoderBackward (wte)");
}

void CudaBackend::LayerNormForward(float* out, float* mean, float* rstd,
                                   const float* inp, const float* weight,
                                   const float* bias, int N, int C) {
  UseDevice();
  WroteFloats(out, static_cast<size_t>(N) * C);
  WroteFloats(mean, N);
  WroteFloats(rstd, N);
  cuda_kernels::LayerNormForward(stream_, out, mean, rstd, inp, weight, bias, N,
                                 C);
  CheckLaunch("LayerNormForward");
}

void CudaBackend::LayerNormBackward(float* dinp, float* dweight, float* dbias,
                                    const float* dout, const float* inp,
                                    const float* weight, const float* mean,
                                    const float* rstd, int N, int C) {
  UseDevice();
  WroteFloats(dinp, static_cast<size_t>(N) * C);
  WroteFloats(dweight, C);
  WroteFloats(dbias, C);
  cuda_kernels::LayerNormBackwardInput(stream_, dinp, dout, inp, weight, mean,
                                       rstd, N, C);
  CheckLaunch("LayerNormBackward (input)");
  float* scratch = static_cast<float*>(
      Scratch(cuda_kernels::ColumnSumsScratchFloats(N, C) * sizeof(float)));
  if (scratch == nullptr) return;
  cuda_kernels::ColumnSums(stream_, scratch, dbias, dweight, dout, inp, mean,
                           rstd, N, C);
  CheckLaunch("LayerNormBackward (parameters)");
}

void CudaBackend::MatmulForward(float* out, const float* inp,
                                const float* weight, const float* bias, int N,
                                int C, int OC) {
  UseDevice();
  WroteFloats(out, static_cast<size_t>(N) * OC);
  const GemmPlan plan = cuda_gemm::MatmulForward(out, inp, weight, N, C, OC);
  if (!bf16()) {
    Gemm(plan, bias);
    return;
  }
  const size_t nc = static_cast<size_t>(N) * C;
  const uint16_t* w16 = Bf16WeightOf(weight, static_cast<size_t>(OC) * C);
  uint16_t* inp16 = Bf16Scratch(nc);
  if (w16 == nullptr || inp16 == nullptr) return;
  ToBf16(inp16, inp, nc);
  Gemm(plan, bias, w16, inp16);
}

void CudaBackend::MatmulBackward(float* dinp, float* dweight, float* dbias,
                                 const float* dout, const float* inp,
                                 const float* weight, int N, int C, int OC) {
  UseDevice();
  const size_t nc = static_cast<size_t>(N) * C;
  const size_t noc = static_cast<size_t>(N) * OC;
  WroteFloats(dinp, nc);
  WroteFloats(dweight, static_cast<size_t>(OC) * C);
  if (dbias != nullptr) WroteFloats(dbias, OC);
  const GemmPlan input_plan =
      cuda_gemm::MatmulBackwardInput(dinp, dout, weight, N, C, OC);
  const GemmPlan weight_plan =
      cuda_gemm::MatmulBackwardWeight(dweight, dout, inp, N, C, OC);
  if (!bf16()) {
    Gemm(input_plan, nullptr);
    Gemm(weight_plan, nullptr);
  } else {
    // dout and inp in one scratch allocation; the weight from the cache.
    const uint16_t* w16 = Bf16WeightOf(weight, static_cast<size_t>(OC) * C);
    uint16_t* dout16 = Bf16Scratch(PadBf16(noc) + nc);
    if (w16 == nullptr || dout16 == nullptr) return;
    uint16_t* inp16 = dout16 + PadBf16(noc);
    ToBf16(dout16, dout, noc);
    ToBf16(inp16, inp, nc);
    Gemm(input_plan, nullptr, w16, dout16);
    Gemm(weight_plan, nullptr, inp16, dout16);
  }
  if (dbias == nullptr) return;
  float* scratch = static_cast<float*>(
      Scratch(cuda_kernels::ColumnSumsScratchFloats(N, OC) * sizeof(float)));
  if (scratch == nullptr) return;
  cuda_kernels::ColumnSums(stream_, scratch, dbias, nullptr, dout, nullptr,
                           nullptr, nullptr, N, OC);
  CheckLaunch("MatmulBackward (bias)");
}

void CudaBackend::AttentionForward(float* out, float* att, const float* qkv,
                                   int B, int T, int C, int NH) {
  UseDevice();
  const size_t bt = static_cast<size_t>(B) * T;
  const size_t att_n = static_cast<size_t>(B) * NH * T * T;
  WroteFloats(out, bt * C);
  WroteFloats(att, att_n);
  // kBf16: qkv and (after the softmax) att as bf16 operands.
  uint16_t* qkv16 = nullptr;
  uint16_t* att16 = nullptr;
  if (bf16()) {
    qkv16 = Bf16Scratch(PadBf16(bt * 3 * C) + att_n);
    if (qkv16 == nullptr) return;
    att16 = qkv16 + PadBf16(bt * 3 * C);
    ToBf16(qkv16, qkv, bt * 3 * C);
  }
  for (int b = 0; b < B; ++b) {
    const GemmPlan p = cuda_gemm::AttentionScores(att, qkv, b, T, C, NH);
    Gemm(p, nullptr, At(qkv16, qkv, p.a), At(qkv16, qkv, p.b));
  }
  cuda_kernels::AttentionSoftmaxForward(stream_, att,
                                        static_cast<int64_t>(B) * NH * T, T);
  CheckLaunch("AttentionForward (softmax)");
  if (bf16()) ToBf16(att16, att, att_n);
  for (int b = 0; b < B; ++b) {
    const GemmPlan p = cuda_gemm::AttentionValues(out, att, qkv, b, T, C, NH);
    Gemm(p, nullptr, At(qkv16, qkv, p.a), At(att16, att, p.b));
  }
}

void CudaBackend::AttentionBackward(float* dqkv, float* scratch,
                                    const float* dout, const float* qkv,
                                    const float* att, int B, int T, int C,
                                    int NH) {
  UseDevice();
  const size_t bt = static_cast<size_t>(B) * T;
  const size_t att_n = static_cast<size_t>(B) * NH * T * T;
  WroteFloats(dqkv, bt * 3 * C);
  WroteFloats(scratch, att_n);
  // kBf16: dout, qkv and att as bf16 operands; after the V products the
  // att slot takes dpreatt (the products that read att run first, in
  // stream order).
  uint16_t* dout16 = nullptr;
  uint16_t* qkv16 = nullptr;
  uint16_t* att16 = nullptr;
  if (bf16()) {
    dout16 = Bf16Scratch(PadBf16(bt * C) + PadBf16(bt * 3 * C) + att_n);
    if (dout16 == nullptr) return;
    qkv16 = dout16 + PadBf16(bt * C);
    att16 = qkv16 + PadBf16(bt * 3 * C);
    ToBf16(dout16, dout, bt * C);
    ToBf16(qkv16, qkv, bt * 3 * C);
    ToBf16(att16, att, att_n);
  }
  for (int b = 0; b < B; ++b) {
    const GemmPlan datt =
        cuda_gemm::AttentionBackwardAtt(scratch, dout, qkv, b, T, C, NH);
    const GemmPlan dv =
        cuda_gemm::AttentionBackwardV(dqkv, dout, att, b, T, C, NH);
    Gemm(datt, nullptr, At(qkv16, qkv, datt.a), At(dout16, dout, datt.b));
    Gemm(dv, nullptr, At(dout16, dout, dv.a), At(att16, att, dv.b));
  }
  cuda_kernels::AttentionSoftmaxBackward(stream_, scratch, att,
                                         static_cast<int64_t>(B) * NH * T, T,
                                         cuda_gemm::AttentionScale(C, NH));
  CheckLaunch("AttentionBackward (softmax)");
  uint16_t* dpre16 = att16;
  if (bf16()) ToBf16(dpre16, scratch, att_n);
  for (int b = 0; b < B; ++b) {
    const GemmPlan dq =
        cuda_gemm::AttentionBackwardQ(dqkv, scratch, qkv, b, T, C, NH);
    const GemmPlan dk =
        cuda_gemm::AttentionBackwardK(dqkv, scratch, qkv, b, T, C, NH);
    Gemm(dq, nullptr, At(qkv16, qkv, dq.a), At(dpre16, scratch, dq.b));
    Gemm(dk, nullptr, At(qkv16, qkv, dk.a), At(dpre16, scratch, dk.b));
  }
}

void CudaBackend::GeluForward(float* out, const float* inp, size_t N) {
  UseDevice();
  WroteFloats(out, N);
  cuda_kernels::GeluForward(stream_, out, inp, N);
  CheckLaunch("GeluForward");
}

void CudaBackend::GeluBackward(float* dinp, const float* inp, const float* dout,
                               size_t N) {
  UseDevice();
  WroteFloats(dinp, N);
  cuda_kernels::GeluBackward(stream_, dinp, inp, dout, N);
  CheckLaunch("GeluBackward");
}

void CudaBackend::ResidualForward(float* out, const float* inp1,
                                  const float* inp2, size_t N) {
  UseDevice();
  WroteFloats(out, N);
  cuda_kernels::ResidualForward(stream_, out, inp1, inp2, N);
  CheckLaunch("ResidualForward");
}

void CudaBackend::ResidualBackward(float* dinp1, float* dinp2,
                                   const float* dout, size_t N) {
  UseDevice();
  WroteFloats(dinp1, N);
  WroteFloats(dinp2, N);
  cuda_kernels::ResidualBackward(stream_, dinp1, dinp2, dout, N);
  CheckLaunch("ResidualBackward");
}

void CudaBackend::CrossEntropyForward(float* losses, float* probs,
                                      const float* logits,
                                      const int32_t* targets, int N, int V) {
  UseDevice();
  WroteFloats(losses, N);
  WroteFloats(probs, static_cast<size_t>(N) * V);
  cuda_kernels::CrossEntropyForward(stream_, losses, probs, logits, targets, N,
                                    V);
  CheckLaunch("CrossEntropyForward");
}

void CudaBackend::CrossEntropyBackward(float* dlogits, const float* probs,
                                       const int32_t* targets, float dloss,
                                       int N, int V) {
  UseDevice();
  WroteFloats(dlogits, static_cast<size_t>(N) * V);
  cuda_kernels::CrossEntropyBackward(stream_, dlogits, probs, targets, dloss, N,
                                     V);
  CheckLaunch("CrossEntropyBackward");
}

}  // namespace lmps
