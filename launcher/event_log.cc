#include "launcher/event_log.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "nlohmann/json.hpp"

namespace lmps {
namespace {

std::string Key(int64_t unix_ms, const std::string& node,
                const std::string& event) {
  return absl::StrCat(unix_ms, "|", node, "|", event);
}

}  // namespace

absl::StatusOr<std::unique_ptr<EventLog>> EventLog::Create(std::string path) {
  std::set<std::string> seen;
  std::error_code ec;
  if (std::filesystem::is_regular_file(path, ec)) {
    std::ifstream f(path);
    for (std::string line; std::getline(f, line);) {
      const nlohmann::json j = nlohmann::json::parse(line, nullptr, false);
      if (!j.is_object() || !j.contains("time") || !j["time"].is_number()) {
        continue;  // a torn line: the report skips it too
      }
      seen.insert(Key(std::llround(j["time"].get<double>() * 1000),
                      j.value("node", ""), j.value("event", "")));
    }
  }
  const int fd =
      ::open(path.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
  if (fd < 0) {
    return absl::FailedPreconditionError(
        absl::StrCat("event log ", path, ": cannot open for appending: ",
                     std::strerror(errno)));
  }
  std::unique_ptr<EventLog> log(new EventLog(std::move(path), fd));
  log->seen_ = std::move(seen);
  return log;
}

EventLog::~EventLog() { ::close(fd_); }

absl::Status EventLog::Append(int64_t unix_ms, const std::string& node,
                              const std::string& event,
                              const std::string& action) {
  if (!seen_.insert(Key(unix_ms, node, event)).second) return absl::OkStatus();
  nlohmann::ordered_json j;
  j["time"] = static_cast<double>(unix_ms) / 1000;
  j["node"] = node;
  j["event"] = event;
  j["action"] = action;
  const std::string line = j.dump() + "\n";
  const ssize_t n = ::write(fd_, line.data(), line.size());
  if (n != static_cast<ssize_t>(line.size())) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "event log ", path_, ": ",
        n < 0 ? std::strerror(errno) : "short write: the disk is full?"));
  }
  return absl::OkStatus();
}

absl::Status EventLog::AddFrom(const JobStatus& status) {
  for (const NodeEvent& e : status.events()) {
    if (absl::Status s = Append(e.unix_ms(), e.node_id(), e.event(), e.action());
        !s.ok()) {
      return s;
    }
  }
  return absl::OkStatus();
}

absl::Status EventLog::Add(const std::string& node, const std::string& event,
                           const std::string& action) {
  return Append(absl::ToUnixMillis(absl::Now()), node, event, action);
}

}  // namespace lmps
