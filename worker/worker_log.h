// WorkerLog: the worker daemon's log lines, "[id] msg", written to a sink
// (tests, lmps_local's in-process runs) or to stderr. Thread-safety: const
// methods; safe from several threads when the sink is.
#ifndef LMPS_WORKER_WORKER_LOG_H_
#define LMPS_WORKER_WORKER_LOG_H_

#include <cstdio>
#include <functional>
#include <string>
#include <utility>

#include "absl/strings/str_cat.h"

namespace lmps {

// Writes "[id] msg" lines to the options' sink, or to stderr. Copyable:
// fault-injection hooks keep a copy.
class WorkerLog {
 public:
  explicit WorkerLog(std::function<void(const std::string&)> sink)
      : sink_(std::move(sink)) {}

  void operator()(const std::string& id, const std::string& msg) const {
    if (sink_) {
      sink_(absl::StrCat("[", id, "] ", msg));
      return;
    }
    std::fprintf(stderr, "[%s] %s\n", id.c_str(), msg.c_str());
    std::fflush(stderr);
  }

  // What the trainers log through (they add no prefix to a sink's lines);
  // empty without a sink: they write the same lines to stderr themselves.
  std::function<void(const std::string&)> For(const std::string& id) const {
    if (!sink_) return nullptr;
    WorkerLog log = *this;
    return [log, id](const std::string& line) { log(id, line); };
  }

 private:
  std::function<void(const std::string&)> sink_;
};

}  // namespace lmps

#endif  // LMPS_WORKER_WORKER_LOG_H_
