#include "report/run_report.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>

#include <google/protobuf/text_format.h>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "common/model/job_spec.h"
#include "common/model/partition.h"
#include "nlohmann/json.hpp"
#include "proto/lmps.pb.h"

namespace lmps {
namespace {

namespace fs = std::filesystem;

constexpr double kWidth = 720, kHeight = 260;
constexpr double kLeft = 70, kRight = 20, kTop = 34, kBottom = 40;

std::optional<double> Get(const nlohmann::json& j, const char* key) {
  auto it = j.find(key);
  if (it == j.end() || !it->is_number()) return std::nullopt;
  const double v = it->get<double>();
  if (!std::isfinite(v)) return std::nullopt;
  return v;
}

std::string ReadFileOrEmpty(const std::string& path) {
  std::error_code ec;
  if (!fs::is_regular_file(path, ec)) return "";
  std::ifstream f(path, std::ios::binary);
  std::stringstream s;
  s << f.rdbuf();
  return s.str();
}

// A tick label: 3 significant digits, SI-scaled for large values.
std::string Tick(double v) {
  const double a = std::fabs(v);
  if (a >= 1e9) return absl::StrFormat("%.3gG", v / 1e9);
  if (a >= 1e6) return absl::StrFormat("%.3gM", v / 1e6);
  if (a >= 1e4) return absl::StrFormat("%.3gk", v / 1e3);
  return absl::StrFormat("%.3g", v);
}

std::string SvgOpen(const std::string& id, const std::string& title) {
  return absl::StrFormat(
      "<svg class=\"chart\" id=\"%s\" xmlns=\"http://www.w3.org/2000/svg\" "
      "width=\"%.0f\" height=\"%.0f\" viewBox=\"0 0 %.0f %.0f\">"
      "<text class=\"title\" x=\"%.0f\" y=\"20\">%s</text>",
      HtmlEscape(id), kWidth, kHeight, kWidth, kHeight, kLeft,
      HtmlEscape(title));
}

// Series of `steps` picked by `value`, against the step.
ChartSeries Series(const std::vector<StepRow>& steps, const std::string& name,
                   const std::string& color,
                   std::optional<double> StepRow::*value) {
  ChartSeries s{name, color, {}};
  for (const StepRow& r : steps) {
    if ((r.*value).has_value()) s.points.push_back({double(r.step), *(r.*value)});
  }
  return s;
}

// Mean seconds per step of each phase, per worker, as a stacked bar each.
std::string PhaseChart(const std::vector<StepRow>& steps) {
  static const char* kPhases[] = {"compute_s", "pull_s", "push_s", "wait_s"};
  static const char* kColors[] = {"#4e79a7", "#59a14f", "#f28e2b", "#bab0ac"};
  std::map<std::string, std::map<std::string, std::pair<double, int>>> sums;
  for (const StepRow& r : steps) {
    for (const auto& [worker, phases] : r.workers) {
      for (const auto& [phase, seconds] : phases) {
        auto& [sum, n] = sums[worker][phase];
        sum += seconds;
        ++n;
      }
    }
  }
  const double row = 22;
  const double height = kTop + row * std::max<size_t>(1, sums.size()) + 50;
  std::string svg = absl::StrFormat(
      "<svg class=\"chart\" id=\"phases\" xmlns=\"http://www.w3.org/2000/svg\" "
      "width=\"%.0f\" height=\"%.0f\" viewBox=\"0 0 %.0f %.0f\">"
      "<text class=\"title\" x=\"%.0f\" y=\"20\">Mean seconds per step, by "
      "phase</text>",
      kWidth, height, kWidth, height, kLeft);
  double longest = 0;
  for (const auto& [worker, phases] : sums) {
    double total = 0;
    for (const auto& [phase, sn] : phases) total += sn.first / sn.second;
    longest = std::max(longest, total);
  }
  if (sums.empty() || longest <= 0) {
    return svg + absl::StrFormat(
                     "<text x=\"%.0f\" y=\"%.0f\">no phase timings</text></svg>",
                     kLeft, kTop + 16);
  }
  const double span = kWidth - kLeft - kRight - 60;
  double y = kTop;
  for (const auto& [worker, phases] : sums) {
    absl::StrAppendFormat(&svg,
                          "<text x=\"%.0f\" y=\"%.1f\" text-anchor=\"end\">%s"
                          "</text>",
                          kLeft - 6, y + 15, HtmlEscape(worker));
    double x = kLeft, total = 0;
    for (int p = 0; p < 4; ++p) {
      auto it = phases.find(kPhases[p]);
      if (it == phases.end()) continue;
      const double mean = it->second.first / it->second.second;
      const double w = span * mean / longest;
      absl::StrAppendFormat(
          &svg,
          "<rect class=\"phase\" data-worker=\"%s\" data-phase=\"%s\" "
          "x=\"%.1f\" y=\"%.1f\" width=\"%.1f\" height=\"%.0f\" fill=\"%s\">"
          "<title>%s %s: %.4f s</title></rect>",
          HtmlEscape(worker), kPhases[p], x, y + 2, w, row - 4, kColors[p],
          HtmlEscape(worker), kPhases[p], mean);
      x += w;
      total += mean;
    }
    absl::StrAppendFormat(&svg, "<text x=\"%.1f\" y=\"%.1f\">%.3f s</text>",
                          x + 4, y + 15, total);
    y += row;
  }
  double lx = kLeft;
  for (int p = 0; p < 4; ++p) {
    absl::StrAppendFormat(&svg,
                          "<rect x=\"%.0f\" y=\"%.0f\" width=\"10\" "
                          "height=\"10\" fill=\"%s\"/><text x=\"%.0f\" "
                          "y=\"%.0f\">%s</text>",
                          lx, y + 14, kColors[p], lx + 14, y + 23,
                          std::string(kPhases[p], std::strlen(kPhases[p]) - 2));
    lx += 100;
  }
  return svg + "</svg>";
}

}  // namespace

std::string HtmlEscape(const std::string& text) {
  std::string out;
  out.reserve(text.size());
  for (char c : text) {
    switch (c) {
      case '&': out += "&amp;"; break;
      case '<': out += "&lt;"; break;
      case '>': out += "&gt;"; break;
      case '"': out += "&quot;"; break;
      case '\'': out += "&#39;"; break;
      default: out += c;
    }
  }
  return out;
}

std::vector<StepRow> ParseSteps(
    const std::string& text,
    const std::function<void(const std::string&)>& warn) {
  std::vector<StepRow> rows;
  int64_t number = 0;
  for (absl::string_view line : absl::StrSplit(text, '\n')) {
    ++number;
    if (line.empty()) continue;
    const nlohmann::json j = nlohmann::json::parse(line, nullptr, false);
    auto step = j.is_object() ? j.find("step") : j.end();
    if (step == j.end() || !step->is_number_integer()) {
      if (warn) {
        warn(absl::StrCat("steps.jsonl:", number,
                          ": not a step record; skipped"));
      }
      continue;
    }
    StepRow r;
    r.step = step->get<int64_t>();
    r.time = Get(j, "time").value_or(0);
    r.loss = Get(j, "loss");
    r.eval_loss = Get(j, "eval_loss");
    r.lr = Get(j, "lr");
    r.grad_norm = Get(j, "grad_norm");
    r.tokens_per_second = Get(j, "tokens_per_second");
    r.bytes_pulled = Get(j, "bytes_pulled");
    r.bytes_pushed = Get(j, "bytes_pushed");
    r.bubble = Get(j, "bubble");
    auto workers = j.find("workers");
    if (workers != j.end() && workers->is_object()) {
      for (const auto& [node, phases] : workers->items()) {
        if (!phases.is_object()) continue;
        for (const auto& [phase, v] : phases.items()) {
          if (v.is_number()) r.workers[node][phase] = v.get<double>();
        }
      }
    }
    rows.push_back(std::move(r));
  }
  return rows;
}

std::vector<RunEvent> ParseEvents(
    const std::string& text,
    const std::function<void(const std::string&)>& warn) {
  std::vector<RunEvent> events;
  int64_t number = 0;
  for (absl::string_view line : absl::StrSplit(text, '\n')) {
    ++number;
    if (line.empty()) continue;
    const nlohmann::json j = nlohmann::json::parse(line, nullptr, false);
    const std::optional<double> time =
        j.is_object() ? Get(j, "time") : std::nullopt;
    if (!time || !j.contains("event") || !j["event"].is_string()) {
      if (warn) {
        warn(absl::StrCat("events.jsonl:", number,
                          ": not an event record; skipped"));
      }
      continue;
    }
    RunEvent e;
    e.time = *time;
    e.event = j["event"].get<std::string>();
    if (j.contains("node") && j["node"].is_string()) e.node = j["node"];
    if (j.contains("action") && j["action"].is_string()) e.action = j["action"];
    events.push_back(std::move(e));
  }
  return events;
}

std::string SvgLineChart(const std::string& id, const std::string& title,
                         const std::vector<ChartSeries>& series, bool log_y,
                         const std::vector<ChartMarker>& markers) {
  auto y_of = [log_y](double v) { return log_y ? std::log10(v) : v; };
  double x0 = INFINITY, x1 = -INFINITY, y0 = INFINITY, y1 = -INFINITY;
  for (const ChartSeries& s : series) {
    for (const auto& [x, y] : s.points) {
      if (log_y && !(y > 0)) continue;
      x0 = std::min(x0, x);
      x1 = std::max(x1, x);
      y0 = std::min(y0, y_of(y));
      y1 = std::max(y1, y_of(y));
    }
  }
  std::string svg = SvgOpen(id, title);
  if (!(x0 <= x1)) {
    return svg + absl::StrFormat(
                     "<text x=\"%.0f\" y=\"%.0f\">no data</text></svg>", kLeft,
                     kTop + 16);
  }
  if (x1 == x0) x1 = x0 + 1;
  if (y1 == y0) {
    y0 -= 0.5;
    y1 += 0.5;
  }
  const double pw = kWidth - kLeft - kRight, ph = kHeight - kTop - kBottom;
  auto px = [&](double x) { return kLeft + (x - x0) / (x1 - x0) * pw; };
  auto py = [&](double y) { return kTop + (1 - (y - y0) / (y1 - y0)) * ph; };
  // Axes and ticks.
  absl::StrAppendFormat(&svg,
                        "<path class=\"axis\" d=\"M%.1f %.1f V%.1f H%.1f\"/>",
                        kLeft, kTop, kTop + ph, kLeft + pw);
  for (int i = 0; i <= 4; ++i) {
    const double v = y0 + (y1 - y0) * i / 4;
    absl::StrAppendFormat(
        &svg,
        "<path class=\"grid\" d=\"M%.1f %.1f H%.1f\"/><text x=\"%.1f\" "
        "y=\"%.1f\" text-anchor=\"end\">%s</text>",
        kLeft, py(v), kLeft + pw, kLeft - 6, py(v) + 4,
        Tick(log_y ? std::pow(10, v) : v));
  }
  for (int i = 0; i <= 4; ++i) {
    const double v = x0 + (x1 - x0) * i / 4;
    absl::StrAppendFormat(&svg,
                          "<text x=\"%.1f\" y=\"%.1f\" "
                          "text-anchor=\"middle\">%s</text>",
                          px(v), kTop + ph + 18, Tick(std::round(v)));
  }
  absl::StrAppendFormat(&svg,
                        "<text x=\"%.1f\" y=\"%.1f\" "
                        "text-anchor=\"middle\">step%s</text>",
                        kLeft + pw / 2, kHeight - 4,
                        log_y ? " (log scale)" : "");
  for (const ChartMarker& m : markers) {
    if (m.x < x0 || m.x > x1) continue;
    absl::StrAppendFormat(&svg,
                          "<path class=\"event\" data-step=\"%g\" "
                          "d=\"M%.1f %.1f V%.1f\"><title>%s</title></path>",
                          m.x, px(m.x), kTop, kTop + ph, HtmlEscape(m.label));
  }
  double legend = kLeft + pw;
  for (auto it = series.rbegin(); it != series.rend(); ++it) {
    const ChartSeries& s = *it;
    std::string d;
    int n = 0;
    for (const auto& [x, y] : s.points) {
      if (log_y && !(y > 0)) continue;
      absl::StrAppendFormat(&d, "%s%.1f %.1f ", n == 0 ? "M" : "L", px(x),
                            py(y_of(y)));
      ++n;
    }
    absl::StrAppendFormat(&svg,
                          "<path class=\"series\" data-name=\"%s\" "
                          "data-points=\"%d\" stroke=\"%s\" d=\"%s\"/>",
                          HtmlEscape(s.name), n, s.color, d);
    if (n == 1) {  // a lone point (one evaluation) stays visible
      const auto& [x, y] = s.points.front();
      absl::StrAppendFormat(&svg,
                            "<circle cx=\"%.1f\" cy=\"%.1f\" r=\"3\" "
                            "fill=\"%s\"/>",
                            px(x), py(y_of(y)), s.color);
    }
    legend -= 8 * s.name.size() + 24;
    absl::StrAppendFormat(&svg,
                          "<rect x=\"%.0f\" y=\"10\" width=\"10\" height=\"10\" "
                          "fill=\"%s\"/><text x=\"%.0f\" y=\"20\">%s</text>",
                          legend, s.color, legend + 14, HtmlEscape(s.name));
  }
  return svg + "</svg>";
}

std::string RenderRunReport(const std::vector<StepRow>& steps,
                            const std::vector<RunEvent>& events,
                            const std::string& job_text,
                            const std::string& sample,
                            const PageOptions& page) {
  std::string html =
      "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
      // No favicon request: the page loads nothing.
      "<link rel=\"icon\" href=\"data:,\">";
  if (page.refresh_seconds > 0) {
    absl::StrAppend(&html, "<meta http-equiv=\"refresh\" content=\"",
                    page.refresh_seconds, "\">");
  }
  absl::StrAppend(&html, "<title>", HtmlEscape(page.title), "</title>");
  html +=
      "<style>"
      "body{font-family:sans-serif;margin:24px;max-width:780px;color:#222}"
      "svg.chart{display:block;margin:12px 0;background:#fafafa;"
      "border:1px solid #ddd}"
      "svg text{font-size:12px;fill:#333}svg text.title{font-weight:bold}"
      ".series{fill:none;stroke-width:1.5}.axis{stroke:#333;fill:none}"
      ".grid{stroke:#e4e4e4}.event{stroke:#e15759;stroke-dasharray:4 3}pre{background:#f4f4f4;padding:8px;"
      "white-space:pre-wrap}td{padding:2px 12px 2px 0}"
      "tr.dead td{color:#c0392b}"
      "</style></head><body>";
  absl::StrAppend(&html, "<h1>", HtmlEscape(page.title), "</h1>\n",
                  page.header_html);
  // Summary.
  JobSpec spec;
  const bool have_spec =
      !job_text.empty() &&
      google::protobuf::TextFormat::ParseFromString(job_text, &spec);
  if (have_spec) ApplyJobSpecDefaults(&spec);
  html += "<table>";
  auto row = [&html](const std::string& k, const std::string& v) {
    absl::StrAppend(&html, "<tr><td>", HtmlEscape(k), "</td><td>",
                    HtmlEscape(v), "</td></tr>");
  };
  if (have_spec) {
    const ModelConfig& m = spec.model();
    row("model", absl::StrCat(m.n_layer(), " layers x ", m.n_embd(),
                              " wide, ", m.n_head(), " heads, context ",
                              m.block_size(), ", vocabulary ", m.vocab_size()));
    row("layout", absl::StrCat("dp ", spec.layout().dp(), " x pp ",
                               spec.layout().pp(), " x tp ",
                               spec.layout().tp(), ", ",
                               spec.layout().num_shards(), " shards, ",
                               ConsistencyMode_Name(spec.train().mode())));
    absl::StatusOr<PartitionMap> map = ComputePartition(
        m, std::max(1, spec.layout().num_shards()), spec.max_chunk_bytes());
    if (map.ok()) {
      row("partition imbalance",
          absl::StrFormat("%.3f (largest shard / mean; 1 is perfect)",
                          map->imbalance()));
    }
  } else {
    row("job spec", job_text.empty() ? "missing (no job.textproto)"
                                     : "unreadable job.textproto");
  }
  row("steps logged", absl::StrCat(steps.size()));
  if (!steps.empty()) {
    const StepRow& last = steps.back();
    if (last.loss) row("final training loss", absl::StrFormat("%.4f", *last.loss));
    for (auto it = steps.rbegin(); it != steps.rend(); ++it) {
      if (it->eval_loss) {
        row("last eval loss", absl::StrFormat("%.4f (perplexity %.2f)",
                                              *it->eval_loss,
                                              std::exp(*it->eval_loss)));
        break;
      }
    }
    if (last.tokens_per_second) {
      row("tokens/s (last step)", absl::StrFormat("%.0f", *last.tokens_per_second));
    }
    row("wall time", absl::StrFormat("%.1f s", last.time - steps.front().time));
  }
  html += "</table>\n";
  if (steps.empty()) {
    html += "<p>No steps logged (no steps.jsonl, or no valid line in it).</p>";
  }
  // Charts.
  double lo = INFINITY, hi = -INFINITY;
  for (const StepRow& r : steps) {
    for (const auto& v : {r.loss, r.eval_loss}) {
      if (v && *v > 0) {
        lo = std::min(lo, *v);
        hi = std::max(hi, *v);
      }
    }
  }
  // Events during training, at the step then in progress: the first step
  // whose record (written when it ended) is not older than the event.
  std::vector<ChartMarker> markers;
  std::vector<int64_t> event_step(events.size(), -1);
  for (size_t i = 0; i < events.size(); ++i) {
    if (steps.empty() || events[i].time < steps.front().time) continue;
    for (const StepRow& r : steps) {
      if (r.time >= events[i].time) {
        event_step[i] = r.step;
        break;
      }
    }
    if (event_step[i] < 0) continue;
    markers.push_back(
        {double(event_step[i]),
         absl::StrCat(events[i].node.empty() ? "job" : events[i].node, ": ",
                      events[i].event)});
  }
  html += SvgLineChart("loss", "Loss",
                       {Series(steps, "train", "#4e79a7", &StepRow::loss),
                        Series(steps, "eval", "#e15759", &StepRow::eval_loss)},
                       /*log_y=*/lo > 0 && hi / lo > 10, markers);
  html += SvgLineChart("lr", "Learning rate",
                       {Series(steps, "lr", "#76b7b2", &StepRow::lr)}, false);
  html += SvgLineChart(
      "tokens", "Tokens per second",
      {Series(steps, "tokens/s", "#59a14f", &StepRow::tokens_per_second)},
      false);
  html += SvgLineChart(
      "bytes", "Bytes on the wire per step",
      {Series(steps, "pulled", "#edc948", &StepRow::bytes_pulled),
       Series(steps, "pushed", "#b07aa1", &StepRow::bytes_pushed)},
      false);
  html += PhaseChart(steps);
  if (!events.empty()) {
    html += "<h2>Events</h2><table id=\"events\"><tr><td>time</td><td>step"
            "</td><td>node</td><td>event</td><td>action</td></tr>";
    const double t0 = steps.empty() ? events.front().time : steps.front().time;
    for (size_t i = 0; i < events.size(); ++i) {
      absl::StrAppend(
          &html, "<tr class=\"event\"><td>",
          absl::StrFormat("%+.1f s", events[i].time - t0), "</td><td>",
          event_step[i] >= 0 ? absl::StrCat(event_step[i]) : "", "</td><td>",
          HtmlEscape(events[i].node.empty() ? "job" : events[i].node),
          "</td><td>", HtmlEscape(events[i].event), "</td><td>",
          HtmlEscape(events[i].action), "</td></tr>");
    }
    html += "</table>\n";
  }
  if (!sample.empty()) {
    absl::StrAppend(&html, "<h2>Sample</h2><pre id=\"sample\">",
                    HtmlEscape(sample), "</pre>\n");
  }
  if (!job_text.empty()) {
    absl::StrAppend(&html, "<h2>Job spec</h2><pre id=\"job\">",
                    HtmlEscape(job_text), "</pre>\n");
  }
  return html + "</body></html>\n";
}

absl::Status WriteRunReport(
    const std::string& run_dir,
    const std::function<void(const std::string&)>& warn) {
  const std::vector<StepRow> steps =
      ParseSteps(ReadFileOrEmpty(run_dir + "/steps.jsonl"), warn);
  const std::vector<RunEvent> events =
      ParseEvents(ReadFileOrEmpty(run_dir + "/events.jsonl"), warn);
  const std::string html = RenderRunReport(
      steps, events, ReadFileOrEmpty(run_dir + "/job.textproto"),
      ReadFileOrEmpty(run_dir + "/sample.txt"));
  const std::string out = run_dir + "/report.html";
  const std::string tmp = out + ".tmp";
  {
    std::ofstream f(tmp, std::ios::binary | std::ios::trunc);
    f << html;
    f.flush();
    if (!f) {
      return absl::ResourceExhaustedError(
          absl::StrCat("cannot write ", tmp, " (the disk is full?)"));
    }
  }
  std::error_code ec;
  fs::rename(tmp, out, ec);
  if (ec) {
    return absl::InternalError(
        absl::StrCat("cannot rename ", tmp, " to ", out, ": ", ec.message()));
  }
  return absl::OkStatus();
}

}  // namespace lmps
