// ParameterShard: construction, accessors, Shutdown, and what the modes
// share: the replica clocks and the optimizer step over every chunk. The
// rest of the class is split by seam: shard_init.cc (initial parameters),
// shard_push.cc (push validation and chunk-part tiling), shard_step.cc (SYNC
// and BOUNDED_STALENESS: step slots, GradNorm, Apply, StopAt),
// shard_async.cc (ASYNC updates), shard_checkpoint.cc (checkpoints,
// snapshots, Restore) and shard_pull.cc (Pull, TensorInfo). The rules they
// implement: docs/parameter-shard.md.
#include "server/shard.h"

#include <algorithm>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/types/span.h"
#include "common/model/job_spec.h"
#include "common/model/partition.h"
#include "server/optimizer.h"

namespace lmps {

ParameterShard::ParameterShard(ShardOptions options)
    : options_(std::move(options)) {}

ParameterShard::~ParameterShard() { Shutdown(); }

absl::StatusOr<std::unique_ptr<ParameterShard>> ParameterShard::Create(
    ShardOptions options) {
  if (absl::Status s = ValidateJobSpec(options.spec); !s.ok()) return s;
  const int num_shards = options.spec.layout().num_shards();
  if (options.shard < 0 || options.shard >= num_shards) {
    return absl::InvalidArgumentError(
        absl::StrCat("shard ", options.shard, " is out of range: the job has ",
                     num_shards, " shards"));
  }
  if (options.threads < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("threads must be >= 1, got ", options.threads));
  }
  if (options.start_step < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("start_step must be >= 0, got ", options.start_step));
  }
  absl::StatusOr<PartitionMap> expected = ComputePartition(
      options.spec.model(), num_shards, options.spec.max_chunk_bytes());
  if (!expected.ok()) return expected.status();
  if (options.map.version() != expected->version() ||
      options.map.chunks_size() != expected->chunks_size()) {
    return absl::FailedPreconditionError(
        absl::StrCat("partition map version ", options.map.version(),
                     " does not match the job spec's (", expected->version(),
                     "): model, num_shards or max_chunk_bytes differ"));
  }
  if (options.wait_timeout <= absl::ZeroDuration()) {
    return absl::InvalidArgumentError("wait_timeout must be positive");
  }
  const int threads = options.threads;
  std::unique_ptr<ParameterShard> shard(new ParameterShard(std::move(options)));
  if (threads > 1) shard->pool_ = std::make_unique<ThreadPool>(threads);
  if (absl::Status s = shard->Init(); !s.ok()) return s;
  return shard;
}

void ParameterShard::Log(const std::string& line) const {
  if (options_.log) options_.log(line);
}

absl::Time ParameterShard::WaitDeadline(absl::Time deadline) const {
  return std::min(deadline, absl::Now() + options_.wait_timeout);
}

int ParameterShard::FindChunk(const std::string& tensor, int index) const {
  auto it = chunk_index_.find({tensor, index});
  return it == chunk_index_.end() ? -1 : it->second;
}

int64_t ParameterShard::version() const {
  absl::MutexLock lock(&mu_);
  return version_;
}

int64_t ParameterShard::rejected_nonfinite_pushes() const {
  absl::MutexLock lock(&mu_);
  return rejected_nonfinite_;
}

int64_t ParameterShard::duplicate_chunks() const {
  absl::MutexLock lock(&mu_);
  return duplicates_;
}

absl::Status ParameterShard::last_checkpoint_status() const {
  absl::MutexLock lock(&mu_);
  return checkpoint_status_;
}

double ParameterShard::last_grad_norm() const {
  absl::MutexLock lock(&mu_);
  return last_grad_norm_;
}

std::vector<int64_t> ParameterShard::replica_clocks() const {
  absl::ReaderMutexLock lock(&mu_);
  return clocks_;
}

int64_t ParameterShard::max_staleness_seen() const {
  absl::ReaderMutexLock lock(&mu_);
  return max_staleness_;
}

int64_t ParameterShard::step_clock() const {
  absl::ReaderMutexLock lock(&mu_);
  return StepClockLocked();
}

void ParameterShard::Shutdown() {
  absl::MutexLock lock(&mu_);
  shutdown_ = true;
}

// ---------------------------------------------------------------------------
// Shared by the modes: replica clocks and the optimizer step.
// ---------------------------------------------------------------------------

void ParameterShard::PushCompletedLocked(int rank, int64_t step) {
  max_staleness_ = std::max(max_staleness_, step - MinClockLocked());
  if (mode_ == ASYNC) {
    clocks_[rank] = std::max(clocks_[rank], step + 1);
    return;
  }
  // The clock is the first step not completely pushed: pushes of a rank
  // normally arrive in step order, but a retried one may fill a gap.
  const int n = static_cast<int>(chunks_.size());
  while (true) {
    const StepGrads* slot = FindSlotLocked(clocks_[rank]);
    if (slot == nullptr || slot->chunks_received[rank] < n) break;
    ++clocks_[rank];
  }
}

int64_t ParameterShard::MinClockLocked() const {
  return *std::min_element(clocks_.begin(), clocks_.end());
}

int64_t ParameterShard::StepClockLocked() const {
  return mode_ == ASYNC ? MinClockLocked() : version_;
}

std::string ParameterShard::SlowRanksLocked(int64_t needed) const {
  std::vector<std::string> slow;
  for (int r = 0; r < dp_; ++r) {
    if (clocks_[r] < needed) {
      slow.push_back(absl::StrCat("dp rank ", r, " has completed ", clocks_[r],
                                  " of the ", needed, " steps needed"));
    }
  }
  return absl::StrJoin(slow, "; ");
}

void ParameterShard::MaybeLogEndLocked() {
  if (logged_end_ || StepClockLocked() < end_step_) return;
  logged_end_ = true;
  Log(absl::StrCat("every dp replica completed step ", end_step_,
                   " (mode ", ConsistencyMode_Name(mode_),
                   mode_ == BOUNDED_STALENESS
                       ? absl::StrCat(", staleness bound ", staleness_)
                       : "",
                   "): replica clocks [", absl::StrJoin(clocks_, ", "),
                   "], max staleness seen ", max_staleness_, " steps, version ",
                   version_));
}

void ParameterShard::OptimizerStepLocked(const std::vector<const float*>& grads,
                                         float scale, double lr,
                                         int64_t update) {
  const OptimizerConfig& opt = options_.spec.optimizer();
  // Element-wise: any split gives the same result.
  ParallelForBlocks(
      pool_.get(), chunk_sizes_, kNormBlockElements,
      [&](int, int i, int64_t begin, int64_t end) {
        Chunk& c = chunks_[i];
        const int64_t n = end - begin;
        std::vector<absl::Span<float>> state;
        for (std::vector<float>& buffer : c.state) {
          state.push_back(absl::MakeSpan(buffer.data() + begin, n));
        }
        OptimizerStep(opt, lr, update, c.tensor->weight_decay, scale,
                      absl::MakeSpan(grads[i] + begin, n),
                      absl::MakeSpan(c.params.data() + begin, n), state);
      });
}

}  // namespace lmps
