// The data-parallel training loop of one worker in sync (BSP) mode.
//
// For every step t in [start_step, end_step):
//   1. pull the parameters at version t from every shard;
//   2. forward and backward over `micro_batches` micro-batches of this
//      replica's slice of the global batch (dataset.h), accumulating the
//      gradient of the mean loss;
//   3. push the gradient for step t;
//   4. ask every shard for its averaged-gradient sum of squares and sum them:
//      the exact global gradient norm (for clipping);
//   5. tell every shard to apply step t with that norm (idempotent, so every
//      replica may do it).
// Evaluation (data-parallel rank 0 only) runs on the pulled parameters every
// eval_interval steps and at the end.
//
// The worker holds nothing that cannot be rebuilt: parameters come from the
// servers and batches are a pure function of (seed, step, rank).
//
// Thread-safety: Run() on one thread; Cancel() from any thread.
#ifndef LMPS_WORKER_TRAINER_H_
#define LMPS_WORKER_TRAINER_H_

#include <atomic>
#include <cmath>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "proto/lmps.pb.h"
#include "worker/data/dataset.h"
#include "worker/model/gpt.h"
#include "worker/ps_client.h"

namespace lmps {

struct TrainerProgress {
  int64_t step = 0;          // completed steps (the parameters' version)
  int64_t end_step = 0;
  float loss = NAN;          // training loss of the last step
  float eval_loss = NAN;     // last evaluation loss, NaN if none yet
  double tokens_per_second = 0;
  double compute_seconds = 0, pull_seconds = 0, push_seconds = 0,
         sync_seconds = 0;  // of the last step
};

struct TrainerOptions {
  std::string worker_id;
  int dp_rank = 0;
  JobSpec spec;
  int64_t start_step = 0;
  std::function<void(const TrainerProgress&)> on_progress;  // may be empty
};

class Trainer {
 public:
  // `model`, `ps` and `data` must outlive the trainer.
  static absl::StatusOr<std::unique_ptr<Trainer>> Create(
      TrainerOptions options, GptModel* model, PsClient* ps,
      const TextDataset* data);

  // Trains to min(steps, stop_after_step). Returns the first error.
  absl::Status Run();
  // Mean validation loss of the parameters currently in the model.
  absl::StatusOr<float> Evaluate();
  // Generates `n` tokens after `prompt` with the final parameters (pulls
  // them first). temperature 0 is greedy.
  absl::StatusOr<std::string> Sample(const std::string& prompt, int n,
                                     float temperature, int top_k);
  // Makes Run() return Cancelled at the next step boundary.
  void Cancel() { cancelled_ = true; }

  int64_t end_step() const { return end_step_; }
  const TrainerProgress& progress() const { return progress_; }

 private:
  Trainer() = default;
  absl::Status PullInto(int64_t step);

  TrainerOptions options_;
  GptModel* model_ = nullptr;
  PsClient* ps_ = nullptr;
  const TextDataset* data_ = nullptr;
  int64_t end_step_ = 0;
  int micro_batch_ = 0;  // sequences per micro-batch
  std::vector<float> host_params_, host_grads_;
  std::vector<int32_t> tokens_, targets_;
  std::atomic<bool> cancelled_{false};
  TrainerProgress progress_;
};

}  // namespace lmps

#endif  // LMPS_WORKER_TRAINER_H_
