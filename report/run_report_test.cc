#include "report/run_report.h"

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <regex>
#include <sstream>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"

namespace lmps {
namespace {

namespace fs = std::filesystem;

std::string StepsText(int n) {
  std::string text;
  for (int i = 0; i < n; ++i) {
    absl::StrAppend(
        &text, "{\"step\":", i, ",\"time\":", 1000 + i,
        ",\"loss\":", 5.0 - 0.05 * i, i % 10 == 9 ? ",\"eval_loss\":4.5" : "",
        ",\"lr\":0.001,\"tokens_per_second\":5000,\"bytes_pulled\":100,"
        "\"bytes_pushed\":100,\"workers\":{\"worker-0\":{\"compute_s\":0.2,"
        "\"pull_s\":0.01,\"push_s\":0.02,\"wait_s\":0.005},\"worker-1\":"
        "{\"compute_s\":0.3,\"pull_s\":0.01,\"push_s\":0.02,\"wait_s\":0.001}}"
        "}\n");
  }
  return text;
}

// data-points of the series `name` in chart `id`, or -1.
int Points(const std::string& html, const std::string& id,
           const std::string& name) {
  const size_t chart = html.find("id=\"" + id + "\"");
  if (chart == std::string::npos) return -1;
  const size_t end = html.find("</svg>", chart);
  const std::string svg = html.substr(chart, end - chart);
  std::smatch m;
  const std::regex re("data-name=\"" + name + "\" data-points=\"([0-9]+)\"");
  if (!std::regex_search(svg, m, re)) return -1;
  return std::stoi(m[1]);
}

TEST(RunReportTest, ChartsHaveOnePointPerStep) {
  const std::vector<StepRow> steps = ParseSteps(StepsText(30), nullptr);
  ASSERT_EQ(steps.size(), 30u);
  const std::vector<RunEvent> events = {
      {990, "", "job state ASSEMBLING -> RUNNING", ""},  // before training
      {1012.5, "worker-1", "missed its <lease>", "slot open"},
      {1020, "", "elastic resize", "restarts at step 20"}};
  const std::string html = RenderRunReport(
      steps, events,
      "model { n_layer: 2 n_head: 2 n_embd: 32 block_size: 32 }\n",
      "The <sample> & more");
  EXPECT_EQ(Points(html, "loss", "train"), 30);
  EXPECT_EQ(Points(html, "loss", "eval"), 3);
  EXPECT_EQ(Points(html, "lr", "lr"), 30);
  EXPECT_EQ(Points(html, "tokens", "tokens/s"), 30);
  EXPECT_EQ(Points(html, "bytes", "pushed"), 30);
  // A stacked bar per worker, one rect per phase.
  EXPECT_NE(html.find("data-worker=\"worker-1\" data-phase=\"wait_s\""),
            std::string::npos);
  // Text is escaped; no script, no network.
  EXPECT_NE(html.find("The &lt;sample&gt; &amp; more"), std::string::npos);
  EXPECT_EQ(html.find("<script"), std::string::npos);
  EXPECT_EQ(html.find("http://"), html.find("http://www.w3.org/2000/svg"));
  EXPECT_NE(html.find("partition imbalance"), std::string::npos);
  // Events during training are marked at the step then in progress; all
  // are listed.
  EXPECT_NE(html.find("class=\"event\" data-step=\"13\""), std::string::npos);
  EXPECT_NE(html.find("class=\"event\" data-step=\"20\""), std::string::npos);
  size_t marks = 0;
  for (size_t at = html.find("<path class=\"event\""); at != std::string::npos;
       at = html.find("<path class=\"event\"", at + 1)) {
    ++marks;
  }
  EXPECT_EQ(marks, 2u);
  size_t rows = 0;
  for (size_t at = html.find("<tr class=\"event\">"); at != std::string::npos;
       at = html.find("<tr class=\"event\">", at + 1)) {
    ++rows;
  }
  EXPECT_EQ(rows, 3u);
  EXPECT_NE(html.find("missed its &lt;lease&gt;"), std::string::npos);
}

TEST(RunReportTest, CorruptLinesAreReportedAndSkipped) {
  std::string text = StepsText(5);
  text.insert(0, "{\"step\": \"zero\"}\n");
  text += "{\"step\": 5, \"loss\": 4.7";  // torn last line
  std::vector<std::string> warnings;
  const std::vector<StepRow> steps = ParseSteps(
      text, [&](const std::string& w) { warnings.push_back(w); });
  EXPECT_EQ(steps.size(), 5u);
  ASSERT_EQ(warnings.size(), 2u);
  EXPECT_NE(warnings[0].find("steps.jsonl:1:"), std::string::npos);
  EXPECT_NE(warnings[1].find("steps.jsonl:7:"), std::string::npos);
  std::vector<std::string> event_warnings;
  const std::vector<RunEvent> events = ParseEvents(
      "{\"time\": 1, \"event\": \"x\"}\nnot json\n",
      [&](const std::string& w) { event_warnings.push_back(w); });
  EXPECT_EQ(events.size(), 1u);
  ASSERT_EQ(event_warnings.size(), 1u);
  EXPECT_NE(event_warnings[0].find("events.jsonl:2:"), std::string::npos);
  const std::string html = RenderRunReport(steps, {}, "", "");
  EXPECT_EQ(Points(html, "loss", "train"), 5);
  EXPECT_NE(html.find("missing (no job.textproto)"), std::string::npos);
}

TEST(RunReportTest, LogScaleWhenTheLossSpansADecade) {
  std::vector<ChartSeries> s = {{"train", "#000", {{0, 100}, {1, 10}, {2, 1}}}};
  const std::string log = SvgLineChart("c", "t", s, /*log_y=*/true);
  EXPECT_NE(log.find("(log scale)"), std::string::npos);
  // Evenly spaced on a log axis: the middle point is halfway.
  std::smatch m;
  const std::regex re("d=\"M[0-9.]+ ([0-9.]+) L[0-9.]+ ([0-9.]+) L[0-9.]+ ([0-9.]+) \"");
  ASSERT_TRUE(std::regex_search(log, m, re)) << log;
  EXPECT_NEAR(std::stod(m[2]) - std::stod(m[1]), std::stod(m[3]) - std::stod(m[2]),
              0.2);
  EXPECT_NE(SvgLineChart("e", "empty", {}, false).find("no data"),
            std::string::npos);
}

TEST(RunReportTest, WritesTheReportOfARunDirectory) {
  const std::string dir = std::string(std::getenv("TEST_TMPDIR")) + "/run";
  fs::create_directories(dir);
  std::ofstream(dir + "/steps.jsonl") << StepsText(12);
  std::ofstream(dir + "/sample.txt") << "Once";
  ASSERT_TRUE(WriteRunReport(dir, nullptr).ok());
  std::ifstream f(dir + "/report.html");
  std::stringstream html;
  html << f.rdbuf();
  EXPECT_EQ(Points(html.str(), "loss", "train"), 12);
  EXPECT_NE(html.str().find("<pre id=\"sample\">Once</pre>"), std::string::npos);
  EXPECT_FALSE(fs::exists(dir + "/report.html.tmp"));
  EXPECT_FALSE(WriteRunReport("/nonexistent/run", nullptr).ok());
}

}  // namespace
}  // namespace lmps
