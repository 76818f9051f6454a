// PipelineTrainer: the training loop of one worker of a dp x pp x tp layout
// with pp * tp > 1: the TrainingLoop (worker/training_loop.h) that
// worker/trainer.h's DataParallelTrainer is for pp = tp = 1. The worker
// (dp, pp, tp) computes pipeline stage pp's blocks (its StageModel holds
// tensor-parallel rank tp's slices, common/model/parallel_layout.h) for
// data-parallel replica dp.
//
// One step t (SYNC; BOUNDED_STALENESS applies t - s instead, as
// DataParallelTrainer):
//   1. pull this worker's parameter slices at version t (PsClient with a
//      view: nothing it does not hold);
//   2. run the stage's micro-batch schedule (worker/pipeline/schedule.h,
//      layout.schedule): F(i) receives the activation of micro-batch i from
//      stage pp - 1 (same dp and tp ranks; the first stage reads tokens),
//      computes and sends its output to stage pp + 1; B(i) receives the
//      output's gradient from stage pp + 1 (the last stage starts from the
//      loss, scaled 1/m), computes and sends the input's gradient back.
//      Tensor-parallel ranks of a stage run the same schedule and
//      all-reduce inside each block (TpComm); with layout.sequence_parallel
//      they reduce-scatter / all-gather instead and the stages exchange
//      each tp rank's [B*T/tp, C] token chunk (worker/model/stage_model.h). Every wait ends after
//      train.peer_timeout_ms with an error naming the peer;
//   3. push the gradient slices this worker owns (tp rank 0 for replicated
//      tensors; both the first and the last stage push the tied wte, and
//      the shards sum them); with overlap_push, during the schedule's last
//      backward pass, each block's part as soon as it is final
//      (worker/overlapped_push.h; bit-identical);
//   4. GradNorm and Apply on every shard, as DataParallelTrainer.
// The last stage knows the loss; other stages report NaN. Evaluation (every
// eval_interval steps and at the end, data-parallel replica 0) runs the
// validation batches forward through the pipeline, tagged `eval`.
//
// Bubble: the time a stage spends waiting for its neighbours during the
// schedule, over the schedule's time, is TrainerProgress::bubble_fraction;
// with equal stages it approaches (pp - 1) / (m + pp - 1).
//
// Thread-safety: Run() on one thread; Cancel() from any thread.
#ifndef LMPS_WORKER_PIPELINE_PIPELINE_TRAINER_H_
#define LMPS_WORKER_PIPELINE_PIPELINE_TRAINER_H_

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "common/model/parallel_layout.h"
#include "proto/lmps.pb.h"
#include "worker/data/dataset.h"
#include "worker/model/stage_model.h"
#include "worker/model/tp_comm.h"
#include "worker/overlapped_push.h"
#include "worker/peer/peer_network.h"
#include "worker/ps_client.h"
#include "worker/training_loop.h"

namespace lmps {

struct PipelineTrainerOptions : TrainingLoopOptions {
  WorkerCoords coords;
  // Called before the schedule of every step (may be empty); tests inject
  // faults with it.
  std::function<void(int64_t step)> on_step_start;
  // Push the gradient while the schedule's last backward pass runs (see
  // above) rather than after the schedule.
  bool overlap_push = false;
};

class PipelineTrainer : public TrainingLoop {
 public:
  // Every pointer must outlive the trainer; `comm` may be null when tp = 1.
  // The model must have StageSlots(spec, stage) activation slots.
  static absl::StatusOr<std::unique_ptr<PipelineTrainer>> Create(
      PipelineTrainerOptions options, const ParallelLayout* layout,
      StageModel* model, PsClient* ps, PeerNetwork* peers, TpComm* comm,
      const Dataset* data);

  // Activation slots stage `stage` needs under the spec's schedule.
  static int StageSlots(const JobSpec& spec, int stage);
  // The StageModel of worker `coords`: its stage's layers, its
  // tensor-parallel slices, micro-batches of `micro_batch` sequences of
  // block_size tokens and StageSlots activation slots.
  static StageModelOptions StageOptions(const JobSpec& spec,
                                        const ParallelLayout& layout,
                                        const WorkerCoords& coords,
                                        int micro_batch);

  absl::Status Run() override;
  void Cancel() override { cancelled_ = true; }

  int64_t end_step() const override { return end_step_; }
  const TrainerProgress& progress() const override { return progress_; }

 private:
  PipelineTrainer() = default;
  absl::Status PullInto(int64_t step);
  // The step failed with `error`; see TrainingLoopOptions::resize_wait.
  absl::Status AwaitResizeStop(int64_t step, absl::Status error);
  absl::Status ApplyStep(int64_t step);
  // Runs the schedule of `step`; sets *loss (last stage) and the bubble.
  // `push` (may be null) receives the last backward pass's ready ranges.
  absl::Status TrainStep(int64_t step, double* loss, OverlappedPush* push);
  // Forward of micro-batch i into a free slot; returns the slot.
  absl::StatusOr<int> ForwardOne(int64_t step, bool eval, int i,
                                 const int32_t* tokens, const int32_t* targets,
                                 float* loss, double* idle_seconds);
  absl::Status BackwardOne(int64_t step, int i, int slot,
                           double* idle_seconds,
                           const StageModel::GradientReadyFn& on_ready);
  absl::StatusOr<float> Evaluate(int64_t step);
  void Log(const std::string& line) const;

  PipelineTrainerOptions options_;
  const ParallelLayout* layout_ = nullptr;
  StageModel* model_ = nullptr;
  PsClient* ps_ = nullptr;
  PeerNetwork* peers_ = nullptr;
  TpComm* comm_ = nullptr;
  const Dataset* data_ = nullptr;
  StageRange stage_;
  int prev_rank_ = -1, next_rank_ = -1;  // neighbouring stages, or -1
  int64_t end_step_ = 0;
  int micro_batch_ = 0;  // sequences per micro-batch
  std::vector<float> host_params_, host_grads_, act_in_, act_out_;
  std::unique_ptr<PinnedHostBuffers> pinned_;  // host_params_, host_grads_
  std::vector<int32_t> tokens_, targets_;
  std::atomic<bool> cancelled_{false};
  TrainerProgress progress_;
};

}  // namespace lmps

#endif  // LMPS_WORKER_PIPELINE_PIPELINE_TRAINER_H_
