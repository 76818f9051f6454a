// What the source files of CudaBackend (cuda_backend.h) share. The class is
// implemented in parts, one .cu file per concern:
// - cuda_backend.cu: creation, device selection, teardown and the deferred
//   error (Defer/TakeDeferred/CheckLaunch);
// - cuda_backend_memory.cu: Alloc/Free and the backend-owned device buffers
//   (Scratch, Bf16Scratch);
// - cuda_backend_transfers.cu: copies between host and device (direct,
//   through the pinned staging buffers, and the asynchronous tickets of
//   CopyToHostAsync/WaitCopy), PinHostMemory and Synchronize;
// - cuda_backend_gemm.cu: the matrix products (cuBLASLt, cuBLAS) and the
//   bf16 operands: ToBf16 and the bf16 weight cache;
// - cuda_backend_layers.cu: the layer functions of backend.h, which enqueue
//   the kernels of kernels.h and the products of gemm_plan.h.
//
// Internal to the CUDA backend: only its .cu files include it (it needs the
// CUDA runtime and cuBLAS headers).
//
// Thread-safety: CudaError, CublasError and PadBf16 are pure functions and
// safe from any thread; a LtPlan belongs to its CudaBackend and is used as
// the backend is (one thread at a time).
#ifndef LMPS_WORKER_BACKEND_CUDA_CUDA_BACKEND_INTERNAL_H_
#define LMPS_WORKER_BACKEND_CUDA_CUDA_BACKEND_INTERNAL_H_

#include <cublasLt.h>
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <cstddef>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"
#include "worker/backend/cuda/cuda_backend.h"

namespace lmps {
namespace cuda_backend_internal {

// InternalError "cuda: <what>: <error name> (<error string>)".
absl::Status CudaError(cudaError_t e, absl::string_view what);
// The same for a cuBLAS or cuBLASLt status.
absl::Status CublasError(cublasStatus_t s, absl::string_view what);

// bf16 scratch pieces start 256-byte aligned (tensor-core friendly): the
// operands that share one Bf16Scratch() allocation start PadBf16(n)
// elements apart, and Bf16Scratch() never returns fewer than kBf16Align.
constexpr size_t kBf16Align = 128;  // elements
inline size_t PadBf16(size_t n) {
  return (n + kBf16Align - 1) / kBf16Align * kBf16Align;
}

}  // namespace cuda_backend_internal

// A cached cuBLASLt configuration for one LtKey, built by LtGemm
// (cuda_backend_gemm.cu). Defined here because ~CudaBackend
// (cuda_backend.cu) destroys the cache.
struct CudaBackend::LtPlan {
  cublasLtMatmulDesc_t desc = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr;
  cublasLtMatmulAlgo_t algo{};
  bool usable = false;

  LtPlan() = default;
  LtPlan(const LtPlan&) = delete;
  LtPlan& operator=(const LtPlan&) = delete;
  ~LtPlan() {
    if (c != nullptr) cublasLtMatrixLayoutDestroy(c);
    if (b != nullptr) cublasLtMatrixLayoutDestroy(b);
    if (a != nullptr) cublasLtMatrixLayoutDestroy(a);
    if (desc != nullptr) cublasLtMatmulDescDestroy(desc);
  }
};

}  // namespace lmps

#endif  // LMPS_WORKER_BACKEND_CUDA_CUDA_BACKEND_INTERNAL_H_
