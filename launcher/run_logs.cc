#include "launcher/run_logs.h"

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <limits>
#include <utility>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "report/run_report.h"

namespace lmps {

namespace fs = std::filesystem;

void RunLogs::Open(const std::string& run_dir, bool resume) {
  run_dir_ = run_dir;
  std::error_code ec;
  // The step log: a fresh run starts it afresh, a resumed one continues it.
  if (!resume) {
    fs::remove_all(run_dir_ + "/steps", ec);
    fs::remove(run_dir_ + "/steps.jsonl", ec);
    fs::remove(run_dir_ + "/events.jsonl", ec);
  }
  if (absl::StatusOr<std::unique_ptr<EventLog>> events =
          EventLog::Create(run_dir_ + "/events.jsonl");
      events.ok()) {
    events_ = *std::move(events);
  } else {
    std::printf("lmps: warning: no event log: %s\n",
                std::string(events.status().message()).c_str());
  }
  fs::create_directories(run_dir_ + "/steps", ec);
  if (absl::StatusOr<std::unique_ptr<StepLogMerger>> steps =
          StepLogMerger::Create(
              run_dir_ + "/steps", run_dir_ + "/steps.jsonl",
              [](const std::string& w) {
                std::printf("lmps: step log: %s\n", w.c_str());
              });
      steps.ok()) {
    steps_ = *std::move(steps);
  } else {
    std::printf("lmps: warning: no step log: %s\n",
                std::string(steps.status().message()).c_str());
  }
}

void RunLogs::MergeSteps(const JobStatus& status, bool final) {
  if (steps_ == nullptr) return;
  int64_t complete_before = std::numeric_limits<int64_t>::max();
  if (!final) {
    bool any = false;
    for (const NodeStatus& n : status.nodes()) {
      if (n.role() != WORKER) continue;
      complete_before = std::min(complete_before, n.step());
      any = true;
    }
    if (!any) return;
  }
  if (absl::Status s = steps_->Poll(complete_before); !s.ok()) {
    std::printf("lmps: warning: the step log stops: %s\n",
                std::string(s.message()).c_str());
    steps_.reset();
    return;
  }
  if (final) {
    std::printf("lmps: %lld steps logged in %s/steps.jsonl\n",
                static_cast<long long>(steps_->last_written() + 1),
                run_dir_.c_str());
  }
}

void RunLogs::LogEvents(const JobStatus& status) {
  if (events_ == nullptr) return;
  if (absl::Status s = events_->AddFrom(status); !s.ok()) StopEvents(s);
}

void RunLogs::LogEvent(const std::string& node, const std::string& event,
                       const std::string& action) {
  if (events_ == nullptr) return;
  if (absl::Status s = events_->Add(node, event, action); !s.ok()) {
    StopEvents(s);
  }
}

void RunLogs::StopEvents(const absl::Status& error) {
  std::printf("lmps: warning: the event log stops: %s\n",
              std::string(error.message()).c_str());
  events_.reset();
}

void RunLogs::WriteReport() const {
  if (run_dir_.empty()) return;  // not opened
  if (absl::Status s = WriteRunReport(run_dir_, [](const std::string& w) {
        std::printf("lmps: report: %s\n", w.c_str());
      });
      s.ok()) {
    std::printf("lmps: report in %s/report.html\n", run_dir_.c_str());
  } else {
    std::printf("lmps: warning: no report: %s\n",
                std::string(s.message()).c_str());
  }
}

}  // namespace lmps
