// CudaBackend: the Backend of one NVIDIA GPU.
//
// Backend memory is device memory (cudaMalloc, 256-byte aligned,
// zero-filled). All work runs in order on one CUDA stream owned by the
// backend: layer functions only enqueue work and return; Copy* and
// Synchronize() wait for it and report the first error since the last
// report (a failed kernel launch, cuBLAS call or scratch allocation of a
// layer function, or an asynchronous fault). Host copies of more than
// 1 MiB of pageable memory go through two pinned staging buffers, so the
// host-side memcpy of one chunk overlaps the DMA of the other; pinned host
// memory is copied directly. CopyToHostAsync into pinned memory (cudaMallocHost
// or PinHostMemory, i.e. cudaHostRegister) runs on a second stream, after
// an event recorded on the compute stream, so the DMA overlaps the kernels
// issued after it (the trainer's gradient push during backward); WaitCopy
// synchronises with the copy's own event and may run on another thread.
//
// Numerics. Matrix products (the linear layers and the four attention
// products) run on tensor cores with fp32 accumulation and fp32 output, in
// one of two input precisions (CudaBackendOptions::matmul_precision; the
// interface's tensors are fp32 either way):
// - kTf32: fp32 operands read directly, rounded by the tensor
//   cores to TF32, an 11-bit significand: unit roundoff 2^-11 = 4.9e-4 per
//   input (cuBLAS CUBLAS_COMPUTE_32F_FAST_TF32). NVIDIA_TF32_OVERRIDE=0 in
//   the environment gives full fp32 products. Tests: 1e-2 max-norm relative
//   error per product, 2e-2 per parameter gradient of a model step.
// - kBf16 (the default, as issue #4 asks: bf16 inputs, fp32
//   accumulation): each operand is first converted to bf16 on the device (round to
//   nearest even, kernel_math.h FloatToBf16Bits, bit-identical to
//   common/model/bf16.h), an 8-bit significand: unit roundoff 2^-8 = 3.9e-3 per
//   input, about 8x TF32's; the products then run with CUDA_R_16BF A/B,
//   CUBLAS_COMPUTE_32F and fp32 C/D (bias epilogue in fp32). Tests: 4e-2
//   per product, 8e-2 per parameter gradient of a model step, 4e-3 on the
//   loss. Gradients stay fp32: the weight-gradient products read bf16
//   copies of dout and inp but accumulate into the fp32 gradient. The
//   attention probabilities att (and dpreatt) are rounded to bf16 as
//   operands of their products too, as under PyTorch autocast.
// Both use cuBLASLt (with a fused bias epilogue) for MatmulForward and the
// two MatmulBackward products, and strided batched
// cublasGemmStridedBatchedEx over the heads for attention. All other
// kernels (embedding, LayerNorm, GELU, softmax, cross-entropy, residual,
// reductions for the bias and LayerNorm gradients) are fp32 custom kernels
// whose per-element math is worker/backend/cuda/kernel_math.h; they agree
// with the CPU reference to ~1e-6 relative.
//
// bf16 weights. In kBf16 the `weight` operand of MatmulForward and
// MatmulBackward (the parameters) is converted once and its bf16 copy kept
// (keyed by pointer and size) until backend memory overlapping it is
// written: by CopyToBackend (a parameter pull), Zero, Axpy, or an output of
// any layer function (EncoderBackward counts as writing dwte through the
// end of its allocation); Free of the allocation releases the copy. So a
// weight is converted once
// per parameter version, not per micro-batch. The copies take 2 bytes per
// weight element of device memory on top of the fp32 tensors. Activations
// and gradients are converted per call into backend-owned scratch (2 bytes
// per element of the call's operands).
//
// Determinism: no atomics. Reductions use a fixed order that depends only
// on the shapes; the embedding backward groups positions by token with a
// stable radix sort. cuBLAS is deterministic for a given GPU model and
// library version. So a run repeats bit for bit on the same GPU model.
//
// Causal attention materialises att[B,NH,T,T] as the interface requires;
// its products are computed over the full T x T square (the masked half is
// zeros), which costs 2x the causal FLOPs on those four products.
//
// Thread-safety: as Backend (one thread at a time). The calling thread may
// change between calls: every call makes the backend's device current.
#ifndef LMPS_WORKER_BACKEND_CUDA_CUDA_BACKEND_H_
#define LMPS_WORKER_BACKEND_CUDA_CUDA_BACKEND_H_

#include <array>
#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <string_view>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "worker/backend/backend.h"
#include "worker/backend/cuda/gemm_plan.h"

// Opaque CUDA handles (cuda_runtime_api.h, cublas_api.h, cublasLt.h), so
// this header needs no CUDA headers.
struct CUstream_st;
struct CUevent_st;
struct cublasContext;
struct cublasLtContext;

namespace lmps {

// The input precision of the matrix products; see Numerics above.
enum class MatmulPrecision {
  kTf32,  // fp32 operands, TF32 tensor cores
  kBf16,  // operands converted to bf16 on the device, fp32 accumulation
};

// "tf32" or "bf16".
std::string_view MatmulPrecisionName(MatmulPrecision precision);
// The inverse of MatmulPrecisionName; InvalidArgumentError otherwise.
absl::StatusOr<MatmulPrecision> ParseMatmulPrecision(std::string_view name);

struct CudaBackendOptions {
  // The CUDA device ordinal, in [0, cudaGetDeviceCount()).
  int device = 0;
  // TF32 stays the default until bf16 has been validated on hardware
  // (cuda_backend_test runs both).
  MatmulPrecision matmul_precision = MatmulPrecision::kBf16;
};

class CudaBackend final : public Backend {
 public:
  // The number of CUDA devices; FailedPreconditionError ("no CUDA device:
  // cudaGetDeviceCount returned ...") when cudaGetDeviceCount fails (no
  // driver, no GPU) or finds none.
  static absl::StatusOr<int> DeviceCount();

  // FailedPreconditionError as DeviceCount() when there is no GPU;
  // InvalidArgumentError for a device outside [0, count); InternalError
  // when the stream, cuBLAS or cuBLASLt cannot be set up.
  static absl::StatusOr<std::unique_ptr<CudaBackend>> Create(
      const CudaBackendOptions& options);

  ~CudaBackend() override;

  std::string_view name() const override { return "cuda"; }
  int device() const { return device_; }
  // "NVIDIA H100 80GB HBM3 (sm_90, 132 SMs)", for logs.
  const std::string& device_description() const { return description_; }
  // Linear-layer products that cuBLASLt could not run (no algorithm for the
  // shape and alignment) and that went through cublasGemmEx plus a bias
  // kernel instead. For tests and benchmarks.
  int64_t gemm_fallbacks() const { return gemm_fallbacks_; }
  MatmulPrecision matmul_precision() const { return precision_; }
  // kBf16: how many times a weight tensor has been converted to bf16 (the
  // conversions the bf16 weight cache did not avoid). For tests.
  int64_t bf16_weight_conversions() const { return bf16_weight_conversions_; }

  absl::StatusOr<float*> Alloc(size_t floats) override;
  absl::StatusOr<int32_t*> AllocInt32(size_t n) override;
  void Free(float* p) override;
  void Free(int32_t* p) override;
  absl::Status CopyToBackend(float* dst, const float* host_src,
                             size_t n) override;
  absl::Status CopyToBackend(int32_t* dst, const int32_t* host_src,
                             size_t n) override;
  absl::Status CopyToHost(float* host_dst, const float* src, size_t n) override;
  absl::Status Synchronize() override;
  // Into pinned memory: asynchronous on the copy stream (ticket > 0);
  // otherwise CopyToHost (ticket 0).
  absl::StatusOr<uint64_t> CopyToHostAsync(float* host_dst, const float* src,
                                           size_t n) override;
  absl::Status WaitCopy(uint64_t ticket) override;
  absl::Status PinHostMemory(void* p, size_t bytes) override;
  void UnpinHostMemory(void* p) override;

  void Zero(float* p, size_t n) override;
  void Axpy(float* y, float alpha, const float* x, size_t n) override;

  void EncoderForward(float* out, const int32_t* inp, const float* wte,
                      const float* wpe, int B, int T, int C) override;
  void EncoderBackward(float* dwte, float* dwpe, const float* dout,
                       const int32_t* inp, int B, int T, int C) override;
  void LayerNormForward(float* out, float* mean, float* rstd, const float* inp,
                        const float* weight, const float* bias, int N,
                        int C) override;
  void LayerNormBackward(float* dinp, float* dweight, float* dbias,
                         const float* dout, const float* inp,
                         const float* weight, const float* mean,
                         const float* rstd, int N, int C) override;
  void MatmulForward(float* out, const float* inp, const float* weight,
                     const float* bias, int N, int C, int OC) override;
  void MatmulBackward(float* dinp, float* dweight, float* dbias,
                      const float* dout, const float* inp, const float* weight,
                      int N, int C, int OC) override;
  void AttentionForward(float* out, float* att, const float* qkv, int B, int T,
                        int C, int NH) override;
  void AttentionBackward(float* dqkv, float* scratch, const float* dout,
                         const float* qkv, const float* att, int B, int T,
                         int C, int NH) override;
  void GeluForward(float* out, const float* inp, size_t N) override;
  void GeluBackward(float* dinp, const float* inp, const float* dout,
                    size_t N) override;
  void ResidualForward(float* out, const float* inp1, const float* inp2,
                       size_t N) override;
  void ResidualBackward(float* dinp1, float* dinp2, const float* dout,
                        size_t N) override;
  void CrossEntropyForward(float* losses, float* probs, const float* logits,
                           const int32_t* targets, int N, int V) override;
  void CrossEntropyBackward(float* dlogits, const float* probs,
                            const int32_t* targets, float dloss, int N,
                            int V) override;

 private:
  // A cached cuBLASLt matmul configuration (cuda_backend_internal.h).
  struct LtPlan;
  // Key of a LtPlan: transposes, m, n, k, leading dimensions, bias,
  // pointer alignments, bf16 inputs.
  using LtKey = std::array<int64_t, 13>;
  // The bf16 copy of a weight tensor (kBf16).
  struct Bf16Weight {
    size_t n = 0;              // elements
    uint16_t* data = nullptr;  // device memory, n bf16
    bool valid = false;        // false: the fp32 tensor was written since
  };

  explicit CudaBackend(const CudaBackendOptions& options);
  absl::Status Init();

  // Makes device_ current for the calling thread.
  void UseDevice();
  // Keeps the first error for the next Copy*/Synchronize.
  void Defer(absl::Status status);
  absl::Status TakeDeferred();
  void CheckLaunch(const char* what);

  absl::StatusOr<void*> AllocBytes(size_t bytes);
  void FreeBytes(void* p);
  absl::Status CopyIn(void* dst, const void* host_src, size_t bytes);
  absl::Status CopyOut(void* host_dst, const void* src, size_t bytes);
  // Backend-owned device scratch of at least `bytes`, stream-ordered: valid
  // until the next call that asks for scratch. Errors are deferred
  // (nullptr).
  void* Scratch(size_t bytes);
  // Pinned staging buffers, created on first use; false if unavailable.
  bool EnsureStaging();
  // Grows *buf (device memory, *bytes long) to at least `bytes` after
  // waiting for queued work that may still use it. Errors are deferred
  // (nullptr).
  void* GrowDeviceBuffer(void** buf, size_t* have, size_t bytes,
                         const char* what);

  bool bf16() const { return precision_ == MatmulPrecision::kBf16; }
  // kBf16: bf16 scratch of `elements` values, separate from Scratch() and
  // with the same lifetime rule (valid until the next Bf16Scratch call).
  // Errors are deferred (nullptr).
  uint16_t* Bf16Scratch(size_t elements);
  // Enqueues dst[i] = bf16(src[i]) for i in [0, n).
  void ToBf16(uint16_t* dst, const float* src, size_t n);
  // kBf16: the bf16 copy of weight[0, n), converted now if there is no
  // valid one (see "bf16 weights" above). Errors are deferred (nullptr).
  const uint16_t* Bf16WeightOf(const float* weight, size_t n);
  // Backend memory [p, p + bytes) is being written: invalidates the bf16
  // copies of weights that overlap it. Cheap when there are none.
  void Wrote(const void* p, size_t bytes);
  void WroteFloats(const float* p, size_t n) { Wrote(p, n * sizeof(float)); }
  // Frees the bf16 weight copies overlapping [p, p + bytes).
  void DropBf16Weights(const void* p, size_t bytes);
  // Calls f(iterator) for each bf16_weights_ entry whose fp32 tensor
  // overlaps [p, p + bytes); f may erase the entry.
  template <typename F>
  void ForEachBf16WeightIn(const void* p, size_t bytes, F f);
  // The bytes from p to the end of the Alloc/AllocInt32 allocation holding
  // it; 0 when p is in none.
  size_t AllocationBytesFrom(const void* p) const;

  // Runs one plan: batch 1 through cuBLASLt with an optional bias epilogue
  // (bias[m] added to every column of C), falling back to cublasGemmEx plus
  // a bias kernel when cuBLASLt cannot; batched through
  // cublasGemmStridedBatchedEx (bias must be null). With a16 and b16 (both
  // or neither) the products read those bf16 operands, laid out exactly as
  // plan.a and plan.b (same leading dimensions and strides, in elements),
  // instead of plan.a and plan.b, and compute in CUBLAS_COMPUTE_32F;
  // otherwise fp32 operands in TF32.
  void Gemm(const cuda_gemm::GemmPlan& plan, const float* bias,
            const uint16_t* a16 = nullptr, const uint16_t* b16 = nullptr);
  // False when cuBLASLt has no algorithm or fails to launch.
  bool LtGemm(const cuda_gemm::GemmPlan& plan, const float* bias, const void* a,
              const void* b, bool bf16_inputs);

  const int device_;
  const MatmulPrecision precision_;
  std::string description_;
  CUstream_st* stream_ = nullptr;
  // Asynchronous copies to the host (created on first use), and the
  // pending ones: ticket -> the event recorded after the copy.
  CUstream_st* copy_stream_ = nullptr;
  std::mutex copies_mu_;
  uint64_t copies_issued_ = 0;                  // guarded by copies_mu_
  std::map<uint64_t, CUevent_st*> copies_;      // guarded by copies_mu_
  std::set<void*> pinned_;  // host memory registered by PinHostMemory
  cublasContext* cublas_ = nullptr;
  cublasLtContext* cublaslt_ = nullptr;
  void* workspace_ = nullptr;  // cuBLAS(Lt) workspace, shared (one stream)
  size_t workspace_bytes_ = 0;
  void* scratch_ = nullptr;
  size_t scratch_bytes_ = 0;
  static constexpr int kStagingBuffers = 2;
  std::array<void*, kStagingBuffers> staging_{};
  std::array<CUevent_st*, kStagingBuffers> staging_done_{};
  bool staging_failed_ = false;
  std::map<LtKey, std::unique_ptr<LtPlan>> lt_plans_;
  int64_t gemm_fallbacks_ = 0;
  // kBf16 state.
  void* bf16_scratch_ = nullptr;
  size_t bf16_scratch_bytes_ = 0;
  // Keyed by the fp32 tensor's address.
  std::map<uintptr_t, Bf16Weight> bf16_weights_;
  // Live allocations of AllocBytes: address -> bytes.
  std::map<uintptr_t, size_t> allocations_;
  size_t bf16_weights_max_bytes_ = 0;  // of any entry's fp32 tensor
  int64_t bf16_weight_conversions_ = 0;
  absl::Status deferred_;
};

}  // namespace lmps

#endif  // LMPS_WORKER_BACKEND_CUDA_CUDA_BACKEND_H_
