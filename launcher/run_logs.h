// RunLogs: the run's logs in RUN_DIR, as lmps_local keeps them while it
// follows a job (launcher/launcher.h):
//   - steps.jsonl, merged from the workers' steps/<process>.jsonl
//     (launcher/step_log_merge.h) each time the launcher polls the job,
//     every step once every worker is past it, the rest at the end;
//   - events.jsonl (launcher/event_log.h): the scheduler's events from each
//     polled status, and the launcher's own (a process restarted, the job
//     restarted from a checkpoint, an elastic resize);
//   - report.html (report/run_report.h), written from them at the end.
//
// A log is never a reason to stop the job: a log that cannot be opened is
// reported once ("lmps: warning: no step log: ...", "... no event log:
// ...") and left out; a write that fails is reported once ("lmps: warning:
// the step log stops: ...") and the log is dropped; so is a report that
// cannot be written. Messages go to stdout, as the launcher's others.
// Before Open() (and for a log left out) every call does nothing.
//
// Thread-safety: not thread-safe; the launcher's thread (its monitor loop)
// owns it.
#ifndef LMPS_LAUNCHER_RUN_LOGS_H_
#define LMPS_LAUNCHER_RUN_LOGS_H_

#include <memory>
#include <string>

#include "launcher/event_log.h"
#include "launcher/step_log_merge.h"
#include "proto/lmps.pb.h"

namespace lmps {

class RunLogs {
 public:
  RunLogs() = default;
  RunLogs(const RunLogs&) = delete;
  RunLogs& operator=(const RunLogs&) = delete;

  // Opens RUN_DIR's event log and step log (creating RUN_DIR/steps, where
  // the workers write theirs). A fresh run (`resume` false) first removes
  // the previous run's steps/, steps.jsonl and events.jsonl; a resumed run
  // continues them.
  void Open(const std::string& run_dir, bool resume);

  // Writes the steps every worker of `status` is past (every step read
  // when `final`) to RUN_DIR/steps.jsonl; when `final`, prints how many
  // steps the file holds. Not final and no worker in `status`: nothing.
  void MergeSteps(const JobStatus& status, bool final);

  // Adds the scheduler's events in `status` not logged yet.
  void LogEvents(const JobStatus& status);
  // Adds one of the launcher's own events (`node` empty: the job's).
  void LogEvent(const std::string& node, const std::string& event,
                const std::string& action);

  // Writes RUN_DIR/report.html from RUN_DIR's files and prints where (or
  // why not).
  void WriteReport() const;

 private:
  void StopEvents(const absl::Status& error);

  std::string run_dir_;
  // Null when it could not be opened or a write failed (reported once).
  std::unique_ptr<StepLogMerger> steps_;
  std::unique_ptr<EventLog> events_;
};

}  // namespace lmps

#endif  // LMPS_LAUNCHER_RUN_LOGS_H_
