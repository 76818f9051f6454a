#include "common/formats/token_shard.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <climits>
#include <cstring>

#include "absl/strings/str_cat.h"

static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__,
              "token shards are read in place: little-endian hosts only");

namespace lmps {

absl::StatusOr<std::unique_ptr<TokenShard>> TokenShard::Open(
    const std::string& path, int vocab_size, TokenShardLayout layout) {
  const bool raw = layout == TokenShardLayout::kRaw;
  auto invalid = [&](auto&&... what) {
    return absl::InvalidArgumentError(absl::StrCat(
        "token shard '", path, "': ", what...,
        raw ? " (nanoGPT's raw uint16 tokens, docs/data.md)"
            : " (llm.c's .bin format, docs/data.md: made by lmps_prepare)"));
  };
  const int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    return absl::NotFoundError(absl::StrCat("cannot read token shard '", path,
                                            "': ", std::strerror(errno)));
  }
  struct stat st;
  if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    close(fd);
    return absl::NotFoundError(
        absl::StrCat("token shard '", path, "' is not a regular file"));
  }
  const auto bytes = static_cast<int64_t>(st.st_size);
  if (raw && (bytes == 0 || bytes % 2 != 0)) {
    close(fd);
    return invalid(bytes == 0 ? "empty file"
                              : absl::StrCat(bytes, " bytes, an odd number"));
  }
  if (!raw && bytes < kTokenShardHeaderBytes) {
    close(fd);
    return invalid("file of ", bytes, " bytes is shorter than the ",
                   kTokenShardHeaderBytes, "-byte header");
  }
  void* map = mmap(nullptr, static_cast<size_t>(bytes), PROT_READ, MAP_SHARED,
                   fd, 0);
  close(fd);
  if (map == MAP_FAILED) {
    return absl::InternalError(absl::StrCat("cannot map token shard '", path,
                                            "': ", std::strerror(errno)));
  }
  auto fail = [&](absl::Status s) {
    munmap(map, static_cast<size_t>(bytes));
    return s;
  };
  int64_t count = bytes / 2;
  int64_t offset = 0;
  if (!raw) {
    int32_t header[3];
    std::memcpy(header, map, sizeof(header));
    if (header[0] != kTokenShardMagic) {
      return fail(invalid("wrong magic ", header[0], ", expected ",
                          kTokenShardMagic));
    }
    if (header[1] != kTokenShardVersion) {
      return fail(invalid("version ", header[1], ", expected ",
                          kTokenShardVersion, " (uint16 tokens)"));
    }
    count = header[2];
    if (count < 0) return fail(invalid("negative token count ", count));
    const int64_t want = kTokenShardHeaderBytes + 2 * count;
    if (bytes != want) {
      return fail(invalid("the header counts ", count, " tokens (", want,
                          " bytes) but the file has ", bytes, " bytes",
                          bytes < want ? ": truncated"
                                       : ": bytes after the tokens"));
    }
    offset = kTokenShardHeaderBytes;
  }
  const auto* tokens = reinterpret_cast<const uint16_t*>(
      static_cast<const char*>(map) + offset);
  if (vocab_size > 0 && vocab_size <= UINT16_MAX) {
    for (int64_t i = 0; i < count; ++i) {
      if (tokens[i] >= vocab_size) {
        return fail(invalid("token ", tokens[i], " at index ", i,
                            " is not below the model's vocab_size ",
                            vocab_size));
      }
    }
  }
  return std::unique_ptr<TokenShard>(new TokenShard(
      path, map, static_cast<size_t>(bytes), tokens, count));
}

TokenShard::~TokenShard() { munmap(map_, map_bytes_); }

absl::StatusOr<std::unique_ptr<TokenShardWriter>> TokenShardWriter::Create(
    const std::string& path) {
  const std::string tmp = path + ".tmp";
  std::FILE* f = std::fopen(tmp.c_str(), "wb");
  if (f == nullptr) {
    return absl::NotFoundError(absl::StrCat("cannot create '", tmp,
                                            "': ", std::strerror(errno)));
  }
  const int32_t zeros[kTokenShardHeaderInts] = {};
  if (std::fwrite(zeros, sizeof(zeros), 1, f) != 1) {
    std::fclose(f);
    std::remove(tmp.c_str());
    return absl::InternalError(absl::StrCat("cannot write '", tmp, "'"));
  }
  return std::unique_ptr<TokenShardWriter>(new TokenShardWriter(path, f));
}

TokenShardWriter::~TokenShardWriter() {
  if (f_ != nullptr) {
    std::fclose(f_);
    std::remove((path_ + ".tmp").c_str());
  }
}

absl::Status TokenShardWriter::Append(absl::Span<const uint16_t> tokens) {
  if (f_ == nullptr) return absl::FailedPreconditionError("writer is closed");
  if (count_ + static_cast<int64_t>(tokens.size()) > INT32_MAX) {
    return absl::InvalidArgumentError(absl::StrCat(
        "'", path_, "': a shard holds at most ", INT32_MAX, " tokens"));
  }
  if (!tokens.empty() &&
      std::fwrite(tokens.data(), 2, tokens.size(), f_) != tokens.size()) {
    return absl::InternalError(absl::StrCat("cannot write '", path_, ".tmp'"));
  }
  count_ += static_cast<int64_t>(tokens.size());
  return absl::OkStatus();
}

absl::Status TokenShardWriter::Close() {
  if (f_ == nullptr) return absl::FailedPreconditionError("writer is closed");
  int32_t header[kTokenShardHeaderInts] = {};
  header[0] = kTokenShardMagic;
  header[1] = kTokenShardVersion;
  header[2] = static_cast<int32_t>(count_);
  const std::string tmp = path_ + ".tmp";
  bool ok = std::fseek(f_, 0, SEEK_SET) == 0 &&
            std::fwrite(header, sizeof(header), 1, f_) == 1 &&
            std::fflush(f_) == 0 && fsync(fileno(f_)) == 0;
  ok = std::fclose(f_) == 0 && ok;
  f_ = nullptr;
  if (!ok || std::rename(tmp.c_str(), path_.c_str()) != 0) {
    std::remove(tmp.c_str());
    return absl::InternalError(absl::StrCat("cannot write '", path_,
                                            "': ", std::strerror(errno)));
  }
  return absl::OkStatus();
}

absl::Status WriteTokenShard(const std::string& path,
                             absl::Span<const uint16_t> tokens) {
  absl::StatusOr<std::unique_ptr<TokenShardWriter>> w =
      TokenShardWriter::Create(path);
  if (!w.ok()) return w.status();
  if (absl::Status s = (*w)->Append(tokens); !s.ok()) return s;
  return (*w)->Close();
}

}  // namespace lmps
