// Test helper for tests/metrics_promtool_test.sh: fills a Metrics registry
// with every metric family the lmps daemons export (the names the Grafana
// dashboard and the docs rely on) and either prints the text exposition
// (--listen empty) or serves it over HTTP for --serve_s seconds, writing the
// bound port to --port_file.
#include <cstdio>
#include <fstream>
#include <string>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/status/status.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "common/rpc/metrics.h"

ABSL_FLAG(std::string, listen, "", "serve /metrics here (empty: print)");
ABSL_FLAG(std::string, port_file, "", "write the bound port here");
ABSL_FLAG(int, serve_s, 30, "how long to serve before exiting");
ABSL_FLAG(std::string, daemon, "server", "the daemon label");
ABSL_FLAG(std::string, node_id, "server-0", "the node label");

namespace lmps {
namespace {

absl::Status Fill(Metrics& m) {
  auto gauge = [&](const std::string& name, const std::string& help,
                   double value, const prometheus::Labels& labels = {}) {
    auto g = m.Gauge(name, help, labels);
    if (g.ok()) (*g)->Set(value);
    return g.status();
  };
  for (absl::Status s : {
           gauge("lmps_step", "Last finished optimizer step.", 120),
           gauge("lmps_loss", "Training loss of the last step.", 2.31),
           gauge("lmps_eval_loss", "Loss on the held-out data at the last "
                 "evaluation.", 2.45),
           gauge("lmps_tokens_per_second", "Training throughput in tokens "
                 "per second over the last step.", 5120),
           gauge("lmps_step_phase_seconds", "Time of the last step spent in "
                 "each phase.", 0.08, {{"phase", "compute"}}),
           gauge("lmps_step_phase_seconds", "", 0.01, {{"phase", "pull"}}),
           gauge("lmps_step_phase_seconds", "", 0.01, {{"phase", "push"}}),
           gauge("lmps_step_phase_seconds", "", 0.002, {{"phase", "sync"}}),
           gauge("lmps_grad_norm", "Global gradient L2 norm before "
                 "clipping.", 0.9),
           gauge("lmps_parameter_version", "Parameter version (updates "
                 "applied) held by this shard.", 120),
           gauge("lmps_server_memory_bytes", "Bytes of parameters, optimizer "
                 "state and gradient buffers held by this shard.", 3.2e6),
           gauge("lmps_nodes_alive", "Nodes with a live lease, by role.", 2,
                 {{"role", "worker"}}),
           gauge("lmps_nodes_alive", "", 2, {{"role", "server"}}),
           gauge("lmps_heartbeat_age_seconds", "Seconds since the last "
                 "heartbeat of each node.", 0.4, {{"peer", "worker-0"}}),
       }) {
    if (!s.ok()) return s;
  }
  auto rejected = m.Counter("lmps_rejected_pushes_total",
                            "Gradient pushes rejected, by reason.",
                            {{"reason", "non_finite"}});
  if (!rejected.ok()) return rejected.status();
  (*rejected)->Increment(3);

  auto rpc = RpcMetrics::Create(&m);
  if (!rpc.ok()) return rpc.status();
  (*rpc)->Record("Pull", absl::StatusCode::kOk, 64, 4 << 20,
                 absl::Milliseconds(12));
  (*rpc)->Record("Push", absl::StatusCode::kOk, 4 << 20, 16,
                 absl::Milliseconds(9));
  (*rpc)->Record("Push", absl::StatusCode::kInvalidArgument, 4 << 20, 0,
                 absl::Milliseconds(1));
  (*rpc)->Record("Heartbeat", absl::StatusCode::kOk, 20, 20,
                 absl::Microseconds(300));
  return absl::OkStatus();
}

int RunCommand() {
  auto metrics = Metrics::Create({.listen_address = absl::GetFlag(FLAGS_listen),
                                  .daemon = absl::GetFlag(FLAGS_daemon),
                                  .node_id = absl::GetFlag(FLAGS_node_id)});
  if (!metrics.ok()) {
    std::fprintf(stderr, "%s\n", metrics.status().ToString().c_str());
    return 1;
  }
  absl::Status filled = Fill(**metrics);
  if (!filled.ok()) {
    std::fprintf(stderr, "%s\n", filled.ToString().c_str());
    return 1;
  }
  if ((*metrics)->port() == 0) {
    std::fputs((*metrics)->Serialize().c_str(), stdout);
    return 0;
  }
  const std::string port_file = absl::GetFlag(FLAGS_port_file);
  if (!port_file.empty()) {
    const std::string tmp = port_file + ".tmp";
    std::ofstream(tmp) << (*metrics)->port() << "\n";
    std::rename(tmp.c_str(), port_file.c_str());
  }
  absl::SleepFor(absl::Seconds(absl::GetFlag(FLAGS_serve_s)));
  return 0;
}

}  // namespace
}  // namespace lmps

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  return lmps::RunCommand();
}
