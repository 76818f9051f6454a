// ParameterShard checkpoints (written at the configured steps and on
// request), snapshots and the state shard replication copies to a backup
// (server/replication.h).
#include "server/shard.h"

#include <utility>

#include "absl/strings/str_cat.h"
#include "server/optimizer.h"
#include "server/shard_internal.h"

namespace lmps {

using shard_internal::NotInAsync;
using shard_internal::Seconds;

// ---------------------------------------------------------------------------
// Checkpoints.
// ---------------------------------------------------------------------------

absl::Status ParameterShard::WriteCheckpoint() {
  absl::MutexLock lock(&mu_);
  return WriteCheckpointLocked();
}

absl::Status ParameterShard::WriteCheckpointLocked() {
  if (options_.checkpoint_dir.empty()) {
    return absl::FailedPreconditionError(
        absl::StrCat("shard ", options_.shard, " has no checkpoint directory"));
  }
  const int64_t step = StepClockLocked();
  CheckpointHeader h;
  h.step = step;
  h.shard = options_.shard;
  h.num_shards = options_.spec.layout().num_shards();
  h.partition_version = options_.map.version();
  h.optimizer = options_.spec.optimizer().type();
  h.state_buffers = OptimizerStateBuffers(h.optimizer);
  h.spec = options_.spec;
  std::vector<ChunkView> views;
  views.reserve(chunks_.size());
  for (const Chunk& c : chunks_) {
    ChunkView v;
    v.desc = c.desc;
    v.params = c.params;
    for (const auto& s : c.state) v.state.push_back(s);
    views.push_back(std::move(v));
  }
  const absl::Time start = absl::Now();
  checkpoint_status_ = WriteShardCheckpoint(options_.checkpoint_dir, h, views);
  if (checkpoint_status_.ok()) {
    Log(absl::StrCat(
        "wrote checkpoint ",
        CheckpointPath(options_.checkpoint_dir, step, options_.shard),
        " in ", Seconds(absl::Now() - start)));
  } else {
    Log(absl::StrCat("checkpoint of step ", step,
                     " failed: ", checkpoint_status_.ToString()));
  }
  return checkpoint_status_;
}

bool ParameterShard::ShouldCheckpoint(int64_t step) const {
  if (options_.checkpoint_dir.empty()) return false;
  const TrainConfig& t = options_.spec.train();
  if (t.checkpoint_interval() > 0 && step % t.checkpoint_interval() == 0) {
    return true;
  }
  return step == t.steps() ||
         (t.stop_after_step() > 0 && step == t.stop_after_step());
}

ShardCheckpoint ParameterShard::Snapshot() const {
  absl::ReaderMutexLock lock(&mu_);
  ShardCheckpoint out;
  out.header.step = version_;
  out.header.shard = options_.shard;
  out.header.num_shards = options_.spec.layout().num_shards();
  out.header.partition_version = options_.map.version();
  out.header.optimizer = options_.spec.optimizer().type();
  out.header.state_buffers = OptimizerStateBuffers(out.header.optimizer);
  out.header.spec = options_.spec;
  out.header.num_chunks = static_cast<int32_t>(chunks_.size());
  for (const Chunk& c : chunks_) {
    out.chunks.push_back({c.desc, c.params, c.state});
  }
  return out;
}

std::map<int64_t, double> ParameterShard::AppliedSumSquares() const {
  absl::ReaderMutexLock lock(&mu_);
  return applied_sum_squares_;
}

bool ParameterShard::HasPendingGradients() const {
  absl::ReaderMutexLock lock(&mu_);
  for (const StepGrads& slot : step_slots_) {
    if (slot.step >= version_) return true;
  }
  for (const RankGrads& r : rank_grads_) {
    if (r.parts_received > 0) return true;
  }
  return false;
}

absl::Status ParameterShard::Restore(const ShardCheckpoint& snapshot,
                                     const std::map<int64_t, double>& applied,
                                     double last_grad_norm) {
  const int shard = options_.shard;
  if (mode_ == ASYNC) return NotInAsync(shard, "Restore");
  absl::MutexLock lock(&mu_);
  if (snapshot.header.shard != shard ||
      snapshot.header.partition_version != options_.map.version() ||
      snapshot.chunks.size() != chunks_.size()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "snapshot of shard ", snapshot.header.shard, " (partition version ",
        snapshot.header.partition_version, ", ", snapshot.chunks.size(),
        " chunks) does not fit shard ", shard, " (partition version ",
        options_.map.version(), ", ", chunks_.size(), " chunks)"));
  }
  for (size_t i = 0; i < chunks_.size(); ++i) {
    const ChunkData& in = snapshot.chunks[i];
    const Chunk& c = chunks_[i];
    if (in.desc.tensor() != c.desc.tensor() ||
        in.desc.index() != c.desc.index() ||
        static_cast<int64_t>(in.params.size()) != c.size() ||
        in.state.size() != c.state.size()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "snapshot chunk ", i, " (", in.desc.tensor(), "#", in.desc.index(),
          ", ", in.params.size(), " elements, ", in.state.size(),
          " state buffers) does not match shard ", shard, "'s chunk ",
          c.desc.tensor(), "#", c.desc.index(), " (", c.size(), ", ",
          c.state.size(), ")"));
    }
    for (const std::vector<float>& b : in.state) {
      if (static_cast<int64_t>(b.size()) != c.size()) {
        return absl::InvalidArgumentError(absl::StrCat(
            "snapshot chunk ", c.desc.tensor(), "#", c.desc.index(),
            " has a state buffer of ", b.size(), " elements, not ", c.size()));
      }
    }
  }
  for (size_t i = 0; i < chunks_.size(); ++i) {
    chunks_[i].params = snapshot.chunks[i].params;
    chunks_[i].state = snapshot.chunks[i].state;
  }
  version_ = snapshot.header.step;
  clocks_.assign(dp_, version_);
  for (StepGrads& slot : step_slots_) slot.step = -1;
  applied_sum_squares_ = applied;
  last_grad_norm_ = last_grad_norm;
  Log(absl::StrCat("restored shard ", shard, " from its primary's snapshot at "
                   "version ",
                   version_));
  return absl::OkStatus();
}

}  // namespace lmps
