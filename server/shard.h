// ParameterShard: the logic of one parameter-server shard, free of gRPC so
// it is unit-tested without a network (server/service.h adapts it).
//
// A shard owns the chunks ChunksOfShard(map, shard) of the model: their fp32
// parameters at `version` (the number of optimizer updates applied) and the
// optimizer state. It runs the bulk-synchronous step protocol of
// proto/lmps.proto:
//
//   Push(step = version)  every dp rank pushes its gradient for every chunk
//                         (in one or several streams). The whole stream is
//                         validated before anything changes; errors:
//                           InvalidArgument   malformed stream: mixed
//                             headers, dp_rank out of range, unknown tensor,
//                             chunk of another shard, bad dtype, byte length
//                             not a multiple of the dtype size, offsets out
//                             of range, a chunk not covered exactly once,
//                             a NaN/Inf value (also counted in
//                             rejected_nonfinite_pushes);
//                           FailedPrecondition wrong partition_version, a
//                             step already applied ("already applied") or a
//                             step beyond the version ("step far in the
//                             future").
//                         A chunk a rank already pushed for the step (a
//                         retry) is counted as duplicate and ignored.
//   GradNorm(step)        waits until every rank pushed every chunk, then
//                         returns the sum of squares of the averaged gradient
//                         (rank buffers summed in rank order, divided by dp:
//                         deterministic whatever the arrival order). Also
//                         answers for the step applied last. Timeout:
//                         DeadlineExceeded naming the missing ranks; a step
//                         beyond the version: FailedPrecondition.
//   Apply(step, gss)      first call for step == version: clip with the
//                         global norm sqrt(gss), apply the optimizer with the
//                         scheduled learning rate (server/optimizer.h),
//                         version = step + 1, clear the gradients, and write
//                         a checkpoint when (step + 1) is a multiple of
//                         train.checkpoint_interval, train.steps or
//                         train.stop_after_step. Calls for older steps return
//                         the current version. FailedPrecondition if the
//                         gradients are incomplete or the step is beyond
//                         the version; InvalidArgument for a negative or
//                         non-finite gss.
//   Pull(step)            waits until version >= step, returns the values of
//                         the requested tensors' chunks (F32 or BF16) as
//                         messages of at most spec.max_message_bytes of
//                         payload each, with the version they hold.
//
// Every wait ends at the earlier of the caller's deadline and
// options.wait_timeout from the call, or when Shutdown() is called
// (Unavailable).
//
// Thread-safety: all methods are thread-safe. State is guarded by one
// reader/writer mutex: Pull, TensorInfo and Snapshot share it (concurrent
// pulls copy in parallel), Push/Apply take it exclusively (Apply also while
// writing its checkpoint, so a checkpoint is a consistent version), and
// waits release it.
#ifndef LMPS_SERVER_SHARD_H_
#define LMPS_SERVER_SHARD_H_

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "common/model_spec.h"
#include "proto/lmps.pb.h"
#include "server/checkpoint.h"

namespace lmps {

struct ShardOptions {
  int shard = 0;
  JobSpec spec;      // with defaults applied (ApplyJobSpecDefaults); validated
  PartitionMap map;  // must equal ComputePartition for the spec
  // Where checkpoints are written (and read when start_step > 0); empty:
  // never write checkpoints.
  std::string checkpoint_dir;
  // 0: initialise (see init_from_safetensors); > 0: load the checkpoint of
  // this step for this shard from checkpoint_dir (error if missing/corrupt).
  int64_t start_step = 0;
  // With start_step 0: initial weights from this safetensors file (every
  // tensor the shard holds must be present with the model's shape); empty:
  // deterministic initialisation (common/init.h, seed train.seed).
  std::string init_from_safetensors;
  // Upper bound of every wait (GradNorm, Pull).
  absl::Duration wait_timeout = absl::Seconds(60);
  // Progress and error lines (checkpoints written, ...); may be empty.
  std::function<void(const std::string&)> log;
};

class ParameterShard {
 public:
  // Validates the options and initialises the parameters (see ShardOptions).
  static absl::StatusOr<std::unique_ptr<ParameterShard>> Create(
      ShardOptions options);

  ParameterShard(const ParameterShard&) = delete;
  ParameterShard& operator=(const ParameterShard&) = delete;
  ~ParameterShard();

  // One push stream (every message of one Push RPC). See the file comment.
  absl::StatusOr<PushResponse> Push(const std::vector<PushRequest>& stream);

  // Sum of squares of this shard's averaged gradient for `step`.
  absl::StatusOr<double> GradNorm(int64_t step, absl::Time deadline);

  // Applies `step`; returns the version after it. If the optimizer step
  // succeeded but writing the checkpoint failed, the update stays applied
  // (the shard is consistent) and the error is returned.
  absl::StatusOr<int64_t> Apply(int64_t step, double global_sum_squares);

  // The parameters at version >= request.step (partition_version 0 is not
  // checked, for grpcurl). NotFound for a tensor not in the model.
  absl::StatusOr<std::vector<PullResponse>> Pull(const PullRequest& request,
                                                 absl::Time deadline);

  // Metadata and L2 norm of this shard's part of `tensor` (empty: every
  // tensor the shard holds a chunk of). NotFound for an unknown tensor.
  absl::StatusOr<TensorInfoResponse> TensorInfo(
      const std::string& tensor) const;

  // Writes the checkpoint of the current version (Apply does this on its
  // own at the configured steps).
  absl::Status WriteCheckpoint();

  // Ends every current and future wait with Unavailable; pushes and applies
  // are refused afterwards. Idempotent.
  void Shutdown();

  // A copy of the current parameters and optimizer state, as a checkpoint
  // would hold them (for tests and tools).
  ShardCheckpoint Snapshot() const;

  int shard() const { return options_.shard; }
  const JobSpec& spec() const { return options_.spec; }
  const PartitionMap& partition() const { return options_.map; }
  int64_t num_elements() const { return num_elements_; }  // of this shard
  int64_t version() const;
  int64_t rejected_nonfinite_pushes() const;
  // sqrt(global_sum_squares) of the last applied step (0 before any).
  double last_grad_norm() const;
  int64_t duplicate_chunks() const;
  // The status of the last checkpoint write (OK if none yet).
  absl::Status last_checkpoint_status() const;

 private:
  struct Chunk {
    ChunkDesc desc;
    const TensorSpec* tensor = nullptr;  // into tensors_
    int64_t size() const { return desc.end() - desc.begin(); }
    std::vector<float> params;
    std::vector<std::vector<float>> state;  // optimizer buffers
    // Per dp rank: the gradient pushed for the current step; after the
    // reduction grads[0] holds the averaged gradient.
    std::vector<std::vector<float>> grads;
    std::vector<char> received;  // per dp rank
  };

  explicit ParameterShard(ShardOptions options);
  absl::Status Init();
  absl::Status InitFromCheckpoint() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::Status InitFromSafetensors() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void Log(const std::string& line) const;
  absl::Time WaitDeadline(absl::Time deadline) const;
  // Index of the chunk (tensor, chunk index) of this shard, or -1.
  int FindChunk(const std::string& tensor, int index) const;

  bool CompleteLocked() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // "no gradients from dp ranks [1, 2]<after> (dp rank 2 pushed 1 of 13
  // chunks)".
  std::string MissingRanksLocked(absl::string_view after) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Sums the rank buffers into grads[0], divides by dp, computes the sum of
  // squares; once per step.
  void ReduceLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void ResetGradientsLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  bool ShouldCheckpoint(int64_t version) const;
  absl::Status WriteCheckpointLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  // Immutable after Create.
  ShardOptions options_;
  std::vector<TensorSpec> tensors_;          // the whole model
  std::map<std::string, int> tensor_index_;  // name -> tensors_ index
  std::map<std::pair<std::string, int>, int> chunk_index_;  // -> chunks_
  std::map<std::pair<std::string, int>, int> chunk_owner_;  // -> shard id
  int dp_ = 1;
  std::vector<int64_t> chunk_sizes_;  // elements of chunks_[i]
  int64_t num_elements_ = 0;

  mutable absl::Mutex mu_;
  std::vector<Chunk> chunks_ ABSL_GUARDED_BY(mu_);
  int64_t version_ ABSL_GUARDED_BY(mu_) = 0;
  std::vector<int> chunks_received_ ABSL_GUARDED_BY(mu_);  // per dp rank
  bool reduced_ ABSL_GUARDED_BY(mu_) = false;
  double sum_squares_ ABSL_GUARDED_BY(mu_) = 0;
  // GradNorm of the step applied last (answers late GradNorm calls).
  int64_t last_applied_step_ ABSL_GUARDED_BY(mu_) = -1;
  double last_sum_squares_ ABSL_GUARDED_BY(mu_) = 0;
  bool shutdown_ ABSL_GUARDED_BY(mu_) = false;
  int64_t rejected_nonfinite_ ABSL_GUARDED_BY(mu_) = 0;
  double last_grad_norm_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t duplicates_ ABSL_GUARDED_BY(mu_) = 0;
  absl::Status checkpoint_status_ ABSL_GUARDED_BY(mu_);
};

}  // namespace lmps

#endif  // LMPS_SERVER_SHARD_H_
