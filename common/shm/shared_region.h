// Same-host shared memory for tensor payloads (docs/parameter-shard.md).
//
// A worker Creates a region: a sealed memfd (it can neither shrink nor
// grow, so a process that maps it can never fault on a truncated page),
// mapped read-write, its first kHeaderBytes holding a random token. The
// region is named to a shard by a SharedRegionDesc: the path
// "/proc/<pid>/fd/<fd>", the token and the size. A shard on the same host
// Opens it through that path; on another host (or in another pid
// namespace, e.g. another Kubernetes pod) the open fails or the token does
// not match, and the worker falls back to the socket.
//
// Payloads live at byte offsets in [kHeaderBytes, size). Who writes which
// bytes when is the protocol's business (PullRequest.shm, PushRequest.shm in
// proto/lmps.proto): a worker hands a window to one request at a time
// (WindowPool) and reuses it once the request has been answered.
//
// Thread-safety: SharedRegion is immutable after Create/Open (the bytes it
// maps are the callers' to synchronise). WindowPool and RegionCache are
// thread-safe.
#ifndef LMPS_COMMON_SHM_SHARED_REGION_H_
#define LMPS_COMMON_SHM_SHARED_REGION_H_

#include <cstdint>
#include <list>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "proto/lmps.pb.h"

namespace lmps {

// The start of every refusal a shard gives for a region it cannot use
// (FailedPrecondition): a worker that sees it stops offering shared memory
// to that shard and repeats the request over the socket.
inline constexpr absl::string_view kSharedMemoryRefused =
    "shared memory region refused: ";
// FailedPrecondition "<kSharedMemoryRefused><why>".
absl::Status SharedMemoryRefusal(absl::string_view why);
// True for such a refusal (also inside an annotated message).
bool IsSharedMemoryRefusal(const absl::Status& status);

class SharedRegion {
 public:
  static constexpr int64_t kHeaderBytes = 4096;
  static constexpr int kTokenBytes = 16;

  // A new region of kHeaderBytes + `payload_bytes` bytes.
  static absl::StatusOr<std::unique_ptr<SharedRegion>> Create(
      int64_t payload_bytes);
  // Maps the region `desc` names (another process's, on this host).
  // FailedPrecondition starting with kSharedMemoryRefused when it cannot be
  // opened or is not what desc says (path not of the form
  // /proc/<pid>/fd/<fd>, not a sealed memfd, another size or token).
  static absl::StatusOr<std::unique_ptr<SharedRegion>> Open(
      const SharedRegionDesc& desc);

  SharedRegion(const SharedRegion&) = delete;
  SharedRegion& operator=(const SharedRegion&) = delete;
  ~SharedRegion();

  const SharedRegionDesc& desc() const { return desc_; }
  char* data() const { return data_; }
  int64_t size() const { return size_; }
  // OK when [offset, offset + bytes) lies inside the payload area;
  // InvalidArgument naming the range otherwise.
  absl::Status CheckRange(int64_t offset, int64_t bytes) const;

 private:
  SharedRegion(int fd, char* data, int64_t size, SharedRegionDesc desc)
      : fd_(fd), data_(data), size_(size), desc_(std::move(desc)) {}

  const int fd_;
  char* const data_;
  const int64_t size_;
  const SharedRegionDesc desc_;
};

// A worker's region cut into `windows` windows of `window_bytes` each, one
// request's at a time.
class WindowPool {
 public:
  static absl::StatusOr<std::unique_ptr<WindowPool>> Create(
      int windows, int64_t window_bytes);

  // A free window's offset in the region, or nullopt when all are taken
  // (the caller then uses the socket).
  std::optional<int64_t> Acquire();
  void Release(int64_t offset);

  const SharedRegion& region() const { return *region_; }
  int64_t window_bytes() const { return window_bytes_; }

 private:
  WindowPool(std::unique_ptr<SharedRegion> region, int windows,
             int64_t window_bytes);

  const std::unique_ptr<SharedRegion> region_;
  const int64_t window_bytes_;
  absl::Mutex mu_;
  std::vector<int64_t> free_ ABSL_GUARDED_BY(mu_);
};

// A worker's window pools, one per peer (a shard, another worker), each
// created on first use. Shared memory is off for a peer when it was never
// enabled, when its pool could not be created, or after Disable (the peer
// refused the region); once off it stays off and the caller uses the
// socket for that peer.
//
// Thread-safety: thread-safe.
class PeerWindowPools {
 public:
  PeerWindowPools(int peers, bool enabled)
      : pools_(peers), off_(peers, !enabled) {}

  // The pool of `peer` (0 <= peer < peers), created on first use with
  // `windows` windows of `window_bytes`; nullptr while shared memory is off
  // for it. A failed creation turns the peer off and is returned in
  // *failure (that call only; may be null) for the caller to report.
  WindowPool* Get(int peer, int windows, int64_t window_bytes,
                  absl::Status* failure = nullptr);
  // Turns shared memory off for `peer`; true if it was on.
  bool Disable(int peer);

 private:
  absl::Mutex mu_;
  std::vector<std::unique_ptr<WindowPool>> pools_ ABSL_GUARDED_BY(mu_);
  std::vector<bool> off_ ABSL_GUARDED_BY(mu_);
};

// A shard's open regions by token: opened on first use and kept while in
// use; at most `capacity`, the least recently used closed first, and any
// not used for `idle` closed at the next lookup (a worker that went away
// leaves its region here until then). A closed region stays mapped while a
// request still holds it.
class RegionCache {
 public:
  explicit RegionCache(int capacity = 64,
                       absl::Duration idle = absl::Minutes(2))
      : capacity_(capacity), idle_(idle) {}

  absl::StatusOr<std::shared_ptr<const SharedRegion>> Get(
      const SharedRegionDesc& desc, absl::Time now = absl::Now());
  int size() const;

 private:
  struct Entry {
    std::string token;
    int64_t size = 0;
    std::string path;
    std::shared_ptr<const SharedRegion> region;
    absl::Time used;
  };
  const int capacity_;
  const absl::Duration idle_;
  mutable absl::Mutex mu_;
  std::list<Entry> entries_ ABSL_GUARDED_BY(mu_);  // most recent first
};

}  // namespace lmps

#endif  // LMPS_COMMON_SHM_SHARED_REGION_H_
