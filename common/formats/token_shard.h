// Token shards in llm.c's .bin format (or, with TokenShardLayout::kRaw,
// nanoGPT's: the uint16 tokens alone, no header): a header of 256
// little-endian int32
// (header[0] = 20240520, the magic; header[1] = 1, the version; header[2] =
// n, the number of tokens; the rest 0), then the n tokens as little-endian
// uint16. Made by lmps_prepare (tools/) and by llm.c's data scripts;
// read by the token-shard dataset (worker/data/token_dataset.h).
//
// TokenShard maps a shard read-only and validates it completely at Open:
// a bad shard is an error before any training step.
//
// Thread-safety: TokenShard is immutable after Open (const methods are
// thread-safe); TokenShardWriter is not thread-safe.
#ifndef LMPS_COMMON_FORMATS_TOKEN_SHARD_H_
#define LMPS_COMMON_FORMATS_TOKEN_SHARD_H_

#include <cstdint>
#include <cstdio>
#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"

namespace lmps {

inline constexpr int32_t kTokenShardMagic = 20240520;
inline constexpr int32_t kTokenShardVersion = 1;
inline constexpr int kTokenShardHeaderInts = 256;
inline constexpr int64_t kTokenShardHeaderBytes = kTokenShardHeaderInts * 4;

enum class TokenShardLayout {
  kLlmc,  // the 1024-byte header, then the tokens
  kRaw,   // nanoGPT's train.bin/val.bin: only the tokens
};

class TokenShard {
 public:
  // Maps `path`. NotFound if it cannot be opened; InvalidArgument, naming
  // the file, for: a file shorter than the header, a wrong magic, a wrong
  // version, a negative token count, a size other than header + 2 * count
  // bytes (truncated, or bytes after the tokens), or a token >= vocab_size
  // (the first one, with its index). vocab_size <= 0 checks no token.
  // kRaw: InvalidArgument for an empty file or an odd number of bytes.
  static absl::StatusOr<std::unique_ptr<TokenShard>> Open(
      const std::string& path, int vocab_size,
      TokenShardLayout layout = TokenShardLayout::kLlmc);
  ~TokenShard();
  TokenShard(const TokenShard&) = delete;
  TokenShard& operator=(const TokenShard&) = delete;

  const uint16_t* tokens() const { return tokens_; }
  int64_t size() const { return size_; }
  const std::string& path() const { return path_; }

 private:
  TokenShard(std::string path, void* map, size_t map_bytes,
             const uint16_t* tokens, int64_t size)
      : path_(std::move(path)),
        map_(map),
        map_bytes_(map_bytes),
        tokens_(tokens),
        size_(size) {}

  const std::string path_;
  void* const map_;
  const size_t map_bytes_;
  const uint16_t* const tokens_;
  const int64_t size_;
};

// Writes a shard to `path` + ".tmp" and renames it to `path` at Close, so a
// shard that exists is complete. Tokens are appended in pieces.
class TokenShardWriter {
 public:
  // Fails (naming the file) if it cannot be created.
  static absl::StatusOr<std::unique_ptr<TokenShardWriter>> Create(
      const std::string& path);
  ~TokenShardWriter();  // without Close: removes the temporary file

  // InvalidArgument once the shard would pass 2^31 - 1 tokens.
  absl::Status Append(absl::Span<const uint16_t> tokens);
  // Writes the header, flushes and renames. Once.
  absl::Status Close();
  int64_t tokens() const { return count_; }

 private:
  TokenShardWriter(std::string path, std::FILE* f)
      : path_(std::move(path)), f_(f) {}

  const std::string path_;
  std::FILE* f_;
  int64_t count_ = 0;
};

// A whole shard in one call (Create, Append, Close).
absl::Status WriteTokenShard(const std::string& path,
                             absl::Span<const uint16_t> tokens);

}  // namespace lmps

#endif  // LMPS_COMMON_FORMATS_TOKEN_SHARD_H_
