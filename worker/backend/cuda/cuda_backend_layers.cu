#include "worker/backend/cuda/cuda_backend.h"

#include <cublasLt.h>
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <iterator>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "worker/backend/cuda/kernels.h"

namespace lmps {
namespace {

using cuda_gemm::GemmPlan;

// cuBLASLt's recommended workspace on Hopper.
constexpr size_t kWorkspaceBytes = size_t{32} << 20;
// Host copies up to this size go straight through cudaMemcpyAsync; larger
// ones of pageable memory are pipelined through the pinned staging buffers.
constexpr size_t kDirectCopyBytes = size_t{1} << 20;
constexpr size_t kStagingBytes = size_t{8} << 20;
constexpr size_t kScratchRound = size_t{1} << 20;

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

// The largest power of two (up to 256) dividing the address.
int64_t Alignment(const void* p) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  if (a == 0) return 256;
  return std::min<int64_t>(256, static_cast<int64_t>(a & (~a + 1)));
}

cublasOperation_t Op(bool trans) { return trans ? CUBLAS_OP_T : CUBLAS_OP_N; }

// bf16 scratch pieces start 256-byte aligned (tensor-core friendly).
constexpr size_t kBf16Align = 128;  // elements
size_t PadBf16(size_t n) {
  return (n + kBf16Align - 1) / kBf16Align * kBf16Align;
}

// The element of `image`, the bf16 copy of the fp32 tensor at `base`
// (element for element), that corresponds to `p`; null without an image
// (kTf32: Gemm then reads the fp32 operands).
const uint16_t* At(const uint16_t* image, const float* base, const float* p) {
  return image == nullptr ? nullptr : image + (p - base);
}

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

// A cached cuBLASLt configuration for one LtKey.
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

// ---------------------------------------------------------------------------
// Memory.
// ---------------------------------------------------------------------------

absl::StatusOr<void*> CudaBackend::AllocBytes(size_t bytes) {
  UseDevice();
  bytes = std::max<size_t>(bytes, 4);  // Alloc(0) is a valid pointer too
  void* p = nullptr;
  cudaError_t e = cudaMalloc(&p, bytes);
  if (e == cudaErrorMemoryAllocation) {
    cudaGetLastError();
    size_t free_bytes = 0, total_bytes = 0;
    cudaMemGetInfo(&free_bytes, &total_bytes);
    cudaGetLastError();
    return absl::ResourceExhaustedError(
        absl::StrCat("cuda: out of device memory: cudaMalloc of ", bytes,
                     " bytes on device ", device_, " failed (", free_bytes,
                     " of ", total_bytes, " bytes free)"));
  }
  if (e != cudaSuccess) {
    cudaGetLastError();
    return CudaError(e, "cudaMalloc");
  }
  e = cudaMemsetAsync(p, 0, bytes, stream_);
  if (e != cudaSuccess) {
    cudaFree(p);
    return CudaError(e, "cudaMemsetAsync");
  }
  allocations_[reinterpret_cast<uintptr_t>(p)] = bytes;
  return p;
}

void CudaBackend::FreeBytes(void* p) {
  if (p == nullptr) return;
  UseDevice();
  // A later Alloc may return these addresses: drop the bf16 copies of
  // weights in the allocation, not just invalidate them.
  auto alloc = allocations_.find(reinterpret_cast<uintptr_t>(p));
  if (alloc != allocations_.end()) {
    DropBf16Weights(p, alloc->second);
    allocations_.erase(alloc);
  } else {
    DropBf16Weights(nullptr, SIZE_MAX);  // not from Alloc: be safe
  }
  // cudaFree waits for the device, so queued work using p finishes first.
  const cudaError_t e = cudaFree(p);
  if (e != cudaSuccess) Defer(CudaError(e, "cudaFree"));
}

absl::StatusOr<float*> CudaBackend::Alloc(size_t floats) {
  absl::StatusOr<void*> p = AllocBytes(floats * sizeof(float));
  if (!p.ok()) return p.status();
  return static_cast<float*>(*p);
}

absl::StatusOr<int32_t*> CudaBackend::AllocInt32(size_t n) {
  absl::StatusOr<void*> p = AllocBytes(n * sizeof(int32_t));
  if (!p.ok()) return p.status();
  return static_cast<int32_t*>(*p);
}

void CudaBackend::Free(float* p) { FreeBytes(p); }
void CudaBackend::Free(int32_t* p) { FreeBytes(p); }

size_t CudaBackend::AllocationBytesFrom(const void* p) const {
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  auto it = allocations_.upper_bound(a);
  if (it == allocations_.begin()) return 0;
  --it;
  const uintptr_t end = it->first + it->second;
  return a < end ? end - a : 0;
}

void* CudaBackend::GrowDeviceBuffer(void** buf, size_t* have, size_t bytes,
                                    const char* what) {
  if (bytes <= *have) return *buf;
  // Growing: the old buffer may still be in use by queued work.
  cudaError_t e = cudaStreamSynchronize(stream_);
  if (e != cudaSuccess) {
    Defer(CudaError(e, "cudaStreamSynchronize"));
    return nullptr;
  }
  if (*buf != nullptr) cudaFree(*buf);
  *buf = nullptr;
  *have = 0;
  const size_t want = (std::max(bytes, bytes / 2 * 3) + kScratchRound - 1) /
                      kScratchRound * kScratchRound;
  e = cudaMalloc(buf, want);
  if (e != cudaSuccess) {
    cudaGetLastError();
    *buf = nullptr;
    Defer(absl::ResourceExhaustedError(
        absl::StrCat("cuda: cannot allocate ", want, " bytes of ", what, ": ",
                     cudaGetErrorString(e))));
    return nullptr;
  }
  *have = want;
  return *buf;
}

void* CudaBackend::Scratch(size_t bytes) {
  return GrowDeviceBuffer(&scratch_, &scratch_bytes_, bytes, "scratch");
}

uint16_t* CudaBackend::Bf16Scratch(size_t elements) {
  // Never empty, so nullptr means an error even for zero-sized operands.
  elements = std::max(elements, kBf16Align);
  return static_cast<uint16_t*>(
      GrowDeviceBuffer(&bf16_scratch_, &bf16_scratch_bytes_,
                       elements * sizeof(uint16_t), "bf16 scratch"));
}

// ---------------------------------------------------------------------------
// bf16 operands.
// ---------------------------------------------------------------------------

void CudaBackend::ToBf16(uint16_t* dst, const float* src, size_t n) {
  cuda_kernels::FloatToBf16(stream_, dst, src, n);
  CheckLaunch("FloatToBf16");
}

const uint16_t* CudaBackend::Bf16WeightOf(const float* weight, size_t n) {
  const uintptr_t key = reinterpret_cast<uintptr_t>(weight);
  Bf16Weight& w = bf16_weights_[key];
  if (w.valid && w.n == n) return w.data;
  if (w.data == nullptr || w.n != n) {
    if (w.data != nullptr) cudaFree(w.data);  // waits for queued readers
    w.data = nullptr;
    w.valid = false;
    w.n = n;
    const cudaError_t e = cudaMalloc(reinterpret_cast<void**>(&w.data),
                                     std::max<size_t>(n, 1) * sizeof(uint16_t));
    if (e != cudaSuccess) {
      cudaGetLastError();
      w.data = nullptr;
      bf16_weights_.erase(key);
      Defer(absl::ResourceExhaustedError(absl::StrCat(
          "cuda: cannot allocate ", n * sizeof(uint16_t),
          " bytes for the bf16 copy of a weight: ", cudaGetErrorString(e))));
      return nullptr;
    }
    bf16_weights_max_bytes_ =
        std::max(bf16_weights_max_bytes_, n * sizeof(float));
  }
  // Stream order: earlier products reading the old copy run first.
  ToBf16(w.data, weight, n);
  w.valid = true;
  ++bf16_weight_conversions_;
  return w.data;
}

template <typename F>
void CudaBackend::ForEachBf16WeightIn(const void* p, size_t bytes, F f) {
  if (bf16_weights_.empty() || bytes == 0) return;
  const uintptr_t begin = reinterpret_cast<uintptr_t>(p);
  const uintptr_t end =
      bytes > UINTPTR_MAX - begin ? UINTPTR_MAX : begin + bytes;
  // An entry overlaps [begin, end) iff key < end and key + its bytes >
  // begin; every entry is at most bf16_weights_max_bytes_ long.
  const uintptr_t lo =
      begin > bf16_weights_max_bytes_ ? begin - bf16_weights_max_bytes_ : 0;
  for (auto it = bf16_weights_.upper_bound(lo);
       it != bf16_weights_.end() && it->first < end;) {
    auto next = std::next(it);
    if (it->first + it->second.n * sizeof(float) > begin) f(it);
    it = next;
  }
}

void CudaBackend::Wrote(const void* p, size_t bytes) {
  ForEachBf16WeightIn(p, bytes, [](auto it) { it->second.valid = false; });
}

void CudaBackend::DropBf16Weights(const void* p, size_t bytes) {
  ForEachBf16WeightIn(p, bytes, [this](auto it) {
    // cudaFree waits for queued products that read the copy.
    if (it->second.data != nullptr) cudaFree(it->second.data);
    bf16_weights_.erase(it);
  });
  if (bf16_weights_.empty()) bf16_weights_max_bytes_ = 0;
}

bool CudaBackend::EnsureStaging() {
  if (staging_failed_) return false;
  if (staging_[0] != nullptr) return true;
  for (int k = 0; k < kStagingBuffers; ++k) {
    if (cudaMallocHost(&staging_[k], kStagingBytes) != cudaSuccess ||
        cudaEventCreateWithFlags(&staging_done_[k], cudaEventDisableTiming) !=
            cudaSuccess) {
      cudaGetLastError();
      for (int j = 0; j <= k; ++j) {
        if (staging_[j] != nullptr) cudaFreeHost(staging_[j]);
        if (staging_done_[j] != nullptr) cudaEventDestroy(staging_done_[j]);
        staging_[j] = nullptr;
        staging_done_[j] = nullptr;
      }
      staging_failed_ = true;  // copy pageable memory directly from now on
      return false;
    }
  }
  return true;
}

namespace {

// Page-locked (cudaMallocHost / cudaHostRegister) host memory can be the
// source or destination of a DMA directly.
bool IsPinned(const void* host) {
  cudaPointerAttributes attr;
  if (cudaPointerGetAttributes(&attr, host) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  return attr.type == cudaMemoryTypeHost;
}

}  // namespace

absl::Status CudaBackend::CopyIn(void* dst, const void* host_src,
                                 size_t bytes) {
  UseDevice();
  Wrote(dst, bytes);
  if (bytes > 0) {
    if (bytes <= kDirectCopyBytes || IsPinned(host_src) || !EnsureStaging()) {
      const cudaError_t e = cudaMemcpyAsync(dst, host_src, bytes,
                                            cudaMemcpyHostToDevice, stream_);
      if (e != cudaSuccess) Defer(CudaError(e, "cudaMemcpyAsync to device"));
    } else {
      // Fill one staging buffer while the other one's DMA runs.
      char* d = static_cast<char*>(dst);
      const char* s = static_cast<const char*>(host_src);
      for (size_t off = 0, i = 0; off < bytes; off += kStagingBytes, ++i) {
        const size_t k = i % kStagingBuffers;
        const size_t len = std::min(kStagingBytes, bytes - off);
        cudaError_t e = cudaEventSynchronize(staging_done_[k]);
        if (e == cudaSuccess) {
          std::memcpy(staging_[k], s + off, len);
          e = cudaMemcpyAsync(d + off, staging_[k], len, cudaMemcpyHostToDevice,
                              stream_);
        }
        if (e == cudaSuccess) e = cudaEventRecord(staging_done_[k], stream_);
        if (e != cudaSuccess) {
          Defer(CudaError(e, "staged copy to device"));
          break;
        }
      }
    }
  }
  const cudaError_t e = cudaStreamSynchronize(stream_);
  if (e != cudaSuccess) Defer(CudaError(e, "cudaStreamSynchronize"));
  return TakeDeferred();
}

absl::Status CudaBackend::CopyOut(void* host_dst, const void* src,
                                  size_t bytes) {
  UseDevice();
  if (bytes > 0) {
    if (bytes <= kDirectCopyBytes || IsPinned(host_dst) || !EnsureStaging()) {
      const cudaError_t e = cudaMemcpyAsync(host_dst, src, bytes,
                                            cudaMemcpyDeviceToHost, stream_);
      if (e != cudaSuccess) Defer(CudaError(e, "cudaMemcpyAsync to host"));
    } else {
      // Chunk i goes into staging buffer i % 2; while its DMA runs the host
      // drains chunk i - 1 (chunk i - 2, the previous user of the buffer,
      // was drained before chunk i was enqueued).
      char* d = static_cast<char*>(host_dst);
      const char* s = static_cast<const char*>(src);
      const size_t chunks = (bytes + kStagingBytes - 1) / kStagingBytes;
      auto len_of = [&](size_t i) {
        return std::min(kStagingBytes, bytes - i * kStagingBytes);
      };
      cudaError_t e = cudaSuccess;
      for (size_t i = 0; i <= chunks && e == cudaSuccess; ++i) {
        if (i < chunks) {
          const size_t k = i % kStagingBuffers;
          e = cudaMemcpyAsync(staging_[k], s + i * kStagingBytes, len_of(i),
                              cudaMemcpyDeviceToHost, stream_);
          if (e == cudaSuccess) e = cudaEventRecord(staging_done_[k], stream_);
        }
        if (i > 0 && e == cudaSuccess) {
          const size_t k = (i - 1) % kStagingBuffers;
          e = cudaEventSynchronize(staging_done_[k]);
          if (e == cudaSuccess) {
            std::memcpy(d + (i - 1) * kStagingBytes, staging_[k],
                        len_of(i - 1));
          }
        }
      }
      if (e != cudaSuccess) Defer(CudaError(e, "staged copy to host"));
    }
  }
  const cudaError_t e = cudaStreamSynchronize(stream_);
  if (e != cudaSuccess) Defer(CudaError(e, "cudaStreamSynchronize"));
  return TakeDeferred();
}

absl::Status CudaBackend::CopyToBackend(float* dst, const float* host_src,
                                        size_t n) {
  return CopyIn(dst, host_src, n * sizeof(float));
}

absl::Status CudaBackend::CopyToBackend(int32_t* dst, const int32_t* host_src,
                                        size_t n) {
  return CopyIn(dst, host_src, n * sizeof(int32_t));
}

absl::Status CudaBackend::CopyToHost(float* host_dst, const float* src,
                                     size_t n) {
  return CopyOut(host_dst, src, n * sizeof(float));
}

absl::StatusOr<uint64_t> CudaBackend::CopyToHostAsync(float* host_dst,
                                                      const float* src,
                                                      size_t n) {
  if (n == 0 || !IsPinned(host_dst)) {
    absl::Status s = CopyToHost(host_dst, src, n);
    if (!s.ok()) return s;
    return 0;
  }
  UseDevice();
  if (absl::Status s = TakeDeferred(); !s.ok()) return s;
  cudaError_t e = cudaSuccess;
  if (copy_stream_ == nullptr) {
    e = cudaStreamCreateWithFlags(&copy_stream_, cudaStreamNonBlocking);
    if (e != cudaSuccess) {
      copy_stream_ = nullptr;
      return CudaError(e, "cudaStreamCreate (copy stream)");
    }
  }
  // The copy starts once the work issued so far (which produced src) is
  // done; the compute stream does not wait for the copy.
  cudaEvent_t issued = nullptr, done = nullptr;
  e = cudaEventCreateWithFlags(&issued, cudaEventDisableTiming);
  if (e == cudaSuccess) e = cudaEventRecord(issued, stream_);
  if (e == cudaSuccess) e = cudaStreamWaitEvent(copy_stream_, issued, 0);
  if (e == cudaSuccess) {
    e = cudaMemcpyAsync(host_dst, src, n * sizeof(float),
                        cudaMemcpyDeviceToHost, copy_stream_);
  }
  if (e == cudaSuccess) e = cudaEventCreateWithFlags(&done, cudaEventDisableTiming);
  if (e == cudaSuccess) e = cudaEventRecord(done, copy_stream_);
  // Destroying a recorded event is safe: the wait on it is enqueued.
  if (issued != nullptr) cudaEventDestroy(issued);
  if (e != cudaSuccess) {
    if (done != nullptr) cudaEventDestroy(done);
    cudaGetLastError();
    return CudaError(e, "asynchronous copy to the host");
  }
  std::lock_guard<std::mutex> lock(copies_mu_);
  const uint64_t ticket = ++copies_issued_;
  copies_[ticket] = done;
  return ticket;
}

absl::Status CudaBackend::WaitCopy(uint64_t ticket) {
  cudaEvent_t done = nullptr;
  {
    std::lock_guard<std::mutex> lock(copies_mu_);
    auto it = copies_.find(ticket);
    // Gone: waited for already (directly or through a later ticket).
    if (it == copies_.end()) return absl::OkStatus();
    done = it->second;
  }
  // Possibly another thread than the backend's user: set the device here
  // (per thread) without touching the deferred-error state.
  cudaError_t e = cudaSetDevice(device_);
  if (e == cudaSuccess) e = cudaEventSynchronize(done);
  {
    // Copies complete in order: every ticket up to this one has landed.
    std::lock_guard<std::mutex> lock(copies_mu_);
    for (auto it = copies_.begin(); it != copies_.end() && it->first <= ticket;) {
      cudaEventDestroy(it->second);
      it = copies_.erase(it);
    }
  }
  if (e != cudaSuccess) return CudaError(e, "waiting for a copy to the host");
  return absl::OkStatus();
}

absl::Status CudaBackend::PinHostMemory(void* p, size_t bytes) {
  if (p == nullptr || bytes == 0 || pinned_.count(p) > 0) {
    return absl::OkStatus();
  }
  UseDevice();
  const cudaError_t e = cudaHostRegister(p, bytes, cudaHostRegisterDefault);
  if (e != cudaSuccess) {
    cudaGetLastError();
    return CudaError(e, "cudaHostRegister");
  }
  pinned_.insert(p);
  return absl::OkStatus();
}

void CudaBackend::UnpinHostMemory(void* p) {
  auto it = pinned_.find(p);
  if (it == pinned_.end()) return;
  UseDevice();
  cudaHostUnregister(p);
  pinned_.erase(it);
}

absl::Status CudaBackend::Synchronize() {
  UseDevice();
  const cudaError_t e = cudaStreamSynchronize(stream_);
  if (e != cudaSuccess) Defer(CudaError(e, "cudaStreamSynchronize"));
  return TakeDeferred();
}

// ---------------------------------------------------------------------------
// GEMM.
// ---------------------------------------------------------------------------

bool CudaBackend::LtGemm(const GemmPlan& p, const float* bias, const void* a,
                         const void* b, bool bf16_inputs) {
  const LtKey key = {p.trans_a,    p.trans_b,    p.m,
                     p.n,          p.k,          p.lda,
                     p.ldb,        p.ldc,        bias != nullptr,
                     Alignment(a), Alignment(b), Alignment(p.c),
                     bf16_inputs};
  std::unique_ptr<LtPlan>& slot = lt_plans_[key];
  if (slot == nullptr) {
    slot = std::make_unique<LtPlan>();
    LtPlan& plan = *slot;
    auto ok = [](cublasStatus_t s) { return s == CUBLAS_STATUS_SUCCESS; };
    const cublasOperation_t ta = Op(p.trans_a), tb = Op(p.trans_b);
    const cublasLtEpilogue_t epilogue =
        bias != nullptr ? CUBLASLT_EPILOGUE_BIAS : CUBLASLT_EPILOGUE_DEFAULT;
    cublasLtMatmulPreference_t pref = nullptr;
    // fp32 alpha/beta, C, D and bias either way.
    const cublasComputeType_t compute =
        bf16_inputs ? CUBLAS_COMPUTE_32F : CUBLAS_COMPUTE_32F_FAST_TF32;
    const cudaDataType_t in_type = bf16_inputs ? CUDA_R_16BF : CUDA_R_32F;
    bool good = ok(cublasLtMatmulDescCreate(&plan.desc, compute, CUDA_R_32F)) &&
                ok(cublasLtMatmulDescSetAttribute(
                    plan.desc, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof(ta))) &&
                ok(cublasLtMatmulDescSetAttribute(
                    plan.desc, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof(tb))) &&
                ok(cublasLtMatmulDescSetAttribute(plan.desc,
                                                  CUBLASLT_MATMUL_DESC_EPILOGUE,
                                                  &epilogue, sizeof(epilogue)));
    if (good && bias != nullptr) {
      good = ok(cublasLtMatmulDescSetAttribute(
          plan.desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias, sizeof(bias)));
    }
    // Stored (pre-op) shapes, column-major.
    good =
        good &&
        ok(cublasLtMatrixLayoutCreate(&plan.a, in_type, p.trans_a ? p.k : p.m,
                                      p.trans_a ? p.m : p.k, p.lda)) &&
        ok(cublasLtMatrixLayoutCreate(&plan.b, in_type, p.trans_b ? p.n : p.k,
                                      p.trans_b ? p.k : p.n, p.ldb)) &&
        ok(cublasLtMatrixLayoutCreate(&plan.c, CUDA_R_32F, p.m, p.n, p.ldc)) &&
        ok(cublasLtMatmulPreferenceCreate(&pref));
    if (good) {
      const uint64_t ws = workspace_bytes_;
      const uint32_t align_a = static_cast<uint32_t>(key[9]);
      const uint32_t align_b = static_cast<uint32_t>(key[10]);
      const uint32_t align_c = static_cast<uint32_t>(key[11]);
      good = ok(cublasLtMatmulPreferenceSetAttribute(
                 pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws,
                 sizeof(ws))) &&
             ok(cublasLtMatmulPreferenceSetAttribute(
                 pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &align_a,
                 sizeof(align_a))) &&
             ok(cublasLtMatmulPreferenceSetAttribute(
                 pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &align_b,
                 sizeof(align_b))) &&
             ok(cublasLtMatmulPreferenceSetAttribute(
                 pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &align_c,
                 sizeof(align_c))) &&
             ok(cublasLtMatmulPreferenceSetAttribute(
                 pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &align_c,
                 sizeof(align_c)));
    }
    if (good) {
      cublasLtMatmulHeuristicResult_t result{};
      int returned = 0;
      good = ok(cublasLtMatmulAlgoGetHeuristic(cublaslt_, plan.desc, plan.a,
                                               plan.b, plan.c, plan.c, pref, 1,
                                               &result, &returned)) &&
             returned > 0 && result.state == CUBLAS_STATUS_SUCCESS;
      if (good) plan.algo = result.algo;
    }
    if (pref != nullptr) cublasLtMatmulPreferenceDestroy(pref);
    plan.usable = good;
  }
  LtPlan& plan = *slot;
  if (!plan.usable) return false;
  if (bias != nullptr && cublasLtMatmulDescSetAttribute(
                             plan.desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER,
                             &bias, sizeof(bias)) != CUBLAS_STATUS_SUCCESS) {
    return false;
  }
  return cublasLtMatmul(cublaslt_, plan.desc, &p.alpha, a, plan.a, b, plan.b,
                        &p.beta, p.c, plan.c, p.c, plan.c, &plan.algo,
                        workspace_, workspace_bytes_,
                        stream_) == CUBLAS_STATUS_SUCCESS;
}

void CudaBackend::Gemm(const GemmPlan& p, const float* bias,
                       const uint16_t* a16, const uint16_t* b16) {
  const bool bf16_inputs = a16 != nullptr;
  const void* a = bf16_inputs ? static_cast<const void*>(a16) : p.a;
  const void* b = bf16_inputs ? static_cast<const void*>(b16) : p.b;
  const cudaDataType_t in_type = bf16_inputs ? CUDA_R_16BF : CUDA_R_32F;
  const cublasComputeType_t compute =
      bf16_inputs ? CUBLAS_COMPUTE_32F : CUBLAS_COMPUTE_32F_FAST_TF32;
  if (p.batch == 1) {
    // The bias epilogue reads the bias with vector loads.
    const bool fuse_bias = bias == nullptr || Alignment(bias) >= 16;
    if (LtGemm(p, fuse_bias ? bias : nullptr, a, b, bf16_inputs)) {
      if (!fuse_bias) {
        cuda_kernels::AddBias(stream_, p.c, bias, p.n, p.m);
        CheckLaunch("AddBias");
      }
      return;
    }
    ++gemm_fallbacks_;
    const cublasStatus_t s =
        cublasGemmEx(cublas_, Op(p.trans_a), Op(p.trans_b), p.m, p.n, p.k,
                     &p.alpha, a, in_type, static_cast<int>(p.lda), b, in_type,
                     static_cast<int>(p.ldb), &p.beta, p.c, CUDA_R_32F,
                     static_cast<int>(p.ldc), compute, CUBLAS_GEMM_DEFAULT);
    if (s != CUBLAS_STATUS_SUCCESS) {
      Defer(CublasError(s, "cublasGemmEx"));
      return;
    }
    if (bias != nullptr) {
      // C is m x n column-major with ldc == m for the linear layers.
      cuda_kernels::AddBias(stream_, p.c, bias, p.n, p.m);
      CheckLaunch("AddBias");
    }
    return;
  }
  const cublasStatus_t s = cublasGemmStridedBatchedEx(
      cublas_, Op(p.trans_a), Op(p.trans_b), p.m, p.n, p.k, &p.alpha, a,
      in_type, static_cast<int>(p.lda), p.stride_a, b, in_type,
      static_cast<int>(p.ldb), p.stride_b, &p.beta, p.c, CUDA_R_32F,
      static_cast<int>(p.ldc), p.stride_c, p.batch, compute,
      CUBLAS_GEMM_DEFAULT);
  if (s != CUBLAS_STATUS_SUCCESS) {
    Defer(CublasError(s, "cublasGemmStridedBatchedEx"));
  }
}

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
