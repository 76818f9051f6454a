// ProgressExport: what a worker exports of its trainer's progress
// (TrainerProgress, worker/training_loop.h) after every step: one line
// appended to its step log (worker/step_log.h, when the daemon was given
// one), and the Prometheus gauges served at /metrics:
//   lmps_step, lmps_loss, lmps_eval_loss (once finite),
//   lmps_tokens_per_second, lmps_staleness_steps,
//   lmps_step_phase_seconds{phase="compute"|"pull"|"push"|"wait"},
//   lmps_push_bytes{kind="total"|"overlapped"} (the last step's; total is
//   the wire bytes, which train.compression reduces), the counter
//   lmps_push_wire_bytes_total (every step's, once), lmps_pull_bytes (the
//   last step's pull payload, halved by train.pull_dtype BF16) and the
//   counter lmps_pull_wire_bytes_total,
//   lmps_comm_seconds{kind="total"|"hidden"} and lmps_comm_hidden_fraction
//   (hidden / total, once total > 0: the last step's pull and push time in
//   flight and the part of it hidden behind compute), and for a pipeline stage
//   (pp * tp > 1) lmps_pipeline_bubble_fraction{kind="measured"|"ideal"}
//   and lmps_pipeline_live_micro_batches.
// (The heartbeat's copy of the progress is the daemon's, not this.)
//
// Neither is a reason to stop training: a step log that cannot be opened is
// reported through `warn` ("warning: no step log: ...") and left out, one
// whose write fails ("warning: the step log stops: ...", a full disk) is
// reported once and dropped; gauges that cannot be set are skipped
// (SetGauge, common/rpc/daemon_metrics.h).
//
// Thread-safety: not thread-safe; the training loop's progress callback
// owns it (one step at a time, on the loop's thread). The Metrics registry
// is thread-safe and must outlive it.
#ifndef LMPS_WORKER_PROGRESS_EXPORT_H_
#define LMPS_WORKER_PROGRESS_EXPORT_H_

#include <functional>
#include <memory>
#include <string>

#include "common/rpc/metrics.h"
#include "worker/step_log.h"
#include "worker/training_loop.h"

namespace lmps {

class ProgressExport {
 public:
  // `metrics`: the worker's registry (not owned; null: no gauges).
  // `step_log`: the step log's path (empty: none), whose lines name `who`.
  // `warn` receives the warnings above (without a trailing newline).
  ProgressExport(Metrics* metrics, const std::string& step_log,
                 StepLogIdentity who,
                 std::function<void(const std::string&)> warn);
  ProgressExport(const ProgressExport&) = delete;
  ProgressExport& operator=(const ProgressExport&) = delete;

  // Exports the progress of the step just done.
  void Export(const TrainerProgress& p);

  // Whether a step log is still being written.
  bool logging_steps() const { return step_log_ != nullptr; }

 private:
  void SetGauges(const TrainerProgress& p);

  Metrics* const metrics_;
  const bool pipeline_;
  const std::function<void(const std::string&)> warn_;
  std::unique_ptr<StepLog> step_log_;  // null: none
  int64_t counted_step_ = -1;  // last step added to the wire-bytes counter
};

}  // namespace lmps

#endif  // LMPS_WORKER_PROGRESS_EXPORT_H_
