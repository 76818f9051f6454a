// The scheduler's live status page (GET /status on its metrics port): the
// run report's page (run_report.h) drawn from the job's state instead of a
// run directory, reloading itself, with a table of every node on top.
//
// StatusHistory turns the scheduler's periodic JobStatus snapshots (once a
// second) into step rows for the charts: one row per snapshot in which the
// slowest worker's step advanced (so a row per second, not per step),
// with the workers' mean training loss, dp rank 0's eval loss when it
// changed, the workers' summed tokens/s, the learning rate and the bytes
// the workers' last pulls and pushes put on the wire (summed). The
// heartbeats carry no phase times, so that chart stays empty on the live
// page.
//
// Thread-safety: StatusHistory is thread-safe (the scheduler's main loop
// observes while HTTP threads read). RenderStatusPage is a pure function.
#ifndef LMPS_REPORT_STATUS_PAGE_H_
#define LMPS_REPORT_STATUS_PAGE_H_

#include <cstddef>
#include <deque>
#include <optional>
#include <string>
#include <vector>

#include "absl/synchronization/mutex.h"
#include "proto/lmps.pb.h"
#include "report/run_report.h"

namespace lmps {

class StatusHistory {
 public:
  // Keeps the last `max_rows` rows.
  explicit StatusHistory(size_t max_rows = 20000) : max_rows_(max_rows) {}

  // Records a row for `status` taken at `now_unix_s` if the slowest
  // worker's step is past the last row's (and at least one worker reported
  // a step).
  void Observe(const JobStatus& status, double now_unix_s);

  std::vector<StepRow> Rows() const;

 private:
  const size_t max_rows_;
  mutable absl::Mutex mu_;
  std::deque<StepRow> rows_ ABSL_GUARDED_BY(mu_);
  std::optional<double> last_eval_ ABSL_GUARDED_BY(mu_);
};

// The page for `status` at `now_unix_s`, reloading every `refresh_seconds`.
// Every node is a <tr class="node" data-node="ID"> (class "node dead" when
// its lease expired) with its role, address, heartbeat age, step, loss and
// last error or event.
std::string RenderStatusPage(const JobStatus& status,
                             const std::vector<StepRow>& history,
                             int refresh_seconds);

}  // namespace lmps

#endif  // LMPS_REPORT_STATUS_PAGE_H_
