// The data-parallel training loop of one worker, in the job's consistency
// mode (train.mode; docs/parameter-shard.md has the servers' side). It is
// the pp = tp = 1 TrainingLoop (worker/training_loop.h).
//
// SYNC: for every step t in [start_step, end_step):
//   1. pull the parameters at version t from every shard;
//   2. forward and backward over `micro_batches` micro-batches of this
//      replica's slice of the global batch (dataset.h), accumulating the
//      gradient of the mean loss;
//   3. push the gradient for step t;
//   4. ask every shard for its averaged-gradient sum of squares and sum them:
//      the exact global gradient norm (for clipping);
//   5. tell every shard to apply step t with that norm (idempotent, so every
//      replica may do it).
// When the worker pushes to every shard, 3.-4. are one call per shard
// (PsClient::PushAndReduce), with one shard 3.-5., and -- one shard sharing
// memory, no layer-wise pull, pull_with_push -- also step t + 1's 1.: a
// step is then one round trip.
// BOUNDED_STALENESS with bound s: the same steps, except that step 4-5 after
// pushing step t are done for step t - s (when t - s >= start_step): they
// wait until every replica pushed step t - s, so this replica is never more
// than s steps ahead of the slowest, and the pull of step t + 1 (served at a
// version >= t + 1 - s) does not wait. After the last step the steps not yet
// applied (end_step - s .. end_step - 1) are applied. s = 0 is exactly SYNC.
// ASYNC: pull the latest parameters (no wait), compute, push (the shards
// apply it at once); no GradNorm/Apply. The final pull (evaluation,
// sample) waits for the version after every replica's last push.
//
// Layer-wise pulls (DataParallelTrainerOptions.layerwise_pull; the daemon's
// default is by backend, ResolveLayerwisePull;
// used in SYNC and BOUNDED_STALENESS with s = 0): the pull of 1. above is
// started as soon as step t - 1 is applied (the first step's at once), one
// PsClient::PullTensors per layer group and shard in forward order through
// a CommScheduler (worker/layerwise_pull.h), and the first micro-batch's
// forward pass waits for each block's parameters only
// (GptModel::ParametersReadyFn), copying each landed group into the model.
// The same bytes land in the same places: bit-identical to the whole pull.
// TrainerProgress.comm_seconds / comm_hidden_seconds say how much of the
// step's communication (pull and push) was hidden behind compute.
//
// Every step's pulled version and staleness are in TrainerProgress.
// Evaluation (data-parallel rank 0 only) runs on the pulled parameters every
// eval_interval steps and at the end.
//
// Push overlap (DataParallelTrainerOptions.overlap_push, the default): during the last
// micro-batch's backward pass, each range of the gradient GptModel reports
// final (ln_f, the blocks from the last to the first, the embeddings:
// GptModel::GradientReadyFn) is copied to host at once, and a background
// thread pushes the chunks lying in the finished part (a suffix of the flat
// buffer, growing) with PsClient::PushChunks while the pass goes on; when it
// ends the rest is pushed and the step waits for every stream. Every chunk
// is pushed exactly once, with the same values, and the shards sum the
// replicas' gradients in rank order whatever the streams, so the results
// are bit-identical to overlap_push = false (push after backward). The
// training loss is checked for NaN/Inf before that backward pass (every
// micro-batch's loss is known by then), so a non-finite gradient is still
// never pushed.
//
// Test knobs of the job spec (train.debug_*): the replica of rank
// debug_slow_worker_rank sleeps debug_slow_worker_delay_ms per step between
// computing and pushing (with overlap_push: before the last micro-batch's
// backward pass, where pushing starts); debug_trace_steps logs one
// "trace ..." line per step (format in proto/lmps.proto; push_start_us is
// when the step's first push stream started).
//
// RING_ALLREDUCE (train.dp_aggregation; SYNC, pp = tp = 1): the parameters
// and the optimizer state are pulled once, at start_step. Every step: forward and backward as above;
// the gradient is summed over the replicas by options.dp_ring (a ring
// all-reduce over the peer service, bitwise identical on every replica) and
// divided by dp; its global norm is computed locally; every replica applies
// the same update with the shards' optimizer code (server/optimizer.h:
// schedule, clipping, per-tensor weight decay, AdamW or SGD) to its own
// copy, so the copies stay bitwise identical without a pull. No shard is on
// the critical path: dp rank 0 also pushes the averaged gradient and runs
// GradNorm/Apply on a background thread (joined before the next step's
// push and at the end), and the shards, which count a one-replica job in
// this mode, apply the same update: they keep the durable copy for
// checkpoints, export, eval and replacement. The pull at start_step also
// reads the shards' optimizer state (AdamW moments, SGD momentum:
// PsClient::PullWithOptimizerState), so a resumed or replaced run
// continues exactly where the shards are.
//
// Hierarchical aggregation (train.workers_per_host W > 1; SYNC, pp = tp =
// 1): the W workers of a host (dp ranks hW .. hW + W - 1) form a group with
// a ring (options.host_ring). Each step the group's first worker, the
// leader, pulls, and the group shares its parameters over the ring (an
// all-reduce in which the others contribute zeros: x + 0 = x exactly); after
// the backward pass the group sums its gradients over the ring and the
// leader pushes the mean, as dp rank h of dp / W replicas the shards see,
// then runs GradNorm/Apply. The others push and pull nothing. The shards
// average the hosts' means: the same global mean as dp replicas pushing,
// up to the order of the float summation. Push overlap and layer-wise
// pulls do not apply.
//
// The worker holds nothing that cannot be rebuilt: parameters come from the
// servers and batches are a pure function of (seed, step, rank).
//
// Thread-safety: Run() on one thread; Cancel() from any thread.
#ifndef LMPS_WORKER_TRAINER_H_
#define LMPS_WORKER_TRAINER_H_

#include <atomic>
#include <chrono>
#include <cmath>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "proto/lmps.pb.h"
#include "worker/data/dataset.h"
#include "worker/comm_scheduler.h"
#include "worker/layerwise_pull.h"
#include "worker/model/gpt.h"
#include "worker/model/tp_comm.h"
#include "worker/overlapped_push.h"
#include "worker/ps_client.h"
#include "worker/training_loop.h"

namespace lmps {

struct DataParallelTrainerOptions : TrainingLoopOptions {
  int dp_rank = 0;
  // Push the gradient while the last micro-batch's backward pass runs (see
  // the file comment); false: push it after the backward pass.
  bool overlap_push = true;
  // Layer-wise pull pipelining (train.layerwise_pull; see the file
  // comment). Used in SYNC (and BOUNDED_STALENESS with staleness 0) only.
  bool layerwise_pull = true;
  // Without layer-wise pulls, in SYNC with one shard sharing memory with
  // this worker: the shard answers the next step's pull with the push
  // (PsClient::PushAndReduce's next_params; one round trip per step).
  // false: a pull of its own per step (for comparison).
  bool pull_with_push = true;

  // train.dp_aggregation RING_ALLREDUCE: the all-reduce among the replicas
  // of this job (size dp, rank dp_rank), not owned; required in that mode.
  TpComm* dp_ring = nullptr;
  // train.workers_per_host > 1 (hierarchical aggregation): the ring of this
  // worker's host group (size workers_per_host, rank dp_rank %
  // workers_per_host), not owned; required in that mode.
  TpComm* host_ring = nullptr;
};

class DataParallelTrainer : public TrainingLoop {
 public:
  // `model`, `ps` and `data` must outlive the trainer.
  static absl::StatusOr<std::unique_ptr<DataParallelTrainer>> Create(
      DataParallelTrainerOptions options, GptModel* model, PsClient* ps,
      const Dataset* data);

  ~DataParallelTrainer() override;
  absl::Status Run() override;
  // Mean validation loss of the parameters currently in the model.
  absl::StatusOr<float> Evaluate();
  // Generates `n` tokens after `prompt` with the final parameters (pulls
  // them first). temperature 0 is greedy.
  absl::StatusOr<std::string> Sample(const std::string& prompt, int n,
                                     float temperature, int top_k);
  void Cancel() override { cancelled_ = true; }

  int64_t end_step() const override { return end_step_; }
  const TrainerProgress& progress() const override { return progress_; }

 private:
  DataParallelTrainer() = default;
  // Run's steps; Run adds the wait for a regroup after a peer's failure.
  absl::Status RunSteps();
  // Pulls for `step` into the model; sets *version (if not null) to the
  // smallest version served.
  absl::Status PullInto(int64_t step, int64_t* version = nullptr);
  // Layer-wise: starts the pull of `step` into host_params_.
  std::unique_ptr<LayerwisePull> StartPull(int64_t step);
  // Copies host_params_[begin, end) into the model.
  absl::Status CopyParams(int64_t begin, int64_t end);
  // The last micro-batch's backward pass of `step` with its gradient pushed
  // as it becomes final (overlap_push). Sets progress_.push_bytes_overlapped
  // and *backward_done, *push_start_us. On an error the chunks already
  // pushed stay pushed (final values: a retried step counts them as
  // duplicates); nothing not yet final is.
  absl::Status BackwardAndPush(int64_t step, float grad_scale,
                               std::chrono::steady_clock::time_point*
                                   backward_done,
                               int64_t* push_start_us);
  // GradNorm and Apply of `step` on every shard (SYNC, BOUNDED_STALENESS).
  // `pushed`: PsClient::PushAndReduce's answer for the step, if it pushed
  // so (ApplyStepOnShards).
  absl::Status ApplyStep(int64_t step,
                         const PsClient::PushedStep* pushed = nullptr);
  // The version to pull for the final parameters: end_step, or in ASYNC
  // the version after every replica's last push.
  int64_t FinalVersion() const;
  int64_t Staleness(int64_t step, int64_t pulled_version) const;
  // RING_ALLREDUCE: all-reduces the model's gradient of `step` (computed),
  // updates the local parameters and (dp rank 0) starts the shards' copy.
  absl::Status RingStep(int64_t step);
  // Waits for dp rank 0's background push/Apply of the shards' copy.
  absl::Status JoinShardUpdate();
  bool ring() const {
    return options_.spec.train().dp_aggregation() == RING_ALLREDUCE;
  }
  // Hierarchical aggregation (train.workers_per_host > 1).
  bool hierarchical() const { return options_.host_ring != nullptr; }
  // The host's leader (first worker of the group) pushes and pulls.
  bool host_leader() const { return options_.host_ring->rank() == 0; }
  // Pull for `step`: the leader pulls, the group shares its parameters.
  absl::Status HostPull(int64_t step, int64_t* version);
  // Sums the group's gradients of `step` into host_grads_ as their mean;
  // the leader pushes it for its host (dp rank dp_rank / workers_per_host).
  absl::Status HostPush(int64_t step);
  void Log(const std::string& line) const;

  DataParallelTrainerOptions options_;
  GptModel* model_ = nullptr;
  PsClient* ps_ = nullptr;
  const Dataset* data_ = nullptr;
  int64_t end_step_ = 0;
  int micro_batch_ = 0;  // sequences per micro-batch
  std::vector<float> host_params_, host_grads_;
  std::unique_ptr<PinnedHostBuffers> pinned_;  // the two above
  bool layerwise_ = false;
  std::vector<PullGroup> groups_;
  std::unique_ptr<CommScheduler> scheduler_;
  int64_t pull_bytes_start_ = 0;  // bytes_pulled when the step's pull began
  std::vector<int32_t> tokens_, targets_;
  // RING_ALLREDUCE: optimizer state (1 or 2 buffers of num_parameters),
  // the weight-decay flag and length of every tensor in flat order, the
  // gradient being pushed to the shards by shard_update_.
  std::vector<std::vector<float>> opt_state_;
  std::vector<std::pair<int64_t, bool>> tensor_decay_;
  std::vector<float> shard_grads_;
  std::thread shard_update_;
  absl::Status shard_update_status_;
  std::atomic<bool> cancelled_{false};
  int64_t step_in_progress_ = 0;
  TrainerProgress progress_;
};

}  // namespace lmps

#endif  // LMPS_WORKER_TRAINER_H_
