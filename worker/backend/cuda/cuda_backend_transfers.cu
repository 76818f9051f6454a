// CudaBackend (cuda_backend.h): copies between host and device memory.
// CopyToBackend/CopyToHost are synchronous: small or pinned host buffers are
// copied directly, large pageable ones through two pinned staging buffers
// (the host memcpy of one chunk overlaps the DMA of the other).
// CopyToHostAsync into pinned memory runs on a second stream after an
// event on the compute stream and hands out a ticket; WaitCopy waits for
// it. Also PinHostMemory and Synchronize.
#include "worker/backend/cuda/cuda_backend.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <cstring>
#include <mutex>

#include "worker/backend/cuda/cuda_backend_internal.h"

namespace lmps {
namespace {

using cuda_backend_internal::CudaError;

// Host copies up to this size go straight through cudaMemcpyAsync; larger
// ones of pageable memory are pipelined through the pinned staging buffers.
constexpr size_t kDirectCopyBytes = size_t{1} << 20;
constexpr size_t kStagingBytes = size_t{8} << 20;

}  // namespace

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

}  // namespace lmps
