// HostBackend: the memory half of a Backend whose "backend memory" is
// ordinary host memory (Alloc: 64-byte aligned, zero-filled). Any host
// pointer is therefore valid backend memory for its layer functions. The
// CPU backend and the naive reference backend derive from it and add the
// layer functions.
//
// Thread-safety: as Backend; the memory functions themselves are
// thread-safe.
#ifndef LMPS_WORKER_BACKEND_HOST_BACKEND_H_
#define LMPS_WORKER_BACKEND_HOST_BACKEND_H_

#include <cstddef>
#include <cstdint>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "worker/backend/backend.h"

namespace lmps {

class HostBackend : public Backend {
 public:
  absl::StatusOr<float*> Alloc(size_t floats) override;
  absl::StatusOr<int32_t*> AllocInt32(size_t n) override;
  void Free(float* p) override;
  void Free(int32_t* p) override;
  absl::Status CopyToBackend(float* dst, const float* host_src,
                             size_t n) override;
  absl::Status CopyToBackend(int32_t* dst, const int32_t* host_src,
                             size_t n) override;
  absl::Status CopyToHost(float* host_dst, const float* src,
                          size_t n) override;
  absl::Status Synchronize() override { return absl::OkStatus(); }
  bool memory_is_host() const override { return true; }
};

}  // namespace lmps

#endif  // LMPS_WORKER_BACKEND_HOST_BACKEND_H_
