#include "common/rpc/metrics.h"

#include <algorithm>
#include <exception>
#include <utility>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "prometheus/check_names.h"
#include "prometheus/text_serializer.h"

namespace lmps {
namespace {

constexpr char kNodeLabel[] = "node";
constexpr char kDaemonLabel[] = "daemon";

template <typename T>
prometheus::detail::Builder<T> Build();
template <>
prometheus::detail::Builder<prometheus::Counter> Build() {
  return prometheus::BuildCounter();
}
template <>
prometheus::detail::Builder<prometheus::Gauge> Build() {
  return prometheus::BuildGauge();
}
template <>
prometheus::detail::Builder<prometheus::Histogram> Build() {
  return prometheus::BuildHistogram();
}

}  // namespace

std::vector<double> LatencyBucketsSeconds() {
  return {0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
          0.5,    1,     2.5,    5,     10,   30,    60,   120};
}

std::vector<double> ExponentialBuckets(double start, double factor, int count) {
  std::vector<double> buckets;
  buckets.reserve(std::max(count, 0));
  double bound = start;
  for (int i = 0; i < count; ++i) {
    buckets.push_back(bound);
    bound *= factor;
  }
  return buckets;
}

Metrics::Metrics(MetricsOptions options)
    : options_(std::move(options)),
      constant_labels_{{kNodeLabel, options_.node_id},
                       {kDaemonLabel, options_.daemon}},
      registry_(std::make_shared<prometheus::Registry>()) {}

Metrics::~Metrics() = default;

absl::StatusOr<std::unique_ptr<Metrics>> Metrics::Create(
    const MetricsOptions& options) {
  if (options.daemon.empty()) {
    return absl::InvalidArgumentError("metrics: daemon must not be empty");
  }
  if (options.node_id.empty()) {
    return absl::InvalidArgumentError("metrics: node_id must not be empty");
  }
  std::unique_ptr<Metrics> metrics(new Metrics(options));
  const std::string& address = options.listen_address;
  if (address.empty() || address == "0") return metrics;

  absl::StatusOr<std::unique_ptr<HttpServer>> http =
      HttpServer::Create(address);
  if (!http.ok()) {
    return absl::Status(http.status().code(),
                        absl::StrCat("metrics: cannot serve /metrics on ",
                                     address, ": ", http.status().message()));
  }
  metrics->http_ = *std::move(http);
  metrics->port_ = metrics->http_->port();
  Metrics* m = metrics.get();
  (void)metrics->http_->Handle("/metrics", [m](const HttpRequest&) {
    return HttpResponse{
        .content_type = "text/plain; version=0.0.4; charset=utf-8",
        .body = m->Serialize()};
  });
  return metrics;
}

void Metrics::StopServing() { http_.reset(); }

absl::Status Metrics::AddPage(const std::string& path, HttpHandler handler) {
  if (http_ == nullptr) {
    return absl::FailedPreconditionError(absl::StrCat(
        "metrics: no HTTP endpoint (no listen address) to serve ", path));
  }
  if (path == "/metrics") {
    return absl::InvalidArgumentError("metrics: /metrics is the registry's");
  }
  return http_->Handle(path, std::move(handler));
}

template <typename T>
absl::StatusOr<prometheus::Family<T>*> Metrics::GetFamily(
    const std::string& name, const std::string& help) {
  if (!prometheus::CheckMetricName(name)) {
    return absl::InvalidArgumentError(
        absl::StrCat("metrics: invalid metric name \"", name, "\""));
  }
  try {
    return &Build<T>().Name(name).Help(help).Labels(constant_labels_).Register(
        *registry_);
  } catch (const std::exception& e) {
    // Another type under the same name, typically.
    return absl::InvalidArgumentError(
        absl::StrCat("metrics: cannot register \"", name, "\": ", e.what()));
  }
}

absl::StatusOr<prometheus::Family<prometheus::Counter>*> Metrics::CounterFamily(
    const std::string& name, const std::string& help) {
  return GetFamily<prometheus::Counter>(name, help);
}

absl::StatusOr<prometheus::Family<prometheus::Gauge>*> Metrics::GaugeFamily(
    const std::string& name, const std::string& help) {
  return GetFamily<prometheus::Gauge>(name, help);
}

absl::StatusOr<prometheus::Family<prometheus::Histogram>*>
Metrics::HistogramFamily(const std::string& name, const std::string& help) {
  return GetFamily<prometheus::Histogram>(name, help);
}

absl::Status Metrics::CheckLabels(const prometheus::Labels& labels) const {
  for (const auto& [label, value] : labels) {
    if (!prometheus::CheckLabelName(label)) {
      return absl::InvalidArgumentError(
          absl::StrCat("metrics: invalid label name \"", label, "\""));
    }
    if (constant_labels_.count(label) > 0) {
      return absl::InvalidArgumentError(absl::StrCat(
          "metrics: label \"", label, "\" is reserved (set on every metric)"));
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<prometheus::Counter*> Metrics::Counter(
    const std::string& name, const std::string& help,
    const prometheus::Labels& labels) {
  absl::Status valid = CheckLabels(labels);
  if (!valid.ok()) return valid;
  auto family = CounterFamily(name, help);
  if (!family.ok()) return family.status();
  try {
    return &(*family)->Add(labels);
  } catch (const std::exception& e) {
    return absl::InvalidArgumentError(
        absl::StrCat("metrics: ", name, ": ", e.what()));
  }
}

absl::StatusOr<prometheus::Gauge*> Metrics::Gauge(
    const std::string& name, const std::string& help,
    const prometheus::Labels& labels) {
  absl::Status valid = CheckLabels(labels);
  if (!valid.ok()) return valid;
  auto family = GaugeFamily(name, help);
  if (!family.ok()) return family.status();
  try {
    return &(*family)->Add(labels);
  } catch (const std::exception& e) {
    return absl::InvalidArgumentError(
        absl::StrCat("metrics: ", name, ": ", e.what()));
  }
}

absl::StatusOr<prometheus::Histogram*> Metrics::Histogram(
    const std::string& name, const std::string& help,
    const std::vector<double>& buckets, const prometheus::Labels& labels) {
  absl::Status valid = CheckLabels(labels);
  if (!valid.ok()) return valid;
  if (labels.count("le") > 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("metrics: ", name, ": label \"le\" is reserved"));
  }
  if (!std::is_sorted(buckets.begin(), buckets.end()) ||
      std::adjacent_find(buckets.begin(), buckets.end()) != buckets.end()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "metrics: ", name, ": bucket bounds must be strictly increasing"));
  }
  auto family = HistogramFamily(name, help);
  if (!family.ok()) return family.status();
  try {
    return &(*family)->Add(labels, buckets);
  } catch (const std::exception& e) {
    return absl::InvalidArgumentError(
        absl::StrCat("metrics: ", name, ": ", e.what()));
  }
}

std::string Metrics::Serialize() const {
  return prometheus::TextSerializer().Serialize(registry_->Collect());
}

// --- RpcMetrics --------------------------------------------------------------

absl::StatusOr<std::unique_ptr<RpcMetrics>> RpcMetrics::Create(
    Metrics* metrics) {
  if (metrics == nullptr) {
    return absl::InvalidArgumentError("RpcMetrics: metrics is null");
  }
  std::unique_ptr<RpcMetrics> rpc(new RpcMetrics());
  auto total = metrics->CounterFamily(
      "lmps_rpc_total", "RPCs finished, by method and gRPC status code.");
  if (!total.ok()) return total.status();
  auto received = metrics->CounterFamily(
      "lmps_rpc_received_bytes_total",
      "Payload bytes received in RPCs (requests on a server, responses on a "
      "client), by method.");
  if (!received.ok()) return received.status();
  auto sent = metrics->CounterFamily(
      "lmps_rpc_sent_bytes_total",
      "Payload bytes sent in RPCs (responses on a server, requests on a "
      "client), by method.");
  if (!sent.ok()) return sent.status();
  auto duration = metrics->HistogramFamily(
      "lmps_rpc_duration_seconds",
      "RPC latency from start to the final status, by method.");
  if (!duration.ok()) return duration.status();
  rpc->total_ = *total;
  rpc->received_ = *received;
  rpc->sent_ = *sent;
  rpc->duration_ = *duration;
  rpc->buckets_ = LatencyBucketsSeconds();
  return rpc;
}

RpcMetrics::Method* RpcMetrics::GetMethodLocked(absl::string_view method) {
  auto [it, inserted] = methods_.try_emplace(std::string(method));
  Method& m = it->second;
  if (inserted) {
    const prometheus::Labels labels{{"method", it->first}};
    m.received = &received_->Add(labels);
    m.sent = &sent_->Add(labels);
    m.duration = &duration_->Add(labels, buckets_);
  }
  return &m;
}

void RpcMetrics::Record(absl::string_view method, absl::StatusCode code,
                        int64_t received_bytes, int64_t sent_bytes,
                        absl::Duration duration) {
  int index = static_cast<int>(code);
  if (index < 0 || index >= kNumCodes) {
    index = static_cast<int>(absl::StatusCode::kUnknown);
  }
  Method* m;
  prometheus::Counter* by_code;
  {
    absl::MutexLock lock(&mu_);
    m = GetMethodLocked(method);
    by_code = m->by_code[index];
    if (by_code == nullptr) {
      by_code = &total_->Add(
          {{"method", std::string(method)},
           {"code", absl::StatusCodeToString(
                        static_cast<absl::StatusCode>(index))}});
      m->by_code[index] = by_code;
    }
  }
  by_code->Increment();
  if (received_bytes > 0) m->received->Increment(received_bytes);
  if (sent_bytes > 0) m->sent->Increment(sent_bytes);
  m->duration->Observe(std::max(0.0, absl::ToDoubleSeconds(duration)));
}

RpcMetrics::Scope::Scope(RpcMetrics* metrics, absl::string_view method)
    : metrics_(metrics), method_(method), start_(absl::Now()) {}

RpcMetrics::Scope::~Scope() {
  if (metrics_ == nullptr) return;
  metrics_->Record(method_, code_, received_, sent_, absl::Now() - start_);
}

}  // namespace lmps
