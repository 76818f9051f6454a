#include "worker/step_log.h"

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/time/clock.h"
#include "common/rpc/status_util.h"
#include "nlohmann/json.hpp"

namespace lmps {
namespace {

// Adds `key` unless `v` is NaN or infinite.
void PutFinite(nlohmann::ordered_json* j, const char* key, double v) {
  if (std::isfinite(v)) (*j)[key] = v;
}

}  // namespace

std::string StepLogLine(const StepLogIdentity& who, const TrainerProgress& p,
                        bool evaluated, double unix_seconds) {
  nlohmann::ordered_json j;
  j["step"] = p.step - 1;
  j["time"] = std::round(unix_seconds * 1000) / 1000;
  j["node"] = who.node;
  j["dp"] = who.dp;
  j["pp"] = who.pp;
  j["tp"] = who.tp;
  PutFinite(&j, "loss", p.loss);
  if (evaluated) PutFinite(&j, "eval_loss", p.eval_loss);
  // The schedule is computed from OptimizerConfig's float lr: 7 significant
  // digits say all it holds (6e-4, not 0.0006000000284984708).
  if (std::isfinite(p.learning_rate)) {
    j["lr"] = std::stod(absl::StrFormat("%.7g", p.learning_rate));
  }
  PutFinite(&j, "grad_norm", p.grad_norm);
  PutFinite(&j, "tokens_per_second", p.tokens_per_second);
  PutFinite(&j, "compute_s", p.compute_seconds);
  PutFinite(&j, "pull_s", p.pull_seconds);
  PutFinite(&j, "push_s", p.push_seconds);
  PutFinite(&j, "wait_s", p.sync_seconds);
  if (p.comm_seconds > 0) {
    PutFinite(&j, "comm_hidden", p.comm_hidden_seconds / p.comm_seconds);
  }
  j["bytes_pulled"] = p.pull_bytes;
  j["bytes_pushed"] = p.push_bytes;
  if (who.pipeline) PutFinite(&j, "bubble", p.bubble_fraction);
  return j.dump();
}

absl::StatusOr<std::unique_ptr<StepLog>> StepLog::Open(const std::string& path,
                                                       StepLogIdentity who) {
  LMPS_ASSIGN_OR_RETURN(std::unique_ptr<AppendFile> file,
                        AppendFile::Open(path, "step log"));
  return std::unique_ptr<StepLog>(new StepLog(std::move(file), std::move(who)));
}

absl::Status StepLog::Append(const TrainerProgress& p) {
  if (p.step <= 0) return absl::OkStatus();  // nothing computed yet
  const bool evaluated =
      std::isfinite(p.eval_loss) &&
      !(std::isfinite(last_eval_) && last_eval_ == p.eval_loss);
  LMPS_RETURN_IF_ERROR(file_->AppendLine(StepLogLine(
      who_, p, evaluated, absl::ToUnixMicros(absl::Now()) / 1e6)));
  if (evaluated) last_eval_ = p.eval_loss;
  return absl::OkStatus();
}

}  // namespace lmps
