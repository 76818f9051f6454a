#include "worker/backend/host_backend.h"

#include <cstdlib>
#include <cstring>

#include "absl/strings/str_cat.h"

namespace lmps {
namespace {

constexpr size_t kAlignment = 64;

absl::StatusOr<void*> AlignedZeroAlloc(size_t bytes) {
  // aligned_alloc wants a size that is a multiple of the alignment.
  size_t rounded = (bytes + kAlignment - 1) / kAlignment * kAlignment;
  if (rounded == 0) rounded = kAlignment;
  void* p = std::aligned_alloc(kAlignment, rounded);
  if (p == nullptr) {
    return absl::ResourceExhaustedError(
        absl::StrCat("host backend: cannot allocate ", bytes, " bytes"));
  }
  std::memset(p, 0, rounded);
  return p;
}

}  // namespace

absl::StatusOr<float*> HostBackend::Alloc(size_t floats) {
  if (floats > SIZE_MAX / sizeof(float)) {
    return absl::ResourceExhaustedError("host backend: allocation too large");
  }
  absl::StatusOr<void*> p = AlignedZeroAlloc(floats * sizeof(float));
  if (!p.ok()) return p.status();
  return static_cast<float*>(*p);
}

absl::StatusOr<int32_t*> HostBackend::AllocInt32(size_t n) {
  if (n > SIZE_MAX / sizeof(int32_t)) {
    return absl::ResourceExhaustedError("host backend: allocation too large");
  }
  absl::StatusOr<void*> p = AlignedZeroAlloc(n * sizeof(int32_t));
  if (!p.ok()) return p.status();
  return static_cast<int32_t*>(*p);
}

void HostBackend::Free(float* p) { std::free(p); }
void HostBackend::Free(int32_t* p) { std::free(p); }

absl::Status HostBackend::CopyToBackend(float* dst, const float* host_src,
                                        size_t n) {
  if (n > 0) std::memcpy(dst, host_src, n * sizeof(float));
  return absl::OkStatus();
}

absl::Status HostBackend::CopyToBackend(int32_t* dst, const int32_t* host_src,
                                        size_t n) {
  if (n > 0) std::memcpy(dst, host_src, n * sizeof(int32_t));
  return absl::OkStatus();
}

absl::Status HostBackend::CopyToHost(float* host_dst, const float* src,
                                     size_t n) {
  if (n > 0) std::memcpy(host_dst, src, n * sizeof(float));
  return absl::OkStatus();
}

}  // namespace lmps
