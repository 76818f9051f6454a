// TrainingLoop: what the worker daemon (worker/worker_daemon.h) drives,
// whatever the layout. Two loops implement it:
//   DataParallelTrainer (worker/trainer.h): pp = tp = 1, the whole model
//     (GptModel) per replica;
//   PipelineTrainer (worker/pipeline/pipeline_trainer.h): pp * tp > 1, one
//     stage's tensor-parallel slices (StageModel) per worker.
// Both run the same step against the shards: pull, forward and backward,
// push, then GradNorm and Apply (ApplyStepOnShards) in the job's
// consistency mode; they report the same TrainerProgress.
//
// Thread-safety: Run() on one thread; Cancel() from any thread; progress()
// and end_step() on Run()'s thread or after it returned.
#ifndef LMPS_WORKER_TRAINING_LOOP_H_
#define LMPS_WORKER_TRAINING_LOOP_H_

#include <atomic>
#include <cmath>
#include <cstdint>
#include <functional>
#include <string>

#include "absl/status/status.h"
#include "absl/time/time.h"
#include "proto/lmps.pb.h"
#include "worker/ps_client.h"

namespace lmps {

struct TrainerProgress {
  int64_t step = 0;          // steps this replica completed
  int64_t end_step = 0;
  // The smallest version the shards served for the last step's pull.
  int64_t pulled_version = 0;
  // Staleness of the parameters the last step computed on, in steps
  // (exported as lmps_staleness_steps): step - pulled_version in SYNC
  // (always 0) and BOUNDED_STALENESS (at most train.staleness). In ASYNC the
  // version counts pushes, so it is step - (start_step + (pulled_version -
  // start_step) / dp), floored at 0: how far this replica is ahead of the
  // replicas' average progress as seen in the parameters it used.
  int64_t staleness = 0;
  float loss = NAN;          // training loss of the last step
  float eval_loss = NAN;     // last evaluation loss, NaN if none yet
  // The schedule's learning rate for the last step's update
  // (common/model/learning_rate.h), and the global gradient norm (before
  // clipping) of the last step this worker applied: the last step itself in
  // SYNC, step - staleness in BOUNDED_STALENESS; NaN in ASYNC (no GradNorm)
  // and before the first apply.
  double learning_rate = NAN;
  double grad_norm = NAN;
  double tokens_per_second = 0;
  // Of the last step. compute_seconds: forward and backward; push_seconds:
  // pushing after the backward pass ended (with overlap_push the part of
  // the push not hidden behind it, waiting for the last streams).
  // pull_seconds: the pull's time not hidden (with layer-wise pulls, the
  // forward pass's waits for parameters).
  double compute_seconds = 0, pull_seconds = 0, push_seconds = 0,
         sync_seconds = 0;
  // The last step's communication (pull and push) time in flight, and the
  // part of it hidden behind compute (in flight while the step computed:
  // comm_seconds less pull_seconds and push_seconds). Exported as
  // lmps_comm_hidden_fraction = hidden / comm.
  double comm_seconds = 0, comm_hidden_seconds = 0;
  // Gradient payload bytes pushed in the last step (PsClientStats
  // bytes_pushed), and how many of them were sent while the backward pass
  // was still computing: before its last range of the gradient (the
  // embeddings) was final (0 without overlap_push).
  int64_t push_bytes = 0;
  int64_t push_bytes_overlapped = 0;
  // Parameter payload bytes pulled in the last step (PsClientStats
  // bytes_pulled; an evaluation's pull at a step boundary included).
  int64_t pull_bytes = 0;
  // Pulls done since the loop started (steps, evaluations and the final
  // pull); each transfers exactly the parameters this worker holds.
  int64_t pulls = 0;
  // Pipeline parallel (worker/pipeline/pipeline_trainer.h), last step: the
  // fraction of the schedule's time this stage waited for its neighbours,
  // the formula's (pp - 1) / (m + pp - 1), and the most micro-batches whose
  // activations were alive at once.
  double bubble_fraction = 0, ideal_bubble_fraction = 0;
  int max_live_micro_batches = 0;
  // Pipeline/tensor parallel (StageModel::peak_activation_bytes), last
  // step: the backend bytes of activations at the schedule's peak (live
  // micro-batches' slots plus shared scratch), and of those the LayerNorm
  // region (residual stream, LayerNorm outputs and statistics of the live
  // slots), which sequence parallelism divides by tp.
  int64_t peak_activation_bytes = 0;
  int64_t peak_layernorm_activation_bytes = 0;
};

// What both loops take; each loop's options struct derives from it.
struct TrainingLoopOptions {
  std::string worker_id;
  JobSpec spec;
  int64_t start_step = 0;
  std::function<void(const TrainerProgress&)> on_progress;  // may be empty
  // Where trace and evaluation lines go; empty: stderr, as
  // "[worker_id] line".
  std::function<void(const std::string&)> log;
  // Jobs whose workers need peers (WorkersNeedPeers: pipeline, tensor
  // parallel, ring all-reduce, host groups): when a step fails because a
  // peer is gone (UNAVAILABLE or DEADLINE_EXCEEDED), wait up to this long
  // for the shards to stop the job at that step (the scheduler regroups the
  // job once the peer's lease expires, or an elastic one shrinks dp), and
  // return that ABORTED status: the worker then registers again and the
  // step is redone. Zero, or no stop in time: the peer's error.
  absl::Duration resize_wait = absl::ZeroDuration();
};

class TrainingLoop {
 public:
  virtual ~TrainingLoop() = default;

  // Trains from start_step to min(steps, stop_after_step). Returns the
  // first error, or Cancelled after Cancel().
  virtual absl::Status Run() = 0;
  // Makes Run() return Cancelled at the next step boundary (or the next
  // wait for a peer).
  virtual void Cancel() = 0;

  virtual int64_t end_step() const = 0;
  virtual const TrainerProgress& progress() const = 0;
};

// GradNorm and Apply of `step` on every shard: the exact global gradient
// norm, then the optimizer. SYNC checks the shards are then at step + 1;
// BOUNDED_STALENESS allows them to be further (faster replicas applied later
// steps). Sets *grad_norm (when not null) to the global gradient norm.
// `pushed` (SYNC; may be null): what PsClient::PushAndReduce answered for
// the step, so its norm is not asked again (nor Apply, if it applied).
// Shared by both loops.
absl::Status ApplyStepOnShards(PsClient* ps, ConsistencyMode mode,
                               int64_t step, double* grad_norm = nullptr,
                               const PsClient::PushedStep* pushed = nullptr);

// Step `step` failed with `error`; see TrainingLoopOptions::resize_wait.
// Polls pulls of `step` into `scratch` (ps->num_parameters() floats) until
// a shard answers ABORTED (stopped at or before `step`: returned), `wait`
// passes or `cancelled` is set (then `error`). Shared by both loops.
absl::Status AwaitResizeStop(PsClient* ps, int64_t step, absl::Status error,
                             absl::Duration wait,
                             const std::atomic<bool>& cancelled,
                             float* scratch,
                             const std::function<void(const std::string&)>& log);

}  // namespace lmps

#endif  // LMPS_WORKER_TRAINING_LOOP_H_
