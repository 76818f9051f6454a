// EventLog: the run's events, RUN_DIR/events.jsonl, one JSON object per
// line, for the run report (report/run_report.h):
//   {"time": 1764900000.123, "node": "worker-1",
//    "event": "missed its heartbeat lease of 10s", "action": "..."}
// time: Unix seconds; node: empty for the job. Two sources: the
// scheduler's events (JobStatus.events: registrations, expired leases,
// replacements, promotions, errors, state changes, resizes), added from
// every status the launcher polls, each once (the scheduler keeps its last
// 200, so a poll sees some again); and the launcher's own (a killed
// process restarted, the job restarted from a checkpoint, a resize).
//
// Lines are appended in one O_APPEND write each. A resumed run continues
// the file; events already in it are not added again. A write that fails is
// an error (the caller reports it and drops the log).
//
// Thread-safety: not thread-safe; the launcher's monitor loop owns it.
#ifndef LMPS_LAUNCHER_EVENT_LOG_H_
#define LMPS_LAUNCHER_EVENT_LOG_H_

#include <memory>
#include <set>
#include <string>

#include "absl/status/statusor.h"
#include "common/formats/append_file.h"
#include "proto/lmps.pb.h"

namespace lmps {

class EventLog {
 public:
  static absl::StatusOr<std::unique_ptr<EventLog>> Create(std::string path);

  // Appends the events of `status` not logged yet.
  absl::Status AddFrom(const JobStatus& status);
  // Appends one of the launcher's own events, timed now.
  absl::Status Add(const std::string& node, const std::string& event,
                   const std::string& action);

 private:
  explicit EventLog(std::unique_ptr<AppendFile> file)
      : file_(std::move(file)) {}
  absl::Status Append(int64_t unix_ms, const std::string& node,
                      const std::string& event, const std::string& action);

  const std::unique_ptr<AppendFile> file_;
  std::set<std::string> seen_;  // time|node|event of every line
};

}  // namespace lmps

#endif  // LMPS_LAUNCHER_EVENT_LOG_H_
