// CudaBackend (cuda_backend.h): device memory. Alloc/AllocInt32 allocations
// (cudaMalloc, zero-filled on the stream) are tracked by address so that
// Free can drop the bf16 weight copies inside them and EncoderBackward can
// find the end of dwte's allocation; Scratch and Bf16Scratch are
// backend-owned buffers that grow on demand.
#include "worker/backend/cuda/cuda_backend.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "absl/strings/str_cat.h"
#include "worker/backend/cuda/cuda_backend_internal.h"

namespace lmps {
namespace {

using cuda_backend_internal::CudaError;
using cuda_backend_internal::kBf16Align;

constexpr size_t kScratchRound = size_t{1} << 20;

}  // namespace

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

}  // namespace lmps
