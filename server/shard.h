// ParameterShard: the logic of one parameter-server shard, free of gRPC so
// it is unit-tested without a network (server/service.h adapts it).
//
// A shard owns the chunks ChunksOfShard(map, shard) of the model: their fp32
// parameters at version() and the optimizer state. It guarantees:
//  - a push stream is validated whole before anything changes (a rejected
//    push changes nothing but, for a NaN or Inf, a counter); a retried
//    chunk (part) counts once;
//  - SYNC and BOUNDED_STALENESS (staleness s; SYNC is s = 0, one code path):
//    steps are applied in order, each averaging every dp replica's gradient
//    (summed in rank order: deterministic whatever the arrival order) and
//    clipped with the exact global norm; a pull of step t waits for version
//    >= t - s;
//  - ASYNC: each rank's complete push is one update, clipped by this
//    shard's share of grad_clip; a pull of t waits for version >= t;
//  - with pipeline or tensor parallelism a replica's chunk is the sum of its
//    contributors' parts, so results equal a pp = tp = 1 job's;
//  - a checkpoint holds one consistent version.
// The full rules of every call in every mode, with their errors, are in
// docs/parameter-shard.md.
//
// Thread-safety: every method is thread-safe. One reader/writer mutex guards
// the state: Pull, TensorInfo and Snapshot share it, Push and Apply take it
// exclusively (also while writing a checkpoint), and waits release it.
// Every wait ends at the earlier of the caller's deadline and
// options.wait_timeout, or with Unavailable at Shutdown().
//
// The definitions are split by seam over shard*.cc (docs/parameter-shard.md
// lists which file holds what).
#ifndef LMPS_SERVER_SHARD_H_
#define LMPS_SERVER_SHARD_H_

#include <grpcpp/support/byte_buffer.h>

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
#include "common/model/model_spec.h"
#include "common/wire/chunk_wire.h"
#include "common/threads/thread_pool.h"
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
  // With start_step 0: initial weights from this safetensors file, or a
  // directory holding model.safetensors, in lmps's or Hugging Face's layout
  // (common/formats/gpt2_weights.h: the file must hold exactly the model's
  // tensors, with its shapes; the shard copies its own chunks); empty:
  // deterministic initialisation (common/model/init.h, seed train.seed).
  std::string init_from_safetensors;
  // Upper bound of every wait (GradNorm, Pull).
  absl::Duration wait_timeout = absl::Seconds(60);
  // Threads (>= 1, the calling one included) of the gradient norm and the
  // optimizer step, in blocks of kNormBlockElements (server/optimizer.h);
  // results are bitwise the same for every count.
  int threads = 1;
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

  // One push stream (every message of one Push RPC); see
  // docs/parameter-shard.md.
  absl::StatusOr<PushResponse> Push(const std::vector<PushRequest>& stream);
  // The same, on messages read in place from gRPC's buffers
  // (common/wire/chunk_wire.h; the service's raw Push): no payload is
  // copied before it is decoded into the gradient accumulator.
  absl::StatusOr<PushResponse> Push(const std::vector<PushRequestView>& stream);

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
  // With request.with_optimizer_state (F32 only) each slice also carries
  // the optimizer state of its elements.
  absl::StatusOr<std::vector<PullResponse>> Pull(const PullRequest& request,
                                                 absl::Time deadline);

  // The same pull, streamed: StartPull validates the request and waits like
  // Pull, then returns the plan of its messages (which element ranges each
  // holds, at most max_message_bytes of payload), and EncodePull encodes
  // message i of the plan straight from the parameters under the shared
  // lock, so a pull never holds more than the message being encoded (Pull
  // builds them all). Every message carries the plan's version: the version
  // the read rule admitted. In SYNC the parameters cannot change while the
  // pull streams (the next Apply needs this worker's push); in the other
  // modes a later message may hold a newer version's values, at least the
  // plan's (like the shards of one pull, which were never one snapshot).
  // EncodePull fails like Pull once the shard is shutting down or stopped
  // for a resize.
  struct PullPiece {
    int chunk = 0;       // index into chunks_
    int64_t begin = 0;   // element range inside the chunk
    int64_t end = 0;
  };
  struct PullPlan {
    int64_t version = 0;
    int64_t step = 0;
    DType dtype = F32;
    bool with_state = false;  // request.with_optimizer_state
    std::vector<std::vector<PullPiece>> messages;  // at least one (empty)
    // Shared-memory pulls (PullRequest.shm; FitSharedWindow): EncodePull
    // writes the payloads at shm + shm_offset on (SharedPayloadSpan), and the
    // slices name their bytes (the caller keeps the region mapped).
    char* shm = nullptr;
    int64_t shm_offset = 0;
    int32_t next_message = 0;  // PullResponse.next_message
  };
  absl::StatusOr<PullPlan> StartPull(const PullRequest& request,
                                     absl::Time deadline);
  // Message i as the serialized PullResponse (common/wire/chunk_wire.h:
  // the payloads are encoded once into the slices gRPC sends).
  absl::Status EncodePull(const PullPlan& plan, size_t i,
                          grpc::ByteBuffer* out) const;
  // A shared-memory pull's part of `plan` (PullRequest.shm): its messages
  // from `first` on, as many whole ones as fit in `window_bytes`, as one
  // message written at `shm` + `shm_offset`; sets next_message.
  // InvalidArgument for `first` outside the plan; FailedPrecondition
  // (kSharedMemoryRefused) when not even message `first` fits.
  static absl::Status FitSharedWindow(int32_t first, char* shm,
                                      int64_t shm_offset,
                                      int64_t window_bytes, PullPlan* plan);

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
  // Bytes of gradient buffers held now: SYNC / BOUNDED_STALENESS one
  // accumulator per chunk per pending step plus the ranks held while they
  // wait for their turn (StepGrads); ASYNC one buffer per rank.
  int64_t gradient_bytes() const;
  // The status of the last checkpoint write (OK if none yet).
  absl::Status last_checkpoint_status() const;

  ConsistencyMode mode() const { return options_.spec.train().mode(); }
  // Per dp rank: steps completely pushed to this shard (replica clocks in
  // docs/parameter-shard.md); index = dp rank.
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
  //
  // Memory: one accumulator per chunk, not one buffer per rank. The average
  // is (((g0 + g1) + g2) + ...) / dp in rank order (deterministic whatever
  // the arrival order); a rank's gradient is folded into the accumulator
  // as soon as its turn has come -- decoded and added straight from the
  // push when one contributor owns the whole chunk -- and held in a buffer
  // of its own only while it waits for earlier ranks or for its other
  // contributors' parts. Ranks 0 and 1 may come in either order: the first
  // addition is commutative, so g1 + g0 == g0 + g1 bit for bit.
  struct StepGrads {
    int64_t step = -1;  // -1: free
    // [chunk]: the sum of the folded ranks' gradients; after the
    // reduction, the average.
    std::vector<std::vector<float>> sum;
    std::vector<int> folded;        // [chunk]: ranks folded into sum
    std::vector<int> first_folded;  // [chunk]: rank folded first (0 or 1)
    // [chunk][rank]: a rank's gradient (its contributors' parts summed)
    // waiting to be folded; empty when none.
    std::vector<std::vector<std::vector<float>>> held;
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
    const ChunkSliceView* slice;
  };
  using PushedPieces = std::map<int, std::vector<PushedPiece>>;  // chunk -> pieces

  explicit ParameterShard(ShardOptions options);
  absl::Status Init();
  // The error of a pull of a step at or after stop_at_.
  absl::Status PullStoppedLocked() const ABSL_SHARED_LOCKS_REQUIRED(mu_);

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
  // Takes rank `rank`'s part of chunk `c` (pieces of one push) into the
  // slot: folded now when its turn has come, else held (StepGrads).
  void TakePartLocked(StepGrads* slot, int c, int rank,
                      const std::vector<PushedPiece>& list)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Whether rank `rank` is next to be folded into chunk c's sum.
  bool FoldableLocked(const StepGrads& slot, int c, int rank) const
      ABSL_SHARED_LOCKS_REQUIRED(mu_);
  // Folds every held, complete rank of chunk c whose turn has come.
  void FoldHeldLocked(StepGrads* slot, int c)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Divides the sums by dp and computes the sum of squares; once per step
  // (every rank folded).
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
  // options_.threads; used under mu_ only (one ParallelFor at a time).
  std::unique_ptr<ThreadPool> pool_;

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
