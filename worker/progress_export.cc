#include "worker/progress_export.h"

#include <cmath>
#include <utility>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "common/rpc/daemon_metrics.h"

namespace lmps {

ProgressExport::ProgressExport(Metrics* metrics, const std::string& step_log,
                               StepLogIdentity who,
                               std::function<void(const std::string&)> warn)
    : metrics_(metrics), pipeline_(who.pipeline), warn_(std::move(warn)) {
  if (step_log.empty()) return;
  absl::StatusOr<std::unique_ptr<StepLog>> log =
      StepLog::Open(step_log, std::move(who));
  if (!log.ok()) {
    warn_(absl::StrCat("warning: no step log: ", log.status().message()));
    return;
  }
  step_log_ = *std::move(log);
}

void ProgressExport::Export(const TrainerProgress& p) {
  if (step_log_ != nullptr) {
    if (absl::Status s = step_log_->Append(p); !s.ok()) {
      warn_(absl::StrCat("warning: the step log stops: ", s.message()));
      step_log_.reset();
    }
  }
  SetGauges(p);
}

void ProgressExport::SetGauges(const TrainerProgress& p) {
  Metrics* m = metrics_;
  SetGauge(m, "lmps_step", "Completed training steps.",
           static_cast<double>(p.step));
  SetGauge(m, "lmps_loss", "Training loss of the last step.", p.loss);
  if (std::isfinite(p.eval_loss)) {
    SetGauge(m, "lmps_eval_loss", "Last evaluation loss.", p.eval_loss);
  }
  SetGauge(m, "lmps_tokens_per_second", "Training tokens per second.",
           p.tokens_per_second);
  SetGauge(m, "lmps_staleness_steps",
           "Steps between the parameters used and the step computed.",
           static_cast<double>(p.staleness));
  const char* help = "Seconds of the last step spent per phase.";
  SetGauge(m, "lmps_step_phase_seconds", help, p.compute_seconds,
           {{"phase", "compute"}});
  SetGauge(m, "lmps_step_phase_seconds", help, p.pull_seconds,
           {{"phase", "pull"}});
  SetGauge(m, "lmps_step_phase_seconds", help, p.push_seconds,
           {{"phase", "push"}});
  SetGauge(m, "lmps_step_phase_seconds", help, p.sync_seconds,
           {{"phase", "wait"}});
  const char* bytes =
      "Gradient payload bytes pushed in the last step (total), and those "
      "sent while its backward pass still ran (overlapped, "
      "--overlap_push).";
  SetGauge(m, "lmps_push_bytes", bytes, static_cast<double>(p.push_bytes),
           {{"kind", "total"}});
  SetGauge(m, "lmps_push_bytes", bytes,
           static_cast<double>(p.push_bytes_overlapped),
           {{"kind", "overlapped"}});
  if (p.comm_seconds > 0) {
    SetGauge(m, "lmps_comm_hidden_fraction",
             "Fraction of the last step's communication (pull and push, wall "
             "time in flight) hidden behind compute: in flight while the step "
             "computed (train.layerwise_pull, --overlap_push).",
             p.comm_hidden_seconds / p.comm_seconds);
  }
  SetGauge(m, "lmps_comm_seconds",
           "Seconds of the last step's communication (pull and push) in "
           "flight (total), and of it hidden behind compute (hidden).",
           p.comm_seconds, {{"kind", "total"}});
  SetGauge(m, "lmps_comm_seconds",
           "Seconds of the last step's communication (pull and push) in "
           "flight (total), and of it hidden behind compute (hidden).",
           p.comm_hidden_seconds, {{"kind", "hidden"}});
  SetGauge(m, "lmps_pull_bytes",
           "Parameter payload bytes pulled in the last step (F32 or BF16: "
           "train.pull_dtype).",
           static_cast<double>(p.pull_bytes));
  // The wire bytes of every step's push, counted once per step (a final
  // evaluation exports the last step again).
  if (m != nullptr && p.step != counted_step_) {
    counted_step_ = p.step;
    absl::StatusOr<prometheus::Counter*> wire = m->Counter(
        "lmps_push_wire_bytes_total",
        "Bytes of gradient pushed on the wire (payload, compressed slices' "
        "indices and scales; train.compression reduces them), all steps.");
    if (wire.ok()) (*wire)->Increment(static_cast<double>(p.push_bytes));
    absl::StatusOr<prometheus::Counter*> pulled = m->Counter(
        "lmps_pull_wire_bytes_total",
        "Bytes of parameters pulled on the wire (payload; train.pull_dtype "
        "BF16 halves them), all steps.");
    if (pulled.ok()) (*pulled)->Increment(static_cast<double>(p.pull_bytes));
  }
  if (pipeline_) {
    const char* bubble =
        "Fraction of the last step's pipeline schedule this stage waited "
        "for its neighbours (measured), and (pp - 1) / (m + pp - 1) (ideal).";
    SetGauge(m, "lmps_pipeline_bubble_fraction", bubble, p.bubble_fraction,
             {{"kind", "measured"}});
    SetGauge(m, "lmps_pipeline_bubble_fraction", bubble,
             p.ideal_bubble_fraction, {{"kind", "ideal"}});
    SetGauge(m, "lmps_pipeline_live_micro_batches",
             "Most micro-batches whose activations were alive at once in the "
             "last step.",
             p.max_live_micro_batches);
    const char* activations =
        "Backend bytes of activations at the last step's peak on this "
        "worker (region=all: live micro-batches' activations plus shared "
        "scratch; region=layernorm: the residual stream and LayerNorm "
        "outputs of the live micro-batches, divided by tp under "
        "layout.sequence_parallel).";
    SetGauge(m, "lmps_peak_activation_bytes", activations,
             static_cast<double>(p.peak_activation_bytes),
             {{"region", "all"}});
    SetGauge(m, "lmps_peak_activation_bytes", activations,
             static_cast<double>(p.peak_layernorm_activation_bytes),
             {{"region", "layernorm"}});
  }
}

}  // namespace lmps
