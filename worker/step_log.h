// StepLog: a worker's step log, one JSON object per line, appended after
// every step (and once more after the final evaluation). The launcher merges
// the workers' logs into RUN_DIR/steps.jsonl (launcher/step_log_merge.h).
//
// A line (keys absent where the value is unknown: NaN is not JSON):
//   {"step": 41, "time": 1764900000.123, "node": "worker-0",
//    "dp": 0, "pp": 0, "tp": 0,
//    "loss": 2.31, "eval_loss": 2.45, "lr": 0.0006, "grad_norm": 0.87,
//    "tokens_per_second": 5321, "compute_s": 0.21, "pull_s": 0.01,
//    "push_s": 0.02, "wait_s": 0.004, "comm_hidden": 0.6,
//    "bytes_pulled": 1200000, "bytes_pushed": 1200000, "bubble": 0.25}
// step: the 0-based index of the step just computed; time: Unix seconds;
// loss: this worker's training loss (pipeline: the last stage's only);
// eval_loss: only on the line of the step whose parameters were evaluated;
// lr, grad_norm, *_s, bytes_*: TrainerProgress (worker/training_loop.h);
// comm_hidden: comm_hidden_seconds / comm_seconds (absent while no
// communication was timed); bubble: pipeline stages only. A second line for the same step updates
// the first (the final evaluation's eval_loss).
//
// Each line goes out in one write() on a file opened O_APPEND, so lines of
// a replaced worker's successor follow its predecessor's whole; a resumed
// run appends. A write that fails (a full disk) is an error: the caller
// reports it and trains on without the log.
//
// Thread-safety: not thread-safe; the training loop's progress callback
// owns it.
#ifndef LMPS_WORKER_STEP_LOG_H_
#define LMPS_WORKER_STEP_LOG_H_

#include <cmath>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "common/formats/append_file.h"
#include "worker/training_loop.h"

namespace lmps {

struct StepLogIdentity {
  std::string node;
  int dp = 0, pp = 0, tp = 0;
  bool pipeline = false;  // pp * tp > 1: record the bubble
};

// The line (without its newline) for `p`; `evaluated`: include eval_loss.
std::string StepLogLine(const StepLogIdentity& who, const TrainerProgress& p,
                        bool evaluated, double unix_seconds);

class StepLog {
 public:
  static absl::StatusOr<std::unique_ptr<StepLog>> Open(
      const std::string& path, StepLogIdentity who);

  // Appends the line of `p` (eval_loss when it changed since the last line).
  absl::Status Append(const TrainerProgress& p);

 private:
  StepLog(std::unique_ptr<AppendFile> file, StepLogIdentity who)
      : file_(std::move(file)), who_(std::move(who)) {}

  const std::unique_ptr<AppendFile> file_;
  const StepLogIdentity who_;
  float last_eval_ = NAN;
};

}  // namespace lmps

#endif  // LMPS_WORKER_STEP_LOG_H_
