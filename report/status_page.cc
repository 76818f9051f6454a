#include "report/status_page.h"

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "google/protobuf/text_format.h"

namespace lmps {
namespace {

std::string RoleOf(const NodeStatus& n) {
  if (n.role() == SERVER) {
    return absl::StrCat("shard ", n.shard(),
                        n.backup() ? (n.serving_primary() ? " primary (was backup)"
                                                          : " backup")
                                   : "");
  }
  return absl::StrCat("worker dp ", n.dp_rank(), " pp ", n.pp_rank(), " tp ",
                      n.tp_rank());
}

std::string StateOf(const NodeStatus& n) {
  if (n.done()) return "done";
  if (!n.alive()) return "dead";
  if (n.role() == SERVER && n.needs_snapshot()) return "awaiting snapshot";
  return "alive";
}

std::string NodesTable(const JobStatus& status) {
  std::string html = absl::StrCat(
      "<p id=\"state\">Job <b>", JobState_Name(status.state()), "</b>",
      status.message().empty() ? "" : absl::StrCat(": ", HtmlEscape(status.message())),
      status.start_step() > 0 ? absl::StrCat(" (resumed at step ",
                                              status.start_step(), ")")
                              : "",
      "; ", status.expected_servers(), " server(s), ",
      status.expected_workers(), " worker(s) expected.</p>\n",
      "<h2>Nodes</h2><table id=\"nodes\"><tr><th>node</th><th>role</th>"
      "<th>address</th><th>heartbeat age</th><th>step</th><th>loss</th>"
      "<th>state</th><th>last error or event</th></tr>");
  for (const NodeStatus& n : status.nodes()) {
    const std::string last = n.error().empty() ? n.last_event() : n.error();
    absl::StrAppend(
        &html, "<tr class=\"node", n.alive() || n.done() ? "" : " dead",
        "\" data-node=\"", HtmlEscape(n.node_id()), "\"><td>",
        HtmlEscape(n.node_id()), "</td><td>", HtmlEscape(RoleOf(n)),
        "</td><td>", HtmlEscape(n.address()), "</td><td>",
        absl::StrFormat("%.1f s", n.heartbeat_age_ms() / 1000.0), "</td><td>",
        n.role() == WORKER ? absl::StrCat(n.step()) : "", "</td><td>",
        n.role() == WORKER && n.step() > 0 ? absl::StrFormat("%.4f", n.loss())
                                           : "",
        "</td><td>", StateOf(n), "</td><td>", HtmlEscape(last),
        "</td></tr>");
  }
  return html + "</table>\n";
}

}  // namespace

void StatusHistory::Observe(const JobStatus& status, double now_unix_s) {
  int64_t min_step = -1;
  double loss = 0, tps = 0, pulled = 0, pushed = 0, lr = 0;
  int workers = 0;
  std::optional<double> eval;
  for (const NodeStatus& n : status.nodes()) {
    if (n.role() != WORKER) continue;
    ++workers;
    min_step = min_step < 0 ? n.step() : std::min<int64_t>(min_step, n.step());
    loss += n.loss();
    tps += n.tokens_per_second();
    pulled += static_cast<double>(n.pull_wire_bytes());
    pushed += static_cast<double>(n.push_wire_bytes());
    lr = std::max(lr, static_cast<double>(n.lr()));
    if (n.dp_rank() == 0 && n.pp_rank() == 0 && n.tp_rank() == 0 &&
        std::isfinite(n.eval_loss()) && n.eval_loss() > 0) {
      eval = n.eval_loss();
    }
  }
  if (workers == 0 || min_step <= 0) return;
  absl::MutexLock lock(&mu_);
  if (!rows_.empty() && rows_.back().step >= min_step) return;
  StepRow row;
  row.step = min_step;
  row.time = now_unix_s;
  if (std::isfinite(loss) && loss > 0) row.loss = loss / workers;
  row.tokens_per_second = tps;
  if (lr > 0) row.lr = lr;
  if (pulled > 0) row.bytes_pulled = pulled;
  if (pushed > 0) row.bytes_pushed = pushed;
  if (eval.has_value() && eval != last_eval_) {
    row.eval_loss = eval;
    last_eval_ = eval;
  }
  rows_.push_back(std::move(row));
  while (rows_.size() > max_rows_) rows_.pop_front();
}

std::vector<StepRow> StatusHistory::Rows() const {
  absl::MutexLock lock(&mu_);
  return std::vector<StepRow>(rows_.begin(), rows_.end());
}

std::string RenderStatusPage(const JobStatus& status,
                             const std::vector<StepRow>& history,
                             int refresh_seconds) {
  std::vector<RunEvent> events;
  events.reserve(status.events_size());
  for (const NodeEvent& e : status.events()) {
    events.push_back({e.unix_ms() / 1000.0, e.node_id(), e.event(), e.action()});
  }
  std::string job_text;
  google::protobuf::TextFormat::PrintToString(status.spec(), &job_text);
  PageOptions page;
  page.title = absl::StrCat("lmps job",
                            status.spec().name().empty() ? "" : " ",
                            status.spec().name(), ": live status");
  page.refresh_seconds = refresh_seconds;
  page.header_html = NodesTable(status);
  return RenderRunReport(history, events, job_text, /*sample=*/"", page);
}

}  // namespace lmps
