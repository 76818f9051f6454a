// CudaBackend (cuda_backend.h): creation, device selection, teardown and the
// deferred error. The rest of the class is in the cuda_backend_*.cu files
// (cuda_backend_internal.h lists them).
#include "worker/backend/cuda/cuda_backend.h"

#include <cublasLt.h>
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "worker/backend/cuda/cuda_backend_internal.h"

namespace lmps {
namespace cuda_backend_internal {

absl::Status CudaError(cudaError_t e, absl::string_view what) {
  return absl::InternalError(absl::StrCat("cuda: ", what, ": ",
                                          cudaGetErrorName(e), " (",
                                          cudaGetErrorString(e), ")"));
}

absl::Status CublasError(cublasStatus_t s, absl::string_view what) {
  return absl::InternalError(absl::StrCat("cuda: ", what, ": ",
                                          cublasGetStatusName(s), " (",
                                          cublasGetStatusString(s), ")"));
}

}  // namespace cuda_backend_internal

namespace {

using cuda_backend_internal::CublasError;
using cuda_backend_internal::CudaError;

// cuBLASLt's recommended workspace on Hopper.
constexpr size_t kWorkspaceBytes = size_t{32} << 20;

}  // namespace

std::string_view MatmulPrecisionName(MatmulPrecision precision) {
  switch (precision) {
    case MatmulPrecision::kTf32:
      return "tf32";
    case MatmulPrecision::kBf16:
      return "bf16";
  }
  return "unknown";
}

absl::StatusOr<MatmulPrecision> ParseMatmulPrecision(std::string_view name) {
  if (name == "tf32") return MatmulPrecision::kTf32;
  if (name == "bf16") return MatmulPrecision::kBf16;
  return absl::InvalidArgumentError(absl::StrCat(
      "unknown matmul precision '", std::string(name), "'; valid: tf32, bf16"));
}

// ---------------------------------------------------------------------------
// Setup.
// ---------------------------------------------------------------------------

absl::StatusOr<int> CudaBackend::DeviceCount() {
  int count = 0;
  const cudaError_t e = cudaGetDeviceCount(&count);
  if (e != cudaSuccess) {
    cudaGetLastError();
    return absl::FailedPreconditionError(
        absl::StrCat("no CUDA device: cudaGetDeviceCount returned ",
                     cudaGetErrorName(e), " (", cudaGetErrorString(e), ")"));
  }
  if (count == 0) {
    return absl::FailedPreconditionError(
        "no CUDA device: cudaGetDeviceCount returned 0 devices");
  }
  return count;
}

absl::StatusOr<std::unique_ptr<CudaBackend>> CudaBackend::Create(
    const CudaBackendOptions& options) {
  absl::StatusOr<int> count = DeviceCount();
  if (!count.ok()) return count.status();
  if (options.device < 0 || options.device >= *count) {
    return absl::InvalidArgumentError(absl::StrCat(
        "cuda: device ", options.device, " is outside [0, ", *count, ")"));
  }
  if (options.matmul_precision != MatmulPrecision::kTf32 &&
      options.matmul_precision != MatmulPrecision::kBf16) {
    return absl::InvalidArgumentError("cuda: invalid matmul_precision");
  }
  std::unique_ptr<CudaBackend> backend(new CudaBackend(options));
  if (absl::Status s = backend->Init(); !s.ok()) return s;
  return backend;
}

CudaBackend::CudaBackend(const CudaBackendOptions& options)
    : device_(options.device), precision_(options.matmul_precision) {}

absl::Status CudaBackend::Init() {
  cudaError_t e = cudaSetDevice(device_);
  if (e != cudaSuccess) return CudaError(e, "cudaSetDevice");
  cudaDeviceProp prop;
  e = cudaGetDeviceProperties(&prop, device_);
  if (e != cudaSuccess) return CudaError(e, "cudaGetDeviceProperties");
  description_ = absl::StrCat(prop.name, " (sm_", prop.major, prop.minor, ", ",
                              prop.multiProcessorCount, " SMs)");
  e = cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking);
  if (e != cudaSuccess) return CudaError(e, "cudaStreamCreate");
  cublasStatus_t s = cublasCreate(&cublas_);
  if (s != CUBLAS_STATUS_SUCCESS) return CublasError(s, "cublasCreate");
  s = cublasSetStream(cublas_, stream_);
  if (s != CUBLAS_STATUS_SUCCESS) return CublasError(s, "cublasSetStream");
  s = cublasLtCreate(&cublaslt_);
  if (s != CUBLAS_STATUS_SUCCESS) return CublasError(s, "cublasLtCreate");
  e = cudaMalloc(&workspace_, kWorkspaceBytes);
  if (e != cudaSuccess) {
    cudaGetLastError();
    workspace_ = nullptr;
    return CudaError(e, "cudaMalloc of the cuBLAS workspace");
  }
  workspace_bytes_ = kWorkspaceBytes;
  // Both libraries share the workspace: they run in order on one stream.
  s = cublasSetWorkspace(cublas_, workspace_, workspace_bytes_);
  if (s != CUBLAS_STATUS_SUCCESS) return CublasError(s, "cublasSetWorkspace");
  return absl::OkStatus();
}

CudaBackend::~CudaBackend() {
  UseDevice();
  if (stream_ != nullptr) cudaStreamSynchronize(stream_);
  lt_plans_.clear();
  DropBf16Weights(nullptr, SIZE_MAX);
  if (bf16_scratch_ != nullptr) cudaFree(bf16_scratch_);
  if (cublaslt_ != nullptr) cublasLtDestroy(cublaslt_);
  if (cublas_ != nullptr) cublasDestroy(cublas_);
  if (workspace_ != nullptr) cudaFree(workspace_);
  if (scratch_ != nullptr) cudaFree(scratch_);
  for (int k = 0; k < kStagingBuffers; ++k) {
    if (staging_[k] != nullptr) cudaFreeHost(staging_[k]);
    if (staging_done_[k] != nullptr) cudaEventDestroy(staging_done_[k]);
  }
  if (copy_stream_ != nullptr) {
    cudaStreamSynchronize(copy_stream_);
    for (auto& [ticket, done] : copies_) cudaEventDestroy(done);
    cudaStreamDestroy(copy_stream_);
  }
  for (void* p : pinned_) cudaHostUnregister(p);
  if (stream_ != nullptr) cudaStreamDestroy(stream_);
}

void CudaBackend::UseDevice() {
  int current = -1;
  if (cudaGetDevice(&current) != cudaSuccess || current != device_) {
    const cudaError_t e = cudaSetDevice(device_);
    if (e != cudaSuccess) Defer(CudaError(e, "cudaSetDevice"));
  }
}

void CudaBackend::Defer(absl::Status status) {
  deferred_.Update(std::move(status));  // keeps the first error
}

absl::Status CudaBackend::TakeDeferred() {
  absl::Status s;
  swap(s, deferred_);
  return s;
}

void CudaBackend::CheckLaunch(const char* what) {
  const cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) Defer(CudaError(e, what));
}

}  // namespace lmps
