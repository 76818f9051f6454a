#include "launcher/progress.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <string>

#include "absl/strings/str_format.h"

namespace lmps {

std::string FormatEta(double seconds) {
  if (!std::isfinite(seconds) || seconds < 0) return "--";
  int s = static_cast<int>(seconds + 0.5);
  if (s >= 3600) return absl::StrFormat("%dh%02dm", s / 3600, s / 60 % 60);
  if (s >= 60) return absl::StrFormat("%dm%02ds", s / 60, s % 60);
  return absl::StrFormat("%ds", s);
}

std::string FormatBytes(int64_t bytes) {
  if (bytes < 1000) return absl::StrFormat("%d B", bytes);
  if (bytes < 1000 * 1000) return absl::StrFormat("%.1f kB", bytes / 1e3);
  if (bytes < 1000 * 1000 * 1000) {
    return absl::StrFormat("%.1f MB", bytes / 1e6);
  }
  return absl::StrFormat("%.2f GB", bytes / 1e9);
}

void ProgressLine::Update(const JobStatus& status, bool final) {
  if (quiet_) return;
  int64_t step = INT64_MAX;
  double loss = 0, tps = 0;
  int64_t push_bytes = 0, pull_bytes = 0;
  float eval = NAN;
  int workers = 0;
  for (const NodeStatus& n : status.nodes()) {
    if (n.role() != WORKER) continue;
    step = std::min(step, n.step());
    // Only the last pipeline stage knows the loss (others report NaN); tp
    // ranks and stages of one replica process the same tokens.
    if (std::isfinite(n.loss()) && n.tp_rank() <= 0) {
      ++workers;
      loss += n.loss();
      tps += n.tokens_per_second();
    }
    if (n.dp_rank() == 0 && std::isfinite(n.eval_loss())) eval = n.eval_loss();
    push_bytes += n.push_wire_bytes();
    pull_bytes += n.pull_wire_bytes();
  }
  if (step == INT64_MAX) return;
  loss = workers > 0 ? loss / workers : NAN;
  const auto now = std::chrono::steady_clock::now();
  if (first_step_ < 0 && step > status.start_step()) {
    first_step_ = step;
    first_step_time_ = now;
  }
  const int64_t total = status.spec().train().stop_after_step() > 0
                            ? std::min(status.spec().train().stop_after_step(),
                                       status.spec().train().steps())
                            : status.spec().train().steps();
  double eta = NAN;
  if (first_step_ >= 0 && step > first_step_) {
    double per_step = std::chrono::duration<double>(now - first_step_time_).count() /
                      static_cast<double>(step - first_step_);
    eta = per_step * static_cast<double>(total - step);
  }
  PrintLine({.step = step, .total = total, .loss = loss, .eval = eval,
             .tps = tps, .pull_bytes = pull_bytes,
             .push_bytes = push_bytes, .eta = eta},
            final, now);
  if (final && std::isfinite(eval)) {
    std::printf("lmps: eval loss %.4f (perplexity %.1f)\n", eval,
                std::exp(static_cast<double>(eval)));
    std::fflush(stdout);
  }
}

void ProgressLine::PrintLine(const Figures& f, bool final,
                             std::chrono::steady_clock::time_point now) {
  const int64_t step = f.step;
  const float eval = f.eval;
  if (step == last_printed_step_ && (!final || !tty_)) return;
  const bool new_eval = std::isfinite(eval) && eval != last_eval_printed_;
  const double since =
      std::chrono::duration<double>(now - last_print_).count();
  if (!tty_ && !final && !new_eval && since < 5.0) return;
  std::string line = absl::StrFormat(
      "step %*d/%d | loss %s | eval %s | %.0f tok/s | pull %s | push %s | "
      "ETA %s",
      static_cast<int>(std::to_string(f.total).size()), step, f.total,
      std::isfinite(f.loss) ? absl::StrFormat("%.4f", f.loss) : "-",
      std::isfinite(eval) ? absl::StrFormat("%.4f", eval) : "-", f.tps,
      FormatBytes(f.pull_bytes), FormatBytes(f.push_bytes), FormatEta(f.eta));
  if (tty_) {
    std::printf("\r%-78s", line.c_str());
    if (new_eval || final) std::printf("\n");
  } else {
    std::printf("%s\n", line.c_str());
  }
  std::fflush(stdout);
  if (new_eval) last_eval_printed_ = eval;
  last_printed_step_ = step;
  last_print_ = now;
}

void ProgressLine::Restart() {
  first_step_ = -1;
  last_printed_step_ = -1;
}

}  // namespace lmps
