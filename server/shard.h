// ParameterShard: the logic of one parameter-server shard, free of gRPC so
// it is unit-tested without a network (server/service.h adapts it).
//
// A shard owns the chunks ChunksOfShard(map, shard) of the model: their fp32
// parameters at `version` and the optimizer state. How pushed gradients
// become updates depends on spec.train.mode (ConsistencyMode); the rules of
// every mode are below. s is train.staleness in BOUNDED_STALENESS and 0 in
// SYNC: SYNC is exactly BOUNDED_STALENESS with s = 0 (one code path).
//
// Chunk parts (pipeline and tensor parallel, layout.pp * layout.tp > 1):
// the partition does not depend on pp or tp, so one replica's gradient of
// a chunk may come in parts from several of its workers. The contributors
// of a chunk are the workers (pp_rank, tp_rank) whose
// ParallelLayout::Pushed ranges of the tensor intersect it
// (common/parallel_layout.h); each pushes exactly its ranges within the
// chunk (PushRequest.pp_rank/tp_rank), and the replica's chunk is complete
// once every contributor pushed. Parts that overlap -- only wte, pushed by
// the first and the last stage -- are summed (in float, 0 + a + b, whatever
// the order). With pp = tp = 1 the only contributor is (0, 0), owning whole
// chunks: everything below reads "chunk" for "chunk part" then. A chunk
// owned whole by one contributor is decoded straight into its gradient
// buffer; one of several is summed into a buffer zeroed when its first part
// arrives. A
// replica's gradient for a chunk is its contributors' parts summed, so
// everything after a complete push (GradNorm, Apply, clocks, ASYNC updates)
// is the same as with pp = tp = 1: the result equals a pp = tp = 1 job
// pushed the equivalent full gradient.
//
// Replica clocks (every mode): clock[r] = the number of steps data-parallel
// rank r has completely pushed to this shard (the step after the last one
// whose every chunk of this shard arrived), starting at start_step. When a
// push of step t from rank r completes, its lead t - min_q clock[q] (taken
// before clock[r] advances) is how many steps ahead of the slowest replica
// the gradient was computed; max_staleness_seen() is the largest lead so
// far: always 0 in SYNC, <= s in BOUNDED_STALENESS, unbounded in ASYNC.
//
// SYNC and BOUNDED_STALENESS (stale synchronous parallel, SSP) --
// `version` is the number of steps applied; step t's update averages every
// replica's gradient for step t, and steps are applied in order:
//
//   Push(step)            accepted for version <= step <= version + s; every
//                         dp rank pushes its gradient for every chunk (in
//                         one or several streams; every contributor its
//                         parts, each stream from one (dp_rank, pp_rank,
//                         tp_rank)). The shard keeps one
//                         gradient buffer per (pending step, rank), so up to
//                         (s + 1) * dp copies of its chunks. The whole
//                         stream is validated before anything changes;
//                         errors:
//                           InvalidArgument   malformed stream: mixed
//                             headers, dp_rank, pp_rank or tp_rank out of
//                             range, unknown tensor, chunk of another shard,
//                             bad dtype, byte length not a multiple of the
//                             dtype size, offsets out of range, a chunk (the
//                             pusher's part of it) not covered exactly once
//                             or with elements outside that part (naming the
//                             chunk, "(dp rank R, pp P, tp T)" and the
//                             missing or extra elements), a chunk the pusher
//                             "owns no part of", a NaN/Inf value (also
//                             counted in rejected_nonfinite_pushes);
//                           FailedPrecondition wrong partition_version, a
//                             step already applied ("already applied"; but
//                             a push of an applied step from a rank whose
//                             gradient for it had completely arrived is a
//                             retry, acknowledged as duplicate) or a
//                             step beyond version + s ("far in the future").
//                         A chunk (part) a rank's contributor already
//                         pushed for the step (a retry) is counted as
//                         duplicate and ignored.
//   GradNorm(step)        waits until every rank pushed every chunk for
//                         step, then returns the sum of squares of the
//                         averaged gradient (rank buffers summed in rank
//                         order, divided by dp: deterministic whatever the
//                         arrival order). Also answers for the last s + 1
//                         applied steps. Timeout: DeadlineExceeded naming the
//                         missing ranks (with pp * tp > 1 also the
//                         contributors missing parts: "dp rank 0 (pp 1, tp
//                         0) pushed 3 of 5 chunk parts"); a step beyond the
//                         version: FailedPrecondition.
//   Apply(step, gss)      first call for step == version: clip with the
//                         global norm sqrt(gss), apply the optimizer with the
//                         scheduled learning rate (server/optimizer.h),
//                         version = step + 1, free the step's gradients, and
//                         write a checkpoint when (step + 1) is a multiple of
//                         train.checkpoint_interval, train.steps or
//                         train.stop_after_step. Calls for older steps return
//                         the current version. FailedPrecondition if the
//                         gradients are incomplete or the step is beyond
//                         the version; InvalidArgument for a negative or
//                         non-finite gss.
//   Pull(step)            the SSP read rule: waits until
//                         version >= step - s, then returns the values of the
//                         requested tensors' chunks (F32 or BF16) as messages
//                         of at most spec.max_message_bytes of payload each,
//                         with the version they hold (the latest, which may
//                         be newer than step - s). version >= step - s means
//                         steps < step - s are applied, so every replica has
//                         completed at least step - s steps: a replica at
//                         step t never computes on parameters that miss more
//                         than s of the slowest replica's steps. A timeout
//                         names the replicas whose clocks are behind. With
//                         owned_only, only the element ranges worker
//                         (pp_rank, tp_rank) holds (ParallelLayout::Held)
//                         of each chunk, as slices with offsets inside the
//                         chunk (a range may be split over messages);
//                         InvalidArgument for ranks outside the layout.
//
//   Why this SSP and not per-push application: gradients are still
//   aggregated per step over all replicas with the exact global-norm clip,
//   only the parameters a replica reads may lag by up to s versions, so
//   s = 0 is bit-for-bit SYNC and s > 0 only changes which parameter
//   version each gradient was computed on (as in Ho et al., NIPS 2013,
//   with the clock being the step and updates applied in step order).
//   The worker (worker/trainer.h) drives it: after pushing step t it calls
//   GradNorm/Apply for step t - s (which waits for the slowest replica to
//   push step t - s), so its next pull, for t + 1, needs no wait.
//
// ASYNC -- `version` counts applied updates (pushes), not steps:
//
//   Push(step)            as above, except that the step only has to be >=
//                         the rank's clock (each rank's steps arrive in
//                         order; an older one was applied already and is
//                         acknowledged as duplicate: a replacement's retry)
//                         and a rank has at most one push in
//                         flight (a different step while one is incomplete:
//                         FailedPrecondition). As soon as the rank's gradient
//                         for the step has every chunk of this shard it is
//                         applied on its own, under the lock, before Push
//                         returns: clipped, learning rate of `step` on the
//                         train.steps schedule, AdamW bias correction
//                         counting updates (version), version += 1.
//                         Clipping cannot use the global norm without
//                         synchronising the shards, so each shard clips its
//                         part g_k of the pushed gradient to
//                           c_k = grad_clip * sqrt(n_k / n)
//                         (n_k: this shard's elements, n: the model's), i.e.
//                         scale = min(1, c_k / (|g_k| + 1e-6)). The c_k^2 add
//                         up to grad_clip^2, so the whole update's norm never
//                         exceeds grad_clip; with one shard it is exactly the
//                         global clip, with several it can clip a shard whose
//                         part is unusually large when the total is not.
//                         Checkpoints are written when min_r clock[r] reaches
//                         a checkpoint step and are labelled with it (they
//                         also hold the faster replicas' later updates, so a
//                         resume repeats those: at-least-once); a resumed
//                         shard starts with version = that step.
//   GradNorm, Apply       FailedPrecondition: not used in ASYNC.
//   Pull(step)            waits until version >= step (a worker asks for 0,
//                         or its last seen version: no wait; the final pull
//                         asks for the version after every replica's last
//                         push) and returns the latest parameters.
//
// Every wait ends at the earlier of the caller's deadline and
// options.wait_timeout from the call, or when Shutdown() is called
// (Unavailable).
//
// Metrics (the daemon exports them): version() as lmps_parameter_version,
// max_staleness_seen() as lmps_staleness_steps{kind="max_seen"}, and
// replica_clocks()[r] as lmps_replica_clock_steps{dp_rank="r"}; step_clock()
// is the shard's progress in steps for heartbeats (version in SYNC and
// BOUNDED_STALENESS, min replica clock in ASYNC).
//
// Thread-safety: all methods are thread-safe. State is guarded by one
// reader/writer mutex: Pull, TensorInfo and Snapshot share it (concurrent
// pulls copy in parallel), Push/Apply take it exclusively (Apply, and an
// ASYNC Push that completes a gradient, also while writing its checkpoint,
// so a checkpoint is a consistent version), and waits release it.
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
  // FailedPrecondition in ASYNC.
  absl::StatusOr<double> GradNorm(int64_t step, absl::Time deadline);

  // Applies `step`; returns the version after it. If the optimizer step
  // succeeded but writing the checkpoint failed, the update stays applied
  // (the shard is consistent) and the error is returned. FailedPrecondition
  // in ASYNC.
  absl::StatusOr<int64_t> Apply(int64_t step, double global_sum_squares);

  // The parameters once the mode's read rule allows request.step (version
  // >= step - s; ASYNC: version >= step); partition_version 0 is not
  // checked, for grpcurl. NotFound for a tensor not in the model. With
  // request.owned_only: only the parts worker (pp_rank, tp_rank) holds.
  absl::StatusOr<std::vector<PullResponse>> Pull(const PullRequest& request,
                                                 absl::Time deadline);

  // Elastic data parallelism (StopAtRequest in proto/lmps.proto): stop at
  // step boundary `step`: checkpoint `step` once version `step` exists,
  // Aborted for pulls of steps >= `step` and for GradNorm waits of steps
  // >= `step` whose gradients are incomplete (a dead replica's). Returns the version;
  // FailedPrecondition if the version is already past `step` or in ASYNC.
  absl::StatusOr<int64_t> StopAt(int64_t step);

  // Metadata and L2 norm of this shard's part of `tensor` (empty: every
  // tensor the shard holds a chunk of). NotFound for an unknown tensor.
  absl::StatusOr<TensorInfoResponse> TensorInfo(
      const std::string& tensor) const;

  // Writes the checkpoint of the current version, labelled step_clock()
  // (Apply, or an ASYNC Push, does this on its own at the configured
  // steps).
  absl::Status WriteCheckpoint();

  // Ends every current and future wait with Unavailable; pushes and applies
  // are refused afterwards. Idempotent.
  void Shutdown();

  // A copy of the current parameters and optimizer state, as a checkpoint
  // would hold them (for tests, tools and shard replication).
  ShardCheckpoint Snapshot() const;

  // Shard replication (server/replication.h): what a new backup needs on
  // top of Snapshot(). The sums of squares of the last s + 1 applied steps
  // (answers to late GradNorm calls), by step.
  std::map<int64_t, double> AppliedSumSquares() const;
  // True while gradients of a step not yet applied are held (SYNC: between
  // the first push of step `version` and its Apply).
  bool HasPendingGradients() const;
  // Makes this shard a copy of a primary's state: parameters and optimizer
  // state of `snapshot` (same shard, chunks and optimizer, else
  // InvalidArgument naming the difference), version = snapshot.header.step,
  // every replica clock = version, no pending gradients, `applied` and
  // `last_grad_norm` as the primary had them. SYNC / BOUNDED_STALENESS.
  absl::Status Restore(const ShardCheckpoint& snapshot,
                       const std::map<int64_t, double>& applied,
                       double last_grad_norm);

  int shard() const { return options_.shard; }
  const JobSpec& spec() const { return options_.spec; }
  const PartitionMap& partition() const { return options_.map; }
  int64_t num_elements() const { return num_elements_; }  // of this shard
  int64_t version() const;
  int64_t rejected_nonfinite_pushes() const;
  // sqrt(global_sum_squares) of the last applied step (0 before any); in
  // ASYNC the norm of this shard's part of the last applied push.
  double last_grad_norm() const;
  int64_t duplicate_chunks() const;
  // The status of the last checkpoint write (OK if none yet).
  absl::Status last_checkpoint_status() const;

  ConsistencyMode mode() const { return options_.spec.train().mode(); }
  // Per dp rank: steps completely pushed to this shard (see the file
  // comment); index = dp rank.
  std::vector<int64_t> replica_clocks() const;
  // Largest lead (pushed step - slowest replica's clock) of a completed
  // push so far; 0 in SYNC, <= train.staleness in BOUNDED_STALENESS.
  int64_t max_staleness_seen() const;
  // Progress in steps: version() in SYNC and BOUNDED_STALENESS, the
  // smallest replica clock in ASYNC (where version counts pushes).
  int64_t step_clock() const;

 private:
  struct Chunk {
    ChunkDesc desc;
    const TensorSpec* tensor = nullptr;  // into tensors_
    int64_t size() const { return desc.end() - desc.begin(); }
    std::vector<float> params;
    std::vector<std::vector<float>> state;  // optimizer buffers
  };

  // Element offsets [begin, end) inside a chunk.
  struct OffsetRange {
    int64_t begin = 0;
    int64_t end = 0;
  };
  // A worker (pp_rank, tp_rank) that pushes part of a chunk.
  struct Contributor {
    int worker = 0;  // pp_rank * tp + tp_rank
    // Pushed(tensor, pp_rank, tp_rank) within the chunk: sorted, adjacent
    // ranges merged, non-empty.
    std::vector<OffsetRange> ranges;
  };
  // Who holds and who pushes which part of one chunk (immutable).
  struct ChunkOwners {
    std::vector<Contributor> contributors;  // in worker order
    std::vector<int> contributor_of;  // per worker: index or -1
    // Per worker: Held(...) within the chunk, merged (what an owned_only
    // pull of that worker returns).
    std::vector<std::vector<OffsetRange>> held;
    // One contributor owning the whole chunk (always so with pp = tp = 1):
    // its part is decoded straight into the gradient buffer.
    bool direct = false;
  };

  // SYNC / BOUNDED_STALENESS: the gradients of one pending step. Slot
  // step % (s + 1) of step_slots_ holds step `step`, whose buffers are
  // allocated on first use.
  struct StepGrads {
    int64_t step = -1;  // -1: free
    // [chunk][rank]: the gradient rank pushed (its contributors' parts
    // summed); after the reduction [chunk][0] holds the average.
    std::vector<std::vector<std::vector<float>>> grads;
    // [chunk][rank * contributors + k]: contributor k pushed its part.
    std::vector<std::vector<char>> received;
    std::vector<std::vector<int>> parts;  // [chunk][rank]: parts received
    std::vector<int> chunks_received;     // per rank: complete chunks
    bool reduced = false;
    double sum_squares = 0;
  };

  // ASYNC: the gradient of one rank being received.
  struct RankGrads {
    int64_t step = -1;
    std::vector<std::vector<float>> grads;   // per chunk
    std::vector<std::vector<char>> received;  // [chunk][contributor]
    std::vector<int> parts;                   // per chunk: parts received
    int parts_received = 0;                   // over all chunks
    int chunks_received = 0;                  // complete chunks
  };

  // Part of a chunk carried by one ChunkSlice of a push.
  struct PushedPiece {
    int64_t offset, n;
    const ChunkSlice* slice;
  };
  using PushedPieces = std::map<int, std::vector<PushedPiece>>;  // chunk -> pieces

  explicit ParameterShard(ShardOptions options);
  absl::Status Init();
  // pp_, tp_, owners_ and parts_of_worker_ from the layout (after chunks_).
  absl::Status InitOwners() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::Status InitFromCheckpoint() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::Status InitFromSafetensors() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void Log(const std::string& line) const;
  absl::Time WaitDeadline(absl::Time deadline) const;
  // Index of the chunk (tensor, chunk index) of this shard, or -1.
  int FindChunk(const std::string& tensor, int index) const;

  // Checks that the sorted `list` tiles exactly contributor `k`'s part of
  // chunk `c`; "" or what is wrong (missing, overlapping or extra elements).
  std::string TilingError(int c, int k, const std::vector<PushedPiece>& list) const;
  // Decodes the pieces of a part of chunk `c` into `dst` (its gradient
  // buffer): directly when one contributor owns the whole chunk, else added
  // to it (zeroed first when `first`).
  void DecodePart(int c, const std::vector<PushedPiece>& list, bool first,
                  float* dst) const;

  // SYNC / BOUNDED_STALENESS. `worker` = pp_rank * tp + tp_rank.
  absl::StatusOr<PushResponse> PushStepLocked(int rank, int worker,
                                              int64_t step,
                                              const PushedPieces& pieces,
                                              const std::string& who)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // The slot for `step` (version <= step <= version + s), claimed for it.
  StepGrads& SlotLocked(int64_t step) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // The slot holding `step`, or nullptr if nothing was pushed for it yet.
  StepGrads* FindSlotLocked(int64_t step) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  const StepGrads* FindSlotLocked(int64_t step) const
      ABSL_SHARED_LOCKS_REQUIRED(mu_);
  bool CompleteLocked(int64_t step) const ABSL_SHARED_LOCKS_REQUIRED(mu_);
  // "no gradients from dp ranks [1, 2]<after> (dp rank 2 pushed 1 of 13
  // chunks)"; with pp * tp > 1 the details name the contributors: "(dp
  // rank 2 (pp 1, tp 0) pushed 3 of 5 chunk parts)".
  std::string MissingRanksLocked(int64_t step, absl::string_view after) const
      ABSL_SHARED_LOCKS_REQUIRED(mu_);
  // Sums the rank buffers into grads[c][0], divides by dp, computes the sum
  // of squares; once per step.
  void ReduceLocked(StepGrads* slot) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Applies the optimizer to every chunk with gradient grads[c] * scale.
  void OptimizerStepLocked(const std::vector<const float*>& grads,
                           float scale, double lr, int64_t update)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  // ASYNC.
  absl::StatusOr<PushResponse> PushAsyncLocked(int rank, int worker,
                                               int64_t step,
                                               const PushedPieces& pieces,
                                               const std::string& who)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Applies rank's complete gradient as one update; then checkpoints if the
  // slowest clock reached a checkpoint step.
  absl::Status ApplyAsyncLocked(int rank) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  // Replica clocks: a push of `step` by `rank` completed.
  void PushCompletedLocked(int rank, int64_t step)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  int64_t MinClockLocked() const ABSL_SHARED_LOCKS_REQUIRED(mu_);
  int64_t StepClockLocked() const ABSL_SHARED_LOCKS_REQUIRED(mu_);
  // "dp rank 1 has completed 3 steps" for every rank with clock < needed.
  std::string SlowRanksLocked(int64_t needed) const
      ABSL_SHARED_LOCKS_REQUIRED(mu_);
  // Logs the replica clocks and the largest staleness once, when the
  // slowest replica completes the last step of this run.
  void MaybeLogEndLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  bool ShouldCheckpoint(int64_t step) const;
  // Writes the checkpoint labelled StepClockLocked().
  absl::Status WriteCheckpointLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  // Immutable after Create.
  ShardOptions options_;
  std::vector<TensorSpec> tensors_;          // the whole model
  std::map<std::string, int> tensor_index_;  // name -> tensors_ index
  std::map<std::pair<std::string, int>, int> chunk_index_;  // -> chunks_
  std::map<std::pair<std::string, int>, int> chunk_owner_;  // -> shard id
  int dp_ = 1;
  int pp_ = 1, tp_ = 1;  // layout.pp, layout.tp
  std::vector<ChunkOwners> owners_;  // per chunk of chunks_
  // Per worker (pp_rank * tp + tp_rank): chunks it pushes a part of.
  std::vector<int> parts_of_worker_;
  ConsistencyMode mode_ = SYNC;
  int staleness_ = 0;                 // s: 0 in SYNC and ASYNC
  int64_t end_step_ = 0;              // last step of this run
  std::vector<int64_t> chunk_sizes_;  // elements of chunks_[i]
  int64_t num_elements_ = 0;
  int64_t model_elements_ = 0;  // of the whole model
  double async_clip_fraction_ = 1;  // sqrt(num_elements_ / model_elements_)

  mutable absl::Mutex mu_;
  std::vector<Chunk> chunks_ ABSL_GUARDED_BY(mu_);
  int64_t version_ ABSL_GUARDED_BY(mu_) = 0;
  std::vector<StepGrads> step_slots_ ABSL_GUARDED_BY(mu_);  // s + 1
  std::vector<RankGrads> rank_grads_ ABSL_GUARDED_BY(mu_);  // ASYNC, per rank
  // Sums of squares of the last s + 1 applied steps (late GradNorm calls).
  std::map<int64_t, double> applied_sum_squares_ ABSL_GUARDED_BY(mu_);
  std::vector<int64_t> clocks_ ABSL_GUARDED_BY(mu_);  // per dp rank
  int64_t max_staleness_ ABSL_GUARDED_BY(mu_) = 0;
  bool logged_end_ ABSL_GUARDED_BY(mu_) = false;
  bool shutdown_ ABSL_GUARDED_BY(mu_) = false;
  int64_t stop_at_ ABSL_GUARDED_BY(mu_) = -1;  // StopAt; -1: none
  int64_t rejected_nonfinite_ ABSL_GUARDED_BY(mu_) = 0;
  double last_grad_norm_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t duplicates_ ABSL_GUARDED_BY(mu_) = 0;
  absl::Status checkpoint_status_ ABSL_GUARDED_BY(mu_);
};

}  // namespace lmps

#endif  // LMPS_SERVER_SHARD_H_
