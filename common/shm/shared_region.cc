#include "common/shm/shared_region.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"

namespace lmps {
namespace {

// "/proc/<pid>/fd/<fd>" and nothing else.
bool IsProcFdPath(absl::string_view path) {
  std::vector<absl::string_view> parts = absl::StrSplit(path, '/');
  if (parts.size() != 5 || !parts[0].empty() || parts[1] != "proc" ||
      parts[3] != "fd") {
    return false;
  }
  uint32_t v = 0;
  return absl::SimpleAtoi(parts[2], &v) && absl::SimpleAtoi(parts[4], &v) &&
         parts[2].find_first_not_of("0123456789") == absl::string_view::npos &&
         parts[4].find_first_not_of("0123456789") == absl::string_view::npos;
}

constexpr int64_t kMaxRegionBytes = int64_t{1} << 40;

}  // namespace

absl::Status SharedMemoryRefusal(absl::string_view why) {
  return absl::FailedPreconditionError(absl::StrCat(kSharedMemoryRefused, why));
}

bool IsSharedMemoryRefusal(const absl::Status& status) {
  return status.code() == absl::StatusCode::kFailedPrecondition &&
         absl::StrContains(status.message(), kSharedMemoryRefused);
}

absl::StatusOr<std::unique_ptr<SharedRegion>> SharedRegion::Create(
    int64_t payload_bytes) {
  if (payload_bytes <= 0 || payload_bytes > kMaxRegionBytes) {
    return absl::InvalidArgumentError(absl::StrCat(
        "shared region payload size must be in (0, 2^40], got ",
        payload_bytes));
  }
  const int64_t size = kHeaderBytes + payload_bytes;
  const int fd = memfd_create("lmps-payloads", MFD_CLOEXEC | MFD_ALLOW_SEALING);
  if (fd < 0) {
    return absl::InternalError(
        absl::StrCat("memfd_create: ", std::strerror(errno)));
  }
  auto fail = [fd](absl::string_view what) {
    const absl::Status s =
        absl::InternalError(absl::StrCat(what, ": ", std::strerror(errno)));
    close(fd);
    return s;
  };
  if (ftruncate(fd, size) != 0) return fail("ftruncate of a memfd");
  if (fcntl(fd, F_ADD_SEALS,
            F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL) != 0) {
    return fail("sealing a memfd");
  }
  void* p = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (p == MAP_FAILED) return fail("mmap of a memfd");
  char* data = static_cast<char*>(p);
  char token[kTokenBytes];
  if (getrandom(token, sizeof(token), 0) != sizeof(token)) {
    munmap(p, size);
    return fail("getrandom");
  }
  std::memcpy(data, token, sizeof(token));
  SharedRegionDesc desc;
  desc.set_path(absl::StrCat("/proc/", getpid(), "/fd/", fd));
  desc.set_token(std::string(token, sizeof(token)));
  desc.set_size(size);
  return std::unique_ptr<SharedRegion>(
      new SharedRegion(fd, data, size, std::move(desc)));
}

absl::StatusOr<std::unique_ptr<SharedRegion>> SharedRegion::Open(
    const SharedRegionDesc& desc) {
  if (!IsProcFdPath(desc.path())) {
    return SharedMemoryRefusal(absl::StrCat("path '", desc.path(),
                                "' is not of the form /proc/<pid>/fd/<fd>"));
  }
  if (desc.token().size() != kTokenBytes || desc.size() <= kHeaderBytes ||
      desc.size() > kMaxRegionBytes) {
    return SharedMemoryRefusal(absl::StrCat("bad token (", desc.token().size(),
                                " bytes) or size (", desc.size(), ")"));
  }
  // O_PATH first: nothing of the file is opened (a FIFO or a device under
  // that path would be) before it is known to be a regular file.
  const int probe = open(desc.path().c_str(), O_PATH | O_CLOEXEC);
  if (probe < 0) {
    return SharedMemoryRefusal(absl::StrCat("cannot open ", desc.path(), ": ",
                                std::strerror(errno),
                                " (the worker is on another host?)"));
  }
  struct stat st;
  const bool regular = fstat(probe, &st) == 0 && S_ISREG(st.st_mode);
  int fd = -1;
  if (regular) {
    fd = open(absl::StrCat("/proc/self/fd/", probe).c_str(),
              O_RDWR | O_CLOEXEC);
  }
  close(probe);
  if (!regular) return SharedMemoryRefusal(absl::StrCat(desc.path(), " is not a memfd"));
  if (fd < 0) {
    return SharedMemoryRefusal(absl::StrCat("cannot open ", desc.path(),
                                " read-write: ", std::strerror(errno)));
  }
  auto refuse = [fd](absl::string_view why) {
    close(fd);
    return SharedMemoryRefusal(why);
  };
  const int seals = fcntl(fd, F_GET_SEALS);
  if (seals < 0 || (seals & F_SEAL_SHRINK) == 0) {
    return refuse(absl::StrCat(desc.path(),
                               " is not a memfd sealed against shrinking"));
  }
  if (fstat(fd, &st) != 0 || st.st_size != desc.size()) {
    return refuse(absl::StrCat(desc.path(), " has ", st.st_size,
                               " bytes, not ", desc.size()));
  }
  void* p =
      mmap(nullptr, desc.size(), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (p == MAP_FAILED) {
    return refuse(absl::StrCat("mmap: ", std::strerror(errno)));
  }
  char* data = static_cast<char*>(p);
  if (std::memcmp(data, desc.token().data(), kTokenBytes) != 0) {
    munmap(p, desc.size());
    return refuse(absl::StrCat(desc.path(),
                               " is another region (token mismatch: the "
                               "worker is on another host?)"));
  }
  return std::unique_ptr<SharedRegion>(
      new SharedRegion(fd, data, desc.size(), desc));
}

SharedRegion::~SharedRegion() {
  munmap(data_, size_);
  close(fd_);
}

absl::Status SharedRegion::CheckRange(int64_t offset, int64_t bytes) const {
  if (offset < kHeaderBytes || bytes < 0 || offset > size_ ||
      bytes > size_ - offset) {
    return absl::InvalidArgumentError(absl::StrCat(
        "shared-memory range [", offset, ", +", bytes,
        ") is outside the region's payload bytes [", kHeaderBytes, ", ", size_,
        ")"));
  }
  return absl::OkStatus();
}

// ---------------------------------------------------------------------------

absl::StatusOr<std::unique_ptr<WindowPool>> WindowPool::Create(
    int windows, int64_t window_bytes) {
  if (windows < 1 || window_bytes < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("a window pool needs >= 1 window of >= 1 byte, got ",
                     windows, " of ", window_bytes));
  }
  absl::StatusOr<std::unique_ptr<SharedRegion>> region =
      SharedRegion::Create(windows * window_bytes);
  if (!region.ok()) return region.status();
  return std::unique_ptr<WindowPool>(
      new WindowPool(*std::move(region), windows, window_bytes));
}

WindowPool::WindowPool(std::unique_ptr<SharedRegion> region, int windows,
                       int64_t window_bytes)
    : region_(std::move(region)), window_bytes_(window_bytes) {
  for (int w = windows - 1; w >= 0; --w) {
    free_.push_back(SharedRegion::kHeaderBytes + w * window_bytes);
  }
}

std::optional<int64_t> WindowPool::Acquire() {
  absl::MutexLock lock(&mu_);
  if (free_.empty()) return std::nullopt;
  const int64_t offset = free_.back();
  free_.pop_back();
  return offset;
}

void WindowPool::Release(int64_t offset) {
  absl::MutexLock lock(&mu_);
  free_.push_back(offset);
}

WindowPool* PeerWindowPools::Get(int peer, int windows, int64_t window_bytes,
                                 absl::Status* failure) {
  absl::MutexLock lock(&mu_);
  if (off_[peer]) return nullptr;
  if (pools_[peer] == nullptr) {
    absl::StatusOr<std::unique_ptr<WindowPool>> pool =
        WindowPool::Create(windows, window_bytes);
    if (!pool.ok()) {
      off_[peer] = true;
      if (failure != nullptr) *failure = pool.status();
      return nullptr;
    }
    pools_[peer] = *std::move(pool);
  }
  return pools_[peer].get();
}

bool PeerWindowPools::Disable(int peer) {
  absl::MutexLock lock(&mu_);
  const bool was_on = !off_[peer];
  off_[peer] = true;
  return was_on;
}

// ---------------------------------------------------------------------------

absl::StatusOr<std::shared_ptr<const SharedRegion>> RegionCache::Get(
    const SharedRegionDesc& desc, absl::Time now) {
  absl::MutexLock lock(&mu_);
  for (auto it = entries_.begin(); it != entries_.end();) {
    if (it->token == desc.token() && it->size == desc.size() &&
        it->path == desc.path()) {
      it->used = now;
      entries_.splice(entries_.begin(), entries_, it);
      return entries_.front().region;
    }
    if (now - it->used > idle_) {
      it = entries_.erase(it);
    } else {
      ++it;
    }
  }
  // Opening maps memory and reads /proc: done under the lock, which only
  // the first request from each worker takes this way.
  absl::StatusOr<std::unique_ptr<SharedRegion>> opened =
      SharedRegion::Open(desc);
  if (!opened.ok()) return opened.status();
  Entry entry;
  entry.token = desc.token();
  entry.size = desc.size();
  entry.path = desc.path();
  entry.region = std::shared_ptr<const SharedRegion>(*std::move(opened));
  entry.used = now;
  entries_.push_front(std::move(entry));
  while (static_cast<int>(entries_.size()) > capacity_) entries_.pop_back();
  return entries_.front().region;
}

int RegionCache::size() const {
  absl::MutexLock lock(&mu_);
  return static_cast<int>(entries_.size());
}

}  // namespace lmps
