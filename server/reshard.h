// Resharding: reading element ranges of tensors, with their optimizer state,
// out of the shard checkpoint files of one step written under ANY layout
// (number of shards, max_chunk_bytes), so that a job resumes under another
// layout than the one that wrote the checkpoint.
//
// The layout that wrote step t under `dir` is the one recorded in the header
// of <dir>/step_<t>/shard_0.ckpt (or, when shard 0's file is missing, of any
// other shard file of the step): num_shards N and partition version V. The
// step is usable only if every file shard_0 .. shard_{N-1} is there, holds
// step t and carries the same N and V (files of another layout left in the
// same step directory are ignored; shard_0 decides).
//
// A new shard asks for its chunks as (tensor, [begin, end)) ranges; each is
// assembled from the old chunks (read from the files' chunk descriptors)
// that overlap it: parameters and every optimizer state buffer (AdamW m and
// v, SGD momentum), byte for byte. Only the old files that hold a wanted
// element are read (which ones is computed from the old partition map when
// it reproduces V, else every file is read); every file read is verified
// against its checksum.
//
// Where the files are: locally every shard shares one --checkpoint_dir. In
// deployments where each shard has its own volume, resuming under another
// shard count needs the old step's files of EVERY old shard reachable from
// every new shard (a shared volume, or the files copied into each new shard's
// checkpoint directory); errors for missing files say so.
//
// Thread-safety: pure functions over the file system.
#ifndef LMPS_SERVER_RESHARD_H_
#define LMPS_SERVER_RESHARD_H_

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "proto/lmps.pb.h"
#include "server/checkpoint.h"

namespace lmps {

// Elements [begin, end) of a tensor (row-major, fp32).
struct ReshardRange {
  std::string tensor;
  int64_t begin = 0;
  int64_t end = 0;
};

// The values of one ReshardRange: end - begin parameters and
// state_buffers buffers of as many elements.
struct RangeData {
  std::vector<float> params;
  std::vector<std::vector<float>> state;
};

struct ReshardRequest {
  std::string dir;  // checkpoint directory (holding step_<8 digits>/)
  int64_t step = 0;
  std::vector<ReshardRange> ranges;
  // When set, the checkpoint must have been written for this model
  // (FailedPrecondition otherwise).
  std::optional<ModelConfig> model;
  // When set, the checkpoint must hold this optimizer's state buffers
  // (FailedPrecondition otherwise).
  std::optional<OptimizerType> optimizer;
};

struct ReshardResult {
  // Header of the old layout's shard file the layout was read from
  // (num_shards, partition_version, optimizer, state_buffers, spec).
  CheckpointHeader source;
  std::vector<RangeData> ranges;  // one per ReshardRequest.ranges, in order
  std::vector<int> shards_read;   // old shard files read, ascending
};

// The layout that wrote `step` under `dir` (see the file comment), with every
// file of it present and consistent (headers only; checksums are verified
// when the data is read). Errors: NotFound for a missing step or missing
// shard files (naming them, and saying that every old shard file must be
// reachable from every new shard), FailedPrecondition / DataLoss for files of
// another step, layout or a corrupt header.
absl::StatusOr<CheckpointHeader> ReadCheckpointLayout(absl::string_view dir,
                                                      int64_t step);

// Reads request.ranges of request.step from the old shard files. Errors name
// the files, the missing files (as ReadCheckpointLayout), or the tensors and
// element ranges no old chunk holds (DataLoss; a tensor absent from the
// checkpoint is named as such); InvalidArgument for an empty or negative
// range.
absl::StatusOr<ReshardResult> ReadCheckpointRanges(
    const ReshardRequest& request);

// Steps (ascending) under `dir` for which every shard file of the layout
// that wrote the step (N and V from shard_0's header) exists and verifies
// (checksum included): a job of any layout can resume from them with
// ReadCheckpointRanges. A missing `dir` gives an empty list.
absl::StatusOr<std::vector<int64_t>> ListRelayoutCheckpointSteps(
    absl::string_view dir);

// For ParameterShard::Create. True when `path`, a shard's own checkpoint
// file of a step, is missing or was written under another partition than
// `map` (other num_shards or max_chunk_bytes): the shard then loads with
// LoadShardRanges. False for a file of `map`'s partition and for one whose
// header cannot be read (the plain load reports that).
bool CheckpointNeedsReshard(const std::string& path, const PartitionMap& map);

// ReadCheckpointRanges of `ranges` (a new shard's chunks) checked against
// `spec`'s model and optimizer. Errors keep their code and read "shard
// <shard>: cannot resume from step <step>: ..."; on success logs one line
// naming the old layout and the files read (`log` may be empty).
absl::StatusOr<std::vector<RangeData>> LoadShardRanges(
    const std::string& dir, int64_t step, const JobSpec& spec,
    std::vector<ReshardRange> ranges, int shard,
    const std::function<void(const std::string&)>& log);

}  // namespace lmps

#endif  // LMPS_SERVER_RESHARD_H_
