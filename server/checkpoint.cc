#include "server/checkpoint.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstring>
#include <tuple>
#include <utility>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/strip.h"

namespace lmps {
namespace {

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "checkpoint I/O assumes a little-endian host"
#endif

constexpr char kMagic[8] = {'L', 'M', 'P', 'S', 'C', 'K', 'P', 'T'};
// magic, version, step, shard, num_shards, partition version, optimizer,
// state buffers.
constexpr size_t kFixedHeaderBytes = 8 + 4 + 8 + 4 + 4 + 8 + 4 + 4;
constexpr uint32_t kMaxProtoBytes = 64 << 20;

constexpr uint64_t kP1 = 0x9E3779B185EBCA87ULL;
constexpr uint64_t kP2 = 0xC2B2AE3D27D4EB4FULL;

uint64_t Rotl(uint64_t x, int r) { return (x << r) | (x >> (64 - r)); }

absl::Status ErrnoError(absl::string_view what, absl::string_view path, int e) {
  std::string msg = absl::StrCat(what, " ", path, ": ", strerror(e));
  if (e == ENOSPC || e == EDQUOT || e == EFBIG) {
    return absl::ResourceExhaustedError(msg);
  }
  if (e == ENOENT) return absl::NotFoundError(msg);
  if (e == EACCES || e == EPERM || e == EROFS) {
    return absl::PermissionDeniedError(msg);
  }
  return absl::InternalError(msg);
}

absl::Status Corrupt(absl::string_view path, absl::string_view what) {
  return absl::DataLossError(
      absl::StrCat("corrupt checkpoint ", path, ": ", what));
}

absl::Status MakeDirs(const std::string& path) {
  std::string partial;
  size_t pos = 0;
  while (pos <= path.size()) {
    size_t next = path.find('/', pos);
    if (next == std::string::npos) next = path.size();
    partial = path.substr(0, next);
    pos = next + 1;
    if (partial.empty()) continue;
    if (::mkdir(partial.c_str(), 0755) != 0 && errno != EEXIST) {
      return ErrnoError("cannot create directory", partial, errno);
    }
  }
  struct stat st;
  if (::stat(path.c_str(), &st) != 0 || !S_ISDIR(st.st_mode)) {
    return absl::FailedPreconditionError(
        absl::StrCat(path, " exists and is not a directory"));
  }
  return absl::OkStatus();
}

absl::Status FsyncDir(const std::string& dir) {
  const int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) return ErrnoError("cannot open directory", dir, errno);
  const int rc = ::fsync(fd);
  const int e = errno;
  ::close(fd);
  if (rc != 0) return ErrnoError("cannot fsync directory", dir, e);
  return absl::OkStatus();
}

std::string ParentDir(const std::string& path) {
  const size_t slash = path.rfind('/');
  if (slash == std::string::npos) return ".";
  if (slash == 0) return "/";
  return path.substr(0, slash);
}

// Buffered writer that checksums what it writes.
class FileWriter {
 public:
  FileWriter(int fd, std::string path) : fd_(fd), path_(std::move(path)) {
    buffer_.reserve(kBufferBytes);
  }

  absl::Status Append(const void* data, size_t n) {
    checksum_.Update(data, n);
    const char* p = static_cast<const char*>(data);
    if (buffer_.size() + n <= kBufferBytes) {
      buffer_.append(p, n);
      return absl::OkStatus();
    }
    if (absl::Status s = Flush(); !s.ok()) return s;
    if (n <= kBufferBytes) {
      buffer_.append(p, n);
      return absl::OkStatus();
    }
    return WriteRaw(p, n);
  }

  template <typename T>
  absl::Status AppendPod(T value) {
    return Append(&value, sizeof(value));
  }

  absl::Status AppendBlob(const std::string& blob) {
    if (absl::Status s = AppendPod<uint32_t>(blob.size()); !s.ok()) return s;
    return Append(blob.data(), blob.size());
  }

  // Appends the checksum of everything so far and flushes.
  absl::Status Finish() {
    const uint64_t sum = checksum_.Finish();
    buffer_.append(reinterpret_cast<const char*>(&sum), sizeof(sum));
    return Flush();
  }

 private:
  static constexpr size_t kBufferBytes = 1 << 20;

  absl::Status Flush() {
    absl::Status s = WriteRaw(buffer_.data(), buffer_.size());
    buffer_.clear();
    return s;
  }

  absl::Status WriteRaw(const char* p, size_t n) {
    while (n > 0) {
      const ssize_t w = ::write(fd_, p, n);
      if (w < 0) {
        if (errno == EINTR) continue;
        return ErrnoError("cannot write", path_, errno);
      }
      p += w;
      n -= static_cast<size_t>(w);
    }
    return absl::OkStatus();
  }

  int fd_;
  std::string path_;
  std::string buffer_;
  Checksum64 checksum_;
};

// Bounds-checked reads from a byte range.
class ByteReader {
 public:
  ByteReader(absl::string_view bytes, absl::string_view path)
      : bytes_(bytes), path_(path) {}

  absl::Status Read(void* out, size_t n, absl::string_view what) {
    if (bytes_.size() - pos_ < n) {
      return Corrupt(path_, absl::StrCat("truncated while reading ", what,
                                         " at byte ", pos_));
    }
    std::memcpy(out, bytes_.data() + pos_, n);
    pos_ += n;
    return absl::OkStatus();
  }

  template <typename T>
  absl::Status ReadPod(T* out, absl::string_view what) {
    return Read(out, sizeof(T), what);
  }

  absl::Status ReadProto(google::protobuf::MessageLite* msg,
                         absl::string_view what) {
    uint32_t len = 0;
    if (absl::Status s = ReadPod(&len, what); !s.ok()) return s;
    if (len > kMaxProtoBytes || bytes_.size() - pos_ < len) {
      return Corrupt(path_, absl::StrCat("bad length ", len, " of ", what));
    }
    if (!msg->ParseFromArray(bytes_.data() + pos_, static_cast<int>(len))) {
      return Corrupt(path_, absl::StrCat("cannot parse ", what));
    }
    pos_ += len;
    return absl::OkStatus();
  }

  size_t pos() const { return pos_; }
  size_t remaining() const { return bytes_.size() - pos_; }

 private:
  absl::string_view bytes_;
  absl::string_view path_;
  size_t pos_ = 0;
};

// Parses the header from `r` (positioned at 0). Leaves `r` at the first
// chunk.
absl::Status ParseHeader(ByteReader* r, absl::string_view path,
                         CheckpointHeader* h) {
  char magic[8];
  if (absl::Status s = r->Read(magic, 8, "magic"); !s.ok()) return s;
  if (std::memcmp(magic, kMagic, 8) != 0) {
    return Corrupt(path, "bad magic (not an lmps checkpoint)");
  }
  uint32_t version = 0;
  int32_t optimizer = 0;
  if (absl::Status s = r->ReadPod(&version, "format version"); !s.ok()) {
    return s;
  }
  if (version != kCheckpointFormatVersion) {
    return absl::FailedPreconditionError(
        absl::StrCat("checkpoint ", path, " has format version ", version,
                     "; this build reads version ", kCheckpointFormatVersion));
  }
  for (auto [ptr, size, what] :
       {std::tuple<void*, size_t, const char*>{&h->step, 8, "step"},
        {&h->shard, 4, "shard"},
        {&h->num_shards, 4, "num_shards"},
        {&h->partition_version, 8, "partition version"},
        {&optimizer, 4, "optimizer"},
        {&h->state_buffers, 4, "state buffers"}}) {
    if (absl::Status s = r->Read(ptr, size, what); !s.ok()) return s;
  }
  h->optimizer = static_cast<OptimizerType>(optimizer);
  if (h->state_buffers < 0 || h->state_buffers > 4) {
    return Corrupt(path,
                   absl::StrCat("bad state buffer count ", h->state_buffers));
  }
  if (absl::Status s = r->ReadProto(&h->spec, "job spec"); !s.ok()) return s;
  uint32_t num_chunks = 0;
  if (absl::Status s = r->ReadPod(&num_chunks, "chunk count"); !s.ok()) {
    return s;
  }
  h->num_chunks = static_cast<int32_t>(num_chunks);
  return absl::OkStatus();
}

absl::StatusOr<std::string> ReadWholeFile(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return ErrnoError("cannot open checkpoint", path, errno);
  struct stat st;
  if (::fstat(fd, &st) != 0) {
    const int e = errno;
    ::close(fd);
    return ErrnoError("cannot stat", path, e);
  }
  std::string bytes(static_cast<size_t>(st.st_size), '\0');
  size_t got = 0;
  while (got < bytes.size()) {
    const ssize_t n = ::read(fd, bytes.data() + got, bytes.size() - got);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      const int e = errno;
      ::close(fd);
      return ErrnoError("cannot read", path, e);
    }
    if (n == 0) break;
    got += static_cast<size_t>(n);
  }
  ::close(fd);
  bytes.resize(got);
  return bytes;
}

}  // namespace

void Checksum64::Word(uint64_t w) { acc_ = Rotl(acc_ + w * kP2, 31) * kP1; }

void Checksum64::Update(const void* data, size_t n) {
  const unsigned char* p = static_cast<const unsigned char*>(data);
  length_ += n;
  while (n > 0 && num_pending_ > 0) {
    pending_[num_pending_++] = *p++;
    --n;
    if (num_pending_ == 8) {
      uint64_t w;
      std::memcpy(&w, pending_, 8);
      Word(w);
      num_pending_ = 0;
    }
  }
  while (n >= 8) {
    uint64_t w;
    std::memcpy(&w, p, 8);
    Word(w);
    p += 8;
    n -= 8;
  }
  while (n > 0) {
    pending_[num_pending_++] = *p++;
    --n;
  }
}

uint64_t Checksum64::Finish() const {
  uint64_t h = acc_;
  for (int i = 0; i < num_pending_; ++i) {
    h ^= pending_[i];
    h *= 0x100000001b3ULL;  // FNV-1a prime
  }
  h ^= length_;
  h += 0x9e3779b97f4a7c15ULL;  // SplitMix64 finaliser
  h = (h ^ (h >> 30)) * 0xbf58476d1ce4e5b9ULL;
  h = (h ^ (h >> 27)) * 0x94d049bb133111ebULL;
  return h ^ (h >> 31);
}

std::string CheckpointStepDir(absl::string_view dir, int64_t step) {
  return absl::StrFormat("%s/step_%08d", dir, step);
}

std::string CheckpointPath(absl::string_view dir, int64_t step, int shard) {
  return absl::StrFormat("%s/shard_%d.ckpt", CheckpointStepDir(dir, step),
                         shard);
}

absl::Status WriteShardCheckpoint(absl::string_view dir,
                                  const CheckpointHeader& header,
                                  const std::vector<ChunkView>& chunks) {
  if (dir.empty()) {
    return absl::InvalidArgumentError("checkpoint directory is empty");
  }
  for (const ChunkView& c : chunks) {
    const int64_t n = c.desc.end() - c.desc.begin();
    bool ok = n >= 0 && static_cast<int64_t>(c.params.size()) == n &&
              static_cast<int>(c.state.size()) == header.state_buffers;
    for (const auto& s : c.state) {
      ok = ok && static_cast<int64_t>(s.size()) == n;
    }
    if (!ok) {
      return absl::InvalidArgumentError(absl::StrCat(
          "checkpoint chunk ", c.desc.tensor(), "#", c.desc.index(),
          ": buffer sizes do not match the descriptor"));
    }
  }
  const std::string step_dir = CheckpointStepDir(dir, header.step);
  if (absl::Status s = MakeDirs(step_dir); !s.ok()) return s;
  if (absl::Status s = FsyncDir(ParentDir(step_dir)); !s.ok()) return s;

  static std::atomic<uint64_t> counter{0};
  const std::string path = CheckpointPath(dir, header.step, header.shard);
  const std::string tmp =
      absl::StrCat(path, ".tmp.", ::getpid(), ".", counter.fetch_add(1));
  const int fd =
      ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
  if (fd < 0) return ErrnoError("cannot create", tmp, errno);
  auto fail = [&](absl::Status s) {
    ::close(fd);
    ::unlink(tmp.c_str());
    return s;
  };

  FileWriter w(fd, tmp);
  absl::Status s = w.Append(kMagic, 8);
  if (s.ok()) s = w.AppendPod<uint32_t>(kCheckpointFormatVersion);
  if (s.ok()) s = w.AppendPod<int64_t>(header.step);
  if (s.ok()) s = w.AppendPod<int32_t>(header.shard);
  if (s.ok()) s = w.AppendPod<int32_t>(header.num_shards);
  if (s.ok()) s = w.AppendPod<uint64_t>(header.partition_version);
  if (s.ok()) s = w.AppendPod<int32_t>(header.optimizer);
  if (s.ok()) s = w.AppendPod<int32_t>(header.state_buffers);
  if (s.ok()) s = w.AppendBlob(header.spec.SerializeAsString());
  if (s.ok()) s = w.AppendPod<uint32_t>(chunks.size());
  for (const ChunkView& c : chunks) {
    if (!s.ok()) break;
    s = w.AppendBlob(c.desc.SerializeAsString());
    if (s.ok()) s = w.AppendPod<int64_t>(c.params.size());
    if (s.ok()) s = w.Append(c.params.data(), 4 * c.params.size());
    for (const auto& st : c.state) {
      if (s.ok()) s = w.Append(st.data(), 4 * st.size());
    }
  }
  if (s.ok()) s = w.Finish();
  if (!s.ok()) return fail(s);
  if (::fsync(fd) != 0) return fail(ErrnoError("cannot fsync", tmp, errno));
  if (::close(fd) != 0) {
    absl::Status cs = ErrnoError("cannot close", tmp, errno);
    ::unlink(tmp.c_str());
    return cs;
  }
  if (::rename(tmp.c_str(), path.c_str()) != 0) {
    absl::Status rs = ErrnoError("cannot rename to", path, errno);
    ::unlink(tmp.c_str());
    return rs;
  }
  return FsyncDir(step_dir);
}

absl::Status WriteShardCheckpoint(absl::string_view dir,
                                  const ShardCheckpoint& checkpoint) {
  std::vector<ChunkView> views;
  views.reserve(checkpoint.chunks.size());
  for (const ChunkData& c : checkpoint.chunks) {
    ChunkView v;
    v.desc = c.desc;
    v.params = c.params;
    for (const auto& s : c.state) v.state.push_back(s);
    views.push_back(std::move(v));
  }
  return WriteShardCheckpoint(dir, checkpoint.header, views);
}

absl::StatusOr<ShardCheckpoint> ReadShardCheckpoint(const std::string& path) {
  absl::StatusOr<std::string> bytes = ReadWholeFile(path);
  if (!bytes.ok()) return bytes.status();
  if (bytes->size() < kFixedHeaderBytes + 8) {
    return Corrupt(path, absl::StrCat("only ", bytes->size(), " bytes"));
  }
  const size_t body = bytes->size() - 8;
  Checksum64 sum;
  sum.Update(bytes->data(), body);
  uint64_t stored;
  std::memcpy(&stored, bytes->data() + body, 8);
  if (sum.Finish() != stored) {
    return Corrupt(path, "checksum mismatch (truncated or damaged file)");
  }
  ShardCheckpoint ckpt;
  ByteReader r(absl::string_view(bytes->data(), body), path);
  if (absl::Status s = ParseHeader(&r, path, &ckpt.header); !s.ok()) return s;
  ckpt.chunks.resize(ckpt.header.num_chunks);
  for (ChunkData& c : ckpt.chunks) {
    if (absl::Status s = r.ReadProto(&c.desc, "chunk descriptor"); !s.ok()) {
      return s;
    }
    int64_t n = 0;
    if (absl::Status s = r.ReadPod(&n, "chunk size"); !s.ok()) return s;
    if (n != c.desc.end() - c.desc.begin() || n < 0 ||
        static_cast<uint64_t>(n) * 4 * (1 + ckpt.header.state_buffers) >
            r.remaining()) {
      return Corrupt(path, absl::StrCat("bad size ", n, " of chunk ",
                                        c.desc.tensor(), "#", c.desc.index()));
    }
    c.params.resize(n);
    if (absl::Status s = r.Read(c.params.data(), 4 * n, "params"); !s.ok()) {
      return s;
    }
    c.state.resize(ckpt.header.state_buffers);
    for (auto& st : c.state) {
      st.resize(n);
      if (absl::Status s = r.Read(st.data(), 4 * n, "state"); !s.ok()) {
        return s;
      }
    }
  }
  if (r.remaining() != 0) {
    return Corrupt(path, absl::StrCat(r.remaining(),
                                      " unexpected bytes after the chunks"));
  }
  return ckpt;
}

absl::StatusOr<CheckpointHeader> ReadCheckpointHeader(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return ErrnoError("cannot open checkpoint", path, errno);
  // The header is small; read a generous prefix.
  std::string prefix(kFixedHeaderBytes + 4 + kMaxProtoBytes / 64 + 4, '\0');
  size_t got = 0;
  while (got < prefix.size()) {
    const ssize_t n = ::read(fd, prefix.data() + got, prefix.size() - got);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;
    got += static_cast<size_t>(n);
  }
  ::close(fd);
  prefix.resize(got);
  CheckpointHeader h;
  ByteReader r(prefix, path);
  if (absl::Status s = ParseHeader(&r, path, &h); !s.ok()) return s;
  return h;
}

absl::StatusOr<CheckpointHeader> VerifyShardCheckpoint(
    const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return ErrnoError("cannot open checkpoint", path, errno);
  struct stat st;
  if (::fstat(fd, &st) != 0) {
    const int e = errno;
    ::close(fd);
    return ErrnoError("cannot stat", path, e);
  }
  const uint64_t size = static_cast<uint64_t>(st.st_size);
  if (size < kFixedHeaderBytes + 8) {
    ::close(fd);
    return Corrupt(path, absl::StrCat("only ", size, " bytes"));
  }
  Checksum64 sum;
  std::string block(1 << 20, '\0');
  uint64_t left = size - 8;
  while (left > 0) {
    const size_t want =
        static_cast<size_t>(std::min<uint64_t>(left, block.size()));
    const ssize_t n = ::read(fd, block.data(), want);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      const int e = errno;
      ::close(fd);
      return n == 0 ? Corrupt(path, "file shrank while reading")
                    : ErrnoError("cannot read", path, e);
    }
    sum.Update(block.data(), static_cast<size_t>(n));
    left -= static_cast<uint64_t>(n);
  }
  uint64_t stored = 0;
  const ssize_t n = ::read(fd, &stored, 8);
  ::close(fd);
  if (n != 8 || sum.Finish() != stored) {
    return Corrupt(path, "checksum mismatch (truncated or damaged file)");
  }
  return ReadCheckpointHeader(path);
}

absl::StatusOr<std::vector<int64_t>> ListCheckpointStepDirs(
    absl::string_view dir) {
  std::vector<int64_t> steps;
  const std::string d(dir);
  DIR* handle = ::opendir(d.c_str());
  if (handle == nullptr) {
    if (errno == ENOENT) return steps;
    return ErrnoError("cannot list checkpoint directory", d, errno);
  }
  while (struct dirent* e = ::readdir(handle)) {
    absl::string_view name(e->d_name);
    if (!absl::ConsumePrefix(&name, "step_") || name.empty()) continue;
    if (!std::all_of(name.begin(), name.end(),
                     [](char c) { return c >= '0' && c <= '9'; })) {
      continue;
    }
    int64_t step = 0;
    if (absl::SimpleAtoi(name, &step)) steps.push_back(step);
  }
  ::closedir(handle);
  std::sort(steps.begin(), steps.end());
  return steps;
}

absl::StatusOr<std::vector<int64_t>> ListCompleteCheckpointSteps(
    absl::string_view dir, int shard) {
  absl::StatusOr<std::vector<int64_t>> steps = ListCheckpointStepDirs(dir);
  if (!steps.ok()) return steps.status();
  std::vector<int64_t> complete;
  for (int64_t step : *steps) {
    absl::StatusOr<CheckpointHeader> h =
        VerifyShardCheckpoint(CheckpointPath(dir, step, shard));
    if (h.ok() && h->step == step && h->shard == shard) {
      complete.push_back(step);
    }
  }
  return complete;
}

}  // namespace lmps
