// The metrics every lmps daemon sets up from its --metrics_listen flag: a
// Metrics registry (served at http://<listen>/metrics when listen is not
// empty) and RpcMetrics for the gRPC interceptors. The constant `node`
// label is "<hostname>:<pid>" (the pod name in Kubernetes); the scheduler's
// node id appears as `lmps_node_info{node_id=...}` once known.
//
// Thread-safety: as Metrics.
#ifndef LMPS_COMMON_RPC_DAEMON_METRICS_H_
#define LMPS_COMMON_RPC_DAEMON_METRICS_H_

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "common/rpc/metrics.h"

namespace lmps {

struct DaemonMetrics {
  std::unique_ptr<Metrics> metrics;
  std::unique_ptr<RpcMetrics> rpc;
};

absl::StatusOr<DaemonMetrics> StartDaemonMetrics(const std::string& listen,
                                                 const std::string& daemon);

// Sets gauge `name` (created on first use) to `value`; errors are ignored
// (a metric must never stop a daemon).
void SetGauge(Metrics* metrics, const std::string& name,
              const std::string& help, double value,
              const prometheus::Labels& labels = {});

}  // namespace lmps

#endif  // LMPS_COMMON_RPC_DAEMON_METRICS_H_
