#include "launcher/event_log.h"

#include <cmath>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "common/rpc/status_util.h"
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
  for (const std::string& line : ReadLinesIfRegular(path)) {
    const nlohmann::json j = nlohmann::json::parse(line, nullptr, false);
    if (!j.is_object() || !j.contains("time") || !j["time"].is_number()) {
      continue;  // a torn line: the report skips it too
    }
    seen.insert(Key(std::llround(j["time"].get<double>() * 1000),
                    j.value("node", ""), j.value("event", "")));
  }
  LMPS_ASSIGN_OR_RETURN(std::unique_ptr<AppendFile> file,
                        AppendFile::Open(std::move(path), "event log"));
  std::unique_ptr<EventLog> log(new EventLog(std::move(file)));
  log->seen_ = std::move(seen);
  return log;
}

absl::Status EventLog::Append(int64_t unix_ms, const std::string& node,
                              const std::string& event,
                              const std::string& action) {
  if (!seen_.insert(Key(unix_ms, node, event)).second) return absl::OkStatus();
  nlohmann::ordered_json j;
  j["time"] = static_cast<double>(unix_ms) / 1000;
  j["node"] = node;
  j["event"] = event;
  j["action"] = action;
  return file_->AppendLine(j.dump());
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
