// Prometheus metrics for the lmps daemons.
//
// A Metrics object owns one prometheus::Registry and, when given a listen
// address, an HttpServer (http_server.h) that serves the registry's text
// exposition at http://<listen_address>/metrics, and any further pages a
// daemon adds (AddPage; the scheduler's /status). Every metric created through it carries
// the constant labels node="<node_id>" and daemon="<daemon>", so a scrape of
// many daemons needs no relabelling to tell them apart.
//
//   auto metrics = Metrics::Create({.listen_address = "0.0.0.0:9090",
//                                   .daemon = "server", .node_id = "server-0"});
//   if (!metrics.ok()) return metrics.status();
//   auto loss = (*metrics)->Gauge("lmps_loss", "Training loss of the last step.");
//   if (!loss.ok()) return loss.status();
//   (*loss)->Set(2.1);
//
// Names follow the Prometheus conventions: counters end in `_total`, units are
// base units spelled out as suffixes (`_seconds`, `_bytes`). Metric handles
// (prometheus::Counter/Gauge/Histogram pointers) stay valid for the life of
// the Metrics object; asking again for the same name and labels returns the
// same handle. Invalid names, the reserved labels `node`/`daemon`, or a name
// already registered with another type are InvalidArgument errors, never
// exceptions or aborts. A metric about another node (the scheduler's
// heartbeat age per node, say) names it with the label `peer`, since `node`
// is always the reporting process.
//
// RpcMetrics records per-method RPC counts by status code, payload bytes in
// and out, and a latency histogram:
//   lmps_rpc_total{method,code}, lmps_rpc_received_bytes_total{method},
//   lmps_rpc_sent_bytes_total{method}, lmps_rpc_duration_seconds{method}.
//
// Thread-safety: every method of Metrics and RpcMetrics is thread-safe, and
// so are the prometheus metric handles they return. The Metrics object must
// outlive every RpcMetrics and handle created from it.
#ifndef LMPS_COMMON_RPC_METRICS_H_
#define LMPS_COMMON_RPC_METRICS_H_

#include <array>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/container/node_hash_map.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "common/rpc/http_server.h"
#include "prometheus/counter.h"
#include "prometheus/family.h"
#include "prometheus/gauge.h"
#include "prometheus/histogram.h"
#include "prometheus/labels.h"
#include "prometheus/registry.h"

namespace lmps {

struct MetricsOptions {
  // "host:port" to serve /metrics on, e.g. "0.0.0.0:9090". Port 0 binds a
  // free port (see Metrics::port()). Empty or "0": no HTTP endpoint; the
  // registry is still usable and Serialize() still works.
  std::string listen_address;
  // Which daemon this is: "scheduler", "server" or "worker" (any non-empty
  // label value is accepted). Becomes the constant label `daemon`.
  std::string daemon;
  // This node's name, e.g. "server-0" or a pod name. Becomes the constant
  // label `node`. Must not be empty.
  std::string node_id;
};

// Bucket upper bounds for latencies in seconds: 0.5 ms ... 120 s.
std::vector<double> LatencyBucketsSeconds();
// `count` bounds start, start*factor, start*factor^2, ...
std::vector<double> ExponentialBuckets(double start, double factor, int count);

class Metrics {
 public:
  // Creates the registry and, if `options.listen_address` names one, starts
  // the HTTP server. Fails with InvalidArgument for empty daemon/node_id or
  // a malformed address, and Unavailable if the address cannot be bound.
  static absl::StatusOr<std::unique_ptr<Metrics>> Create(
      const MetricsOptions& options);

  // Stops the HTTP endpoint (in milliseconds for IPv4 listen addresses;
  // up to civetweb's 2 s poll quantum for others).
  ~Metrics();
  Metrics(const Metrics&) = delete;
  Metrics& operator=(const Metrics&) = delete;

  // Metric families: the Family handle for `name`, registered on first use
  // with the constant labels node/daemon. Use family->Add(labels) for one
  // time series (labels must not repeat node/daemon: prometheus-cpp throws).
  absl::StatusOr<prometheus::Family<prometheus::Counter>*> CounterFamily(
      const std::string& name, const std::string& help);
  absl::StatusOr<prometheus::Family<prometheus::Gauge>*> GaugeFamily(
      const std::string& name, const std::string& help);
  absl::StatusOr<prometheus::Family<prometheus::Histogram>*> HistogramFamily(
      const std::string& name, const std::string& help);

  // One time series: the family's metric with `labels` (validated here).
  absl::StatusOr<prometheus::Counter*> Counter(
      const std::string& name, const std::string& help,
      const prometheus::Labels& labels = {});
  absl::StatusOr<prometheus::Gauge*> Gauge(
      const std::string& name, const std::string& help,
      const prometheus::Labels& labels = {});
  // `buckets`: sorted upper bounds (+Inf is implicit). Only used when the
  // series is first created.
  absl::StatusOr<prometheus::Histogram*> Histogram(
      const std::string& name, const std::string& help,
      const std::vector<double>& buckets,
      const prometheus::Labels& labels = {});

  // The registry's text exposition format (what GET /metrics returns).
  std::string Serialize() const;

  // Serves GET `path` on the metrics port with `handler` (see
  // http_server.h; the handler must be thread-safe and whatever it uses
  // must outlive this object). FailedPrecondition without an HTTP endpoint;
  // InvalidArgument for "/metrics" itself or a path not starting with '/'.
  absl::Status AddPage(const std::string& path, HttpHandler handler);

  // Stops the HTTP endpoint now, waiting for requests in progress (the
  // destructor does it otherwise): call it before destroying what pages
  // use. Metric handles stay valid.
  void StopServing();

  // The port the HTTP server is bound to (the actual one when asked for port 0),
  // or 0 when there is no HTTP endpoint.
  int port() const { return port_; }
  const std::string& daemon() const { return options_.daemon; }
  const std::string& node_id() const { return options_.node_id; }
  // For registering further collectables (e.g. with another exposer).
  std::shared_ptr<prometheus::Registry> registry() const { return registry_; }

 private:
  explicit Metrics(MetricsOptions options);

  template <typename T>
  absl::StatusOr<prometheus::Family<T>*> GetFamily(const std::string& name,
                                                   const std::string& help);
  absl::Status CheckLabels(const prometheus::Labels& labels) const;

  const MetricsOptions options_;
  const prometheus::Labels constant_labels_;
  std::shared_ptr<prometheus::Registry> registry_;
  // Declared after registry_ so it stops serving before the registry goes.
  std::unique_ptr<HttpServer> http_;
  int port_ = 0;
};

// Per-method RPC metrics, for gRPC servers and clients alike. `method` is
// the short RPC name ("Pull", "Push", "Register", ...); `code` is the gRPC
// status code (absl::StatusCode has the same values:
// static_cast<absl::StatusCode>(grpc_status.error_code())).
class RpcMetrics {
 public:
  // Registers the four lmps_rpc_* families in `metrics` (not owned; must
  // outlive this object).
  static absl::StatusOr<std::unique_ptr<RpcMetrics>> Create(Metrics* metrics);

  // Records one finished RPC: increments lmps_rpc_total{method,code}, adds
  // the payload bytes, and observes `duration` in the latency histogram.
  void Record(absl::string_view method, absl::StatusCode code,
              int64_t received_bytes, int64_t sent_bytes,
              absl::Duration duration);

  // Records an RPC when it goes out of scope; the clock starts at
  // construction.
  //   RpcMetrics::Scope rpc(rpc_metrics, "Pull");
  //   ... rpc.AddSent(n); rpc.set_code(status.error_code()) ...
  class Scope {
   public:
    Scope(RpcMetrics* metrics, absl::string_view method);  // null: no-op
    ~Scope();
    Scope(const Scope&) = delete;
    Scope& operator=(const Scope&) = delete;

    void AddReceived(int64_t bytes) { received_ += bytes; }
    void AddSent(int64_t bytes) { sent_ += bytes; }
    void set_code(absl::StatusCode code) { code_ = code; }
    void set_code(int grpc_code) { code_ = static_cast<absl::StatusCode>(grpc_code); }

   private:
    RpcMetrics* const metrics_;
    const std::string method_;
    const absl::Time start_;
    absl::StatusCode code_ = absl::StatusCode::kOk;
    int64_t received_ = 0;
    int64_t sent_ = 0;
  };

 private:
  // gRPC status codes are 0..16.
  static constexpr int kNumCodes = 17;
  struct Method {
    prometheus::Counter* received = nullptr;
    prometheus::Counter* sent = nullptr;
    prometheus::Histogram* duration = nullptr;
    std::array<prometheus::Counter*, kNumCodes> by_code{};
  };

  RpcMetrics() = default;
  Method* GetMethodLocked(absl::string_view method)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  prometheus::Family<prometheus::Counter>* total_ = nullptr;
  prometheus::Family<prometheus::Counter>* received_ = nullptr;
  prometheus::Family<prometheus::Counter>* sent_ = nullptr;
  prometheus::Family<prometheus::Histogram>* duration_ = nullptr;
  std::vector<double> buckets_;

  absl::Mutex mu_;
  absl::node_hash_map<std::string, Method> methods_ ABSL_GUARDED_BY(mu_);
};

}  // namespace lmps

#endif  // LMPS_COMMON_RPC_METRICS_H_
