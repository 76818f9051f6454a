#include "common/rpc/metrics.h"

#include <map>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "absl/strings/string_view.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "common/rpc/http_test_util.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace lmps {
namespace {

using ::testing::HasSubstr;

// Parses `name{k="v",...} value` lines of a text exposition and returns the
// value of the sample named `name` whose labels include all of `labels`.
std::optional<double> Sample(const std::string& text, absl::string_view name,
                             const std::map<std::string, std::string>& labels) {
  for (absl::string_view line : absl::StrSplit(text, '\n')) {
    if (line.empty() || line[0] == '#') continue;
    const size_t brace = line.find('{');
    const size_t space = line.rfind(' ');
    if (space == absl::string_view::npos) continue;
    const absl::string_view metric =
        line.substr(0, brace == absl::string_view::npos ? space : brace);
    if (metric != name) continue;
    std::map<std::string, std::string> got;
    if (brace != absl::string_view::npos) {
      const size_t close = line.find('}', brace);
      for (absl::string_view pair : absl::StrSplit(
               line.substr(brace + 1, close - brace - 1), ',',
               absl::SkipEmpty())) {
        const size_t eq = pair.find('=');
        got[std::string(pair.substr(0, eq))] =
            std::string(pair.substr(eq + 2, pair.size() - eq - 3));
      }
    }
    bool match = true;
    for (const auto& [k, v] : labels) {
      auto it = got.find(k);
      if (it == got.end() || it->second != v) match = false;
    }
    if (!match) continue;
    double value = 0;
    if (!absl::SimpleAtod(line.substr(space + 1), &value)) return std::nullopt;
    return value;
  }
  return std::nullopt;
}

std::unique_ptr<Metrics> MakeMetrics(std::string listen = "") {
  auto metrics = Metrics::Create({.listen_address = std::move(listen),
                                  .daemon = "server",
                                  .node_id = "server-0"});
  EXPECT_TRUE(metrics.ok()) << metrics.status();
  return metrics.ok() ? std::move(*metrics) : nullptr;
}

TEST(MetricsTest, CreateValidatesOptions) {
  EXPECT_EQ(Metrics::Create({.daemon = "", .node_id = "x"}).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(Metrics::Create({.daemon = "worker", .node_id = ""}).status().code(),
            absl::StatusCode::kInvalidArgument);
  for (const char* bad : {"localhost:http", "127.0.0.1:70000", ":9090",
                          "127.0.0.1:", "127.0.0.1:-1"}) {
    auto m = Metrics::Create(
        {.listen_address = bad, .daemon = "worker", .node_id = "w"});
    EXPECT_EQ(m.status().code(), absl::StatusCode::kInvalidArgument) << bad;
  }
  // No endpoint: empty or "0".
  for (const char* none : {"", "0"}) {
    auto m = Metrics::Create(
        {.listen_address = none, .daemon = "worker", .node_id = "w"});
    ASSERT_TRUE(m.ok()) << m.status();
    EXPECT_EQ((*m)->port(), 0);
  }
}

TEST(MetricsTest, TypedHelpersCarryConstantLabels) {
  auto metrics = MakeMetrics();
  ASSERT_NE(metrics, nullptr);
  auto rejected = metrics->Counter("lmps_rejected_pushes_total",
                                   "Pushes rejected.", {{"reason", "nan"}});
  ASSERT_TRUE(rejected.ok()) << rejected.status();
  (*rejected)->Increment();
  (*rejected)->Increment(2);
  auto loss = metrics->Gauge("lmps_loss", "Training loss.");
  ASSERT_TRUE(loss.ok());
  (*loss)->Set(2.5);
  auto step = metrics->Histogram("lmps_step_seconds", "Step time.",
                                 {0.1, 1, 10});
  ASSERT_TRUE(step.ok());
  (*step)->Observe(0.5);
  (*step)->Observe(20);

  const std::string text = metrics->Serialize();
  EXPECT_THAT(text, HasSubstr("# HELP lmps_loss Training loss."));
  EXPECT_THAT(text, HasSubstr("# TYPE lmps_rejected_pushes_total counter"));
  EXPECT_THAT(text, HasSubstr("# TYPE lmps_step_seconds histogram"));
  const std::map<std::string, std::string> node = {{"node", "server-0"},
                                                   {"daemon", "server"}};
  EXPECT_EQ(Sample(text, "lmps_loss", node), 2.5);
  auto labels = node;
  labels["reason"] = "nan";
  EXPECT_EQ(Sample(text, "lmps_rejected_pushes_total", labels), 3);
  EXPECT_EQ(Sample(text, "lmps_step_seconds_count", node), 2);
  EXPECT_EQ(Sample(text, "lmps_step_seconds_sum", node), 20.5);
  labels = node;
  labels["le"] = "0.1";
  EXPECT_EQ(Sample(text, "lmps_step_seconds_bucket", labels), 0);
  labels["le"] = "1";
  EXPECT_EQ(Sample(text, "lmps_step_seconds_bucket", labels), 1);
  labels["le"] = "+Inf";
  EXPECT_EQ(Sample(text, "lmps_step_seconds_bucket", labels), 2);
  // Every sample has both constant labels.
  for (absl::string_view line : absl::StrSplit(text, '\n', absl::SkipEmpty())) {
    if (line[0] == '#') continue;
    EXPECT_THAT(line, HasSubstr("node=\"server-0\"")) << line;
    EXPECT_THAT(line, HasSubstr("daemon=\"server\"")) << line;
  }
}

TEST(MetricsTest, SameNameAndLabelsGiveTheSameHandle) {
  auto metrics = MakeMetrics();
  ASSERT_NE(metrics, nullptr);
  auto a = metrics->Gauge("lmps_nodes_alive", "Live nodes.", {{"role", "worker"}});
  auto b = metrics->Gauge("lmps_nodes_alive", "Live nodes.", {{"role", "worker"}});
  auto c = metrics->Gauge("lmps_nodes_alive", "Live nodes.", {{"role", "server"}});
  ASSERT_TRUE(a.ok() && b.ok() && c.ok());
  EXPECT_EQ(*a, *b);
  EXPECT_NE(*a, *c);
  auto family = metrics->GaugeFamily("lmps_nodes_alive", "Live nodes.");
  ASSERT_TRUE(family.ok());
  EXPECT_EQ(&(*family)->Add({{"role", "worker"}}), *a);
}

TEST(MetricsTest, BadNamesAndLabelsAreErrorsNotExceptions) {
  auto metrics = MakeMetrics();
  ASSERT_NE(metrics, nullptr);
  EXPECT_EQ(metrics->Counter("bad-name", "x").status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(metrics->Counter("ok_total", "x", {{"node", "y"}}).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(metrics->Gauge("ok", "x", {{"daemon", "y"}}).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(metrics->Gauge("ok", "x", {{"1abc", "y"}}).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(metrics->Histogram("h_seconds", "x", {1, 0.5}).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(metrics->Histogram("h_seconds", "x", {1}, {{"le", "1"}})
                .status()
                .code(),
            absl::StatusCode::kInvalidArgument);
  ASSERT_TRUE(metrics->Counter("lmps_x_total", "x").ok());
  // The same name as another type.
  EXPECT_EQ(metrics->Gauge("lmps_x_total", "x").status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(MetricsTest, ExponentialBuckets) {
  EXPECT_EQ(ExponentialBuckets(1, 2, 4), (std::vector<double>{1, 2, 4, 8}));
  EXPECT_TRUE(ExponentialBuckets(1, 2, 0).empty());
  const std::vector<double> latency = LatencyBucketsSeconds();
  EXPECT_TRUE(std::is_sorted(latency.begin(), latency.end()));
  EXPECT_LE(latency.front(), 0.001);
  EXPECT_GE(latency.back(), 60);
}

TEST(RpcMetricsTest, RecordsCountsBytesAndLatency) {
  auto metrics = MakeMetrics();
  ASSERT_NE(metrics, nullptr);
  auto rpc = RpcMetrics::Create(metrics.get());
  ASSERT_TRUE(rpc.ok()) << rpc.status();
  (*rpc)->Record("Pull", absl::StatusCode::kOk, 100, 4096,
                 absl::Milliseconds(3));
  (*rpc)->Record("Pull", absl::StatusCode::kOk, 100, 4096,
                 absl::Milliseconds(7));
  (*rpc)->Record("Pull", absl::StatusCode::kDeadlineExceeded, 100, 0,
                 absl::Seconds(200));
  (*rpc)->Record("Push", absl::StatusCode::kInvalidArgument, 1000, 10,
                 absl::Microseconds(100));
  {
    RpcMetrics::Scope scope(rpc->get(), "Register");
    scope.AddReceived(5);
    scope.AddSent(6);
    scope.set_code(14);  // a grpc::StatusCode: UNAVAILABLE
  }
  { RpcMetrics::Scope noop(nullptr, "Nothing"); }
  // Out-of-range codes count as UNKNOWN.
  (*rpc)->Record("Push", static_cast<absl::StatusCode>(99), 0, 0,
                 absl::ZeroDuration());

  const std::string text = metrics->Serialize();
  EXPECT_EQ(Sample(text, "lmps_rpc_total", {{"method", "Pull"}, {"code", "OK"}}),
            2);
  EXPECT_EQ(Sample(text, "lmps_rpc_total",
                   {{"method", "Pull"}, {"code", "DEADLINE_EXCEEDED"}}),
            1);
  EXPECT_EQ(Sample(text, "lmps_rpc_total",
                   {{"method", "Push"}, {"code", "INVALID_ARGUMENT"}}),
            1);
  EXPECT_EQ(Sample(text, "lmps_rpc_total",
                   {{"method", "Push"}, {"code", "UNKNOWN"}}),
            1);
  EXPECT_EQ(Sample(text, "lmps_rpc_total",
                   {{"method", "Register"}, {"code", "UNAVAILABLE"},
                    {"node", "server-0"}, {"daemon", "server"}}),
            1);
  EXPECT_EQ(Sample(text, "lmps_rpc_received_bytes_total", {{"method", "Pull"}}),
            300);
  EXPECT_EQ(Sample(text, "lmps_rpc_sent_bytes_total", {{"method", "Pull"}}),
            8192);
  EXPECT_EQ(Sample(text, "lmps_rpc_received_bytes_total",
                   {{"method", "Register"}}),
            5);
  EXPECT_EQ(Sample(text, "lmps_rpc_duration_seconds_count", {{"method", "Pull"}}),
            3);
  EXPECT_EQ(Sample(text, "lmps_rpc_duration_seconds_bucket",
                   {{"method", "Pull"}, {"le", "0.005"}}),
            1);
  EXPECT_EQ(Sample(text, "lmps_rpc_duration_seconds_bucket",
                   {{"method", "Pull"}, {"le", "0.01"}}),
            2);
  EXPECT_EQ(Sample(text, "lmps_rpc_duration_seconds_bucket",
                   {{"method", "Pull"}, {"le", "+Inf"}}),
            3);
  EXPECT_EQ(Sample(text, "lmps_rpc_total", {{"method", "Nothing"}}),
            std::nullopt);
  // A second RpcMetrics on the same registry shares the families.
  auto again = RpcMetrics::Create(metrics.get());
  ASSERT_TRUE(again.ok());
  (*again)->Record("Pull", absl::StatusCode::kOk, 0, 0, absl::ZeroDuration());
  EXPECT_EQ(Sample(metrics->Serialize(), "lmps_rpc_total",
                   {{"method", "Pull"}, {"code", "OK"}}),
            3);
}

TEST(RpcMetricsTest, ConcurrentRecordsAreAllCounted) {
  auto metrics = MakeMetrics();
  ASSERT_NE(metrics, nullptr);
  auto rpc = RpcMetrics::Create(metrics.get());
  ASSERT_TRUE(rpc.ok());
  constexpr int kThreads = 8, kCalls = 2000;
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < kCalls; ++i) {
        (*rpc)->Record(t % 2 ? "Pull" : "Push", absl::StatusCode::kOk, 1, 2,
                       absl::Milliseconds(1));
      }
    });
  }
  for (auto& t : threads) t.join();
  const std::string text = metrics->Serialize();
  EXPECT_EQ(Sample(text, "lmps_rpc_total", {{"method", "Pull"}}),
            kThreads / 2 * kCalls);
  EXPECT_EQ(Sample(text, "lmps_rpc_sent_bytes_total", {{"method", "Push"}}),
            2.0 * kThreads / 2 * kCalls);
}

TEST(MetricsTest, ServesMetricsOverHttp) {
  auto metrics = MakeMetrics("127.0.0.1:0");
  ASSERT_NE(metrics, nullptr);
  ASSERT_GT(metrics->port(), 0);
  auto step = metrics->Gauge("lmps_step", "Last finished step.");
  ASSERT_TRUE(step.ok());
  (*step)->Set(42);

  const std::string response = HttpGet(metrics->port(), "/metrics");
  EXPECT_THAT(response, HasSubstr("200 OK"));
  EXPECT_THAT(response, HasSubstr("# TYPE lmps_step gauge"));
  const size_t body = response.find("\r\n\r\n");
  ASSERT_NE(body, std::string::npos);
  EXPECT_EQ(Sample(response.substr(body + 4), "lmps_step",
                   {{"node", "server-0"}, {"daemon", "server"}}),
            42);

  // The port is taken now: a second server on it fails cleanly.
  auto clash = Metrics::Create(
      {.listen_address = "127.0.0.1:" + std::to_string(metrics->port()),
       .daemon = "server",
       .node_id = "server-1"});
  EXPECT_EQ(clash.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_THAT(clash.status().message(), HasSubstr("127.0.0.1:"));

  // And the endpoint goes away with the object.
  const int port = metrics->port();
  const absl::Time start = absl::Now();
  metrics.reset();
  EXPECT_LT(absl::Now() - start, absl::Seconds(1));  // not civetweb's 2 s
  EXPECT_EQ(HttpGet(port, "/metrics"), "");
}

TEST(MetricsTest, ServesAddedPages) {
  EXPECT_EQ(MakeMetrics()->AddPage("/status", [](const HttpRequest&) {
    return HttpResponse{};
  }).code(), absl::StatusCode::kFailedPrecondition);
  auto metrics = MakeMetrics("127.0.0.1:0");
  ASSERT_NE(metrics, nullptr);
  EXPECT_EQ(metrics->AddPage("/metrics", [](const HttpRequest&) {
    return HttpResponse{};
  }).code(), absl::StatusCode::kInvalidArgument);
  ASSERT_TRUE(metrics->AddPage("/status", [](const HttpRequest&) {
    return HttpResponse{.body = "<p>running</p>"};
  }).ok());
  EXPECT_EQ(HttpBody(HttpGet(metrics->port(), "/status")), "<p>running</p>");
  EXPECT_THAT(HttpGet(metrics->port(), "/metrics"),
              HasSubstr("Content-Type: text/plain; version=0.0.4"));
}

}  // namespace
}  // namespace lmps
