// Shard checkpoints: one file per (step, shard) holding the parameters and
// optimizer state of every chunk the shard owns.
//
// Layout: <dir>/step_<8-digit step>/shard_<id>.ckpt, e.g.
// ckpt/step_00000050/shard_1.ckpt. A step is complete for a job when every
// shard's file for it exists and verifies.
//
// File format (all integers little-endian):
//   "LMPSCKPT"                        8-byte magic
//   u32 format_version                (kCheckpointFormatVersion)
//   i64 step                          the parameter version stored
//   i32 shard, i32 num_shards
//   u64 partition_version
//   i32 optimizer type (OptimizerType), i32 state buffers per chunk (k)
//   u32 len, JobSpec (serialized protobuf)
//   u32 num_chunks, then per chunk:
//     u32 len, ChunkDesc (serialized protobuf)
//     i64 n (= end - begin)
//     fp32 params[n], then k fp32 state buffers [n]
//                                     (AdamW: m, v; SGD: momentum buffer)
//   u64 checksum of every byte before it (Checksum64 below)
//
// Writes are atomic: the file is written under a temporary name in the same
// directory ("shard_<id>.ckpt.tmp.*"), fsynced, renamed over the final name
// and the directory fsynced. A failed write (full disk, I/O error) returns an
// error, removes the temporary file and leaves any previous file intact, so
// the final name only ever holds a complete file. Readers ignore temporary
// files.
//
// Thread-safety: pure functions over the file system; concurrent writers of
// the same (step, shard) are not supported.
#ifndef LMPS_SERVER_CHECKPOINT_H_
#define LMPS_SERVER_CHECKPOINT_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"
#include "proto/lmps.pb.h"

namespace lmps {

inline constexpr uint32_t kCheckpointFormatVersion = 1;

// Everything in a checkpoint file but the chunk data.
struct CheckpointHeader {
  int64_t step = 0;
  int32_t shard = 0;
  int32_t num_shards = 0;
  uint64_t partition_version = 0;
  OptimizerType optimizer = ADAMW;
  int32_t state_buffers = 0;  // per chunk
  JobSpec spec;
  int32_t num_chunks = 0;  // filled in by the reader
};

// A chunk to be written, borrowing the caller's buffers.
struct ChunkView {
  ChunkDesc desc;
  absl::Span<const float> params;
  std::vector<absl::Span<const float>> state;  // header.state_buffers spans
};

// A chunk read back.
struct ChunkData {
  ChunkDesc desc;
  std::vector<float> params;
  std::vector<std::vector<float>> state;
};

struct ShardCheckpoint {
  CheckpointHeader header;
  std::vector<ChunkData> chunks;
};

// "<dir>/step_00000050" and "<dir>/step_00000050/shard_1.ckpt".
std::string CheckpointStepDir(absl::string_view dir, int64_t step);
std::string CheckpointPath(absl::string_view dir, int64_t step, int shard);

// Writes the checkpoint of (header.step, header.shard) under `dir`
// atomically, creating directories as needed. InvalidArgument if a chunk's
// spans do not match its descriptor or header.state_buffers;
// ResourceExhausted for a full disk; other errors name the path.
absl::Status WriteShardCheckpoint(absl::string_view dir,
                                  const CheckpointHeader& header,
                                  const std::vector<ChunkView>& chunks);
absl::Status WriteShardCheckpoint(absl::string_view dir,
                                  const ShardCheckpoint& checkpoint);

// Reads and verifies a whole file (magic, version, checksum, structure).
// NotFound if it does not exist, DataLoss if it is corrupt; errors name the
// path.
absl::StatusOr<ShardCheckpoint> ReadShardCheckpoint(const std::string& path);

// Reads only the header (no checksum verification; see
// VerifyShardCheckpoint).
absl::StatusOr<CheckpointHeader> ReadCheckpointHeader(const std::string& path);

// Streams the file through the checksum and checks the header; cheaper in
// memory than ReadShardCheckpoint. Returns the header.
absl::StatusOr<CheckpointHeader> VerifyShardCheckpoint(const std::string& path);

// Steps (ascending) with a step directory under `dir`. A missing `dir` gives
// an empty list.
absl::StatusOr<std::vector<int64_t>> ListCheckpointStepDirs(
    absl::string_view dir);

// Steps (ascending) whose file for `shard` exists and verifies (and names
// that shard and step). Corrupt or partial files are skipped.
absl::StatusOr<std::vector<int64_t>> ListCompleteCheckpointSteps(
    absl::string_view dir, int shard);

// The 64-bit checksum used by the format: a word-at-a-time hash (xxHash64
// rounds over little-endian 8-byte words, FNV-1a over the tail bytes, then a
// SplitMix64 finaliser with the length). Streaming: Update in pieces of any
// size gives the same value as one Update.
class Checksum64 {
 public:
  void Update(const void* data, size_t n);
  uint64_t Finish() const;

 private:
  void Word(uint64_t w);
  uint64_t acc_ = 0x27d4eb2f165667c5ULL;
  uint64_t length_ = 0;
  unsigned char pending_[8];
  int num_pending_ = 0;
};

}  // namespace lmps

#endif  // LMPS_SERVER_CHECKPOINT_H_
