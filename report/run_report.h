// The run report: RUN_DIR/report.html, one self-contained page (no script,
// no network: inline SVG drawn here) from a run directory's files:
//   steps.jsonl      the step log (launcher/step_log_merge.h): the charts;
//   job.textproto    the effective job spec: shown, with the layout and the
//                    parameter servers' partition imbalance computed from it;
//   sample.txt       the generated sample, if any;
//   events.jsonl     the run's events (launcher/event_log.h): listed, and
//                    those during training marked on the loss chart at the
//                    step then in progress.
// Charts: training and eval loss against step (a log-scaled y axis when the
// loss spans more than a factor of 10), the learning rate, tokens/s, bytes
// on the wire per step, and a stacked bar per worker of its mean seconds
// per step in compute, pull, push and wait.
//
// Every chart is one <svg class="chart" id="..."> whose series are
// <path class="series" data-points="N"> with N points, one per step that
// has the value (tests and tools count them).
//
// A steps.jsonl line that is not a step record (a torn write, a corrupt
// file) is reported through `warn` with its line number and skipped; the
// report still renders. A missing steps.jsonl or job spec renders a page
// that says so. Errors: only an unwritable output.
//
// Thread-safety: pure functions of their inputs and the files they read.
#ifndef LMPS_REPORT_RUN_REPORT_H_
#define LMPS_REPORT_RUN_REPORT_H_

#include <cstdint>
#include <functional>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"

namespace lmps {

// One line of steps.jsonl; absent values are nullopt.
struct StepRow {
  int64_t step = 0;
  double time = 0;
  std::optional<double> loss, eval_loss, lr, grad_norm, tokens_per_second,
      bytes_pulled, bytes_pushed, bubble;
  // worker -> phase ("compute_s", "pull_s", "push_s", "wait_s") -> seconds.
  std::map<std::string, std::map<std::string, double>> workers;
};

// The rows of a steps.jsonl's text, in file order.
std::vector<StepRow> ParseSteps(const std::string& text,
                                const std::function<void(const std::string&)>&
                                    warn);

// One series of a line chart: (x, y) points, drawn in `color`.
struct ChartSeries {
  std::string name;
  std::string color;
  std::vector<std::pair<double, double>> points;
};

// A vertical marker on a chart: <path class="event" data-step="X">.
struct ChartMarker {
  double x = 0;
  std::string label;
};

// An SVG line chart (see the file comment for its markup); `log_y`: a log
// scale (non-positive values are left out).
std::string SvgLineChart(const std::string& id, const std::string& title,
                         const std::vector<ChartSeries>& series, bool log_y,
                         const std::vector<ChartMarker>& markers = {});

// One line of events.jsonl.
struct RunEvent {
  double time = 0;  // Unix seconds
  std::string node, event, action;
};

// The events of an events.jsonl's text; bad lines go to `warn`.
std::vector<RunEvent> ParseEvents(const std::string& text,
                                  const std::function<void(const std::string&)>&
                                      warn);

// What differs between the report file and the scheduler's live /status
// page (report/status_page.h).
struct PageOptions {
  std::string title = "lmps run report";
  // > 0: the page reloads itself every refresh_seconds.
  int refresh_seconds = 0;
  // HTML placed after the title, before the summary (the live nodes table).
  std::string header_html;
};

// The whole page.
std::string RenderRunReport(const std::vector<StepRow>& steps,
                            const std::vector<RunEvent>& events,
                            const std::string& job_text,
                            const std::string& sample,
                            const PageOptions& page = {});

// Reads RUN_DIR's files and writes RUN_DIR/report.html.
absl::Status WriteRunReport(const std::string& run_dir,
                            const std::function<void(const std::string&)>&
                                warn);

// Text made safe inside HTML.
std::string HtmlEscape(const std::string& text);

}  // namespace lmps

#endif  // LMPS_REPORT_RUN_REPORT_H_
