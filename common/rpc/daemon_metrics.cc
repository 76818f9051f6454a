#include "common/rpc/daemon_metrics.h"

#include <unistd.h>

#include "absl/strings/str_cat.h"

namespace lmps {

absl::StatusOr<DaemonMetrics> StartDaemonMetrics(const std::string& listen,
                                                 const std::string& daemon) {
  char host[256] = {0};
  gethostname(host, sizeof(host) - 1);
  MetricsOptions options;
  options.listen_address = listen;
  options.daemon = daemon;
  options.node_id = absl::StrCat(host, ":", getpid());
  DaemonMetrics out;
  absl::StatusOr<std::unique_ptr<Metrics>> metrics = Metrics::Create(options);
  if (!metrics.ok()) {
    return absl::Status(metrics.status().code(),
                        absl::StrCat("--metrics_listen=", listen, ": ",
                                     metrics.status().message()));
  }
  out.metrics = std::move(*metrics);
  absl::StatusOr<std::unique_ptr<RpcMetrics>> rpc =
      RpcMetrics::Create(out.metrics.get());
  if (!rpc.ok()) return rpc.status();
  out.rpc = std::move(*rpc);
  return out;
}

void SetGauge(Metrics* metrics, const std::string& name,
              const std::string& help, double value,
              const prometheus::Labels& labels) {
  if (metrics == nullptr) return;
  if (auto g = metrics->Gauge(name, help, labels); g.ok()) (*g)->Set(value);
}

}  // namespace lmps
