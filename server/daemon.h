// The parameter-server daemon's life cycle, as run by lmps_server:
//
//   1. start the gRPC server (ParameterServer + health NOT_SERVING +
//      reflection) on `listen`; the address others use is
//      advertise_host:<bound port>;
//   2. Register with the scheduler (role SERVER, requested shard, and for a
//      requested shard the steps of its complete checkpoints under
//      checkpoint_dir plus the partition version stored in them), retrying
//      with backoff while the scheduler is not up (every call to the
//      scheduler goes through SchedulerClient, common/clients/scheduler_client.h);
//   3. GetAssignment (waits for the job to assemble), retrying while the
//      scheduler is unavailable; both steps give up after assemble_timeout
//      with an error naming the scheduler address;
//   4. create the ParameterShard (start_step from the assignment), set
//      health SERVING;
//   5. heartbeat every lease/3 with the shard's version until the job is
//      FINISHED (returns OK; every checkpoint has been written since Apply
//      writes it synchronously) or FAILED (error), or the scheduler has been
//      unreachable for longer than the lease (error), or `stop` fires
//      (SIGTERM/SIGINT; returns OK after a clean shutdown).
//
// Shard replication (layout.shard_backups = 1, server/replication.h): the
// shard is served through a ReplicatedShard started from the assignment
// (role, epoch, snapshot needed). Each heartbeat carries what the
// ReplicatedShard reports (FillHeartbeat: role, epoch, a lost backup) and
// its answer is handed back to it (FollowHeartbeat: promote, detach, attach
// a new backup, fenced). A node fenced off stops (AbortedError, not
// reported to the scheduler) so that it is restarted -- and then becomes
// the new backup.
//
// Errors after registration are reported to the scheduler in a heartbeat
// (HeartbeatRequest.error) before returning. Every line is logged with a
// "[server-N]" prefix (N: the shard, once known).
//
// Thread-safety: RunParameterServer runs on the caller's thread; StopSignal
// is thread-safe.
#ifndef LMPS_SERVER_DAEMON_H_
#define LMPS_SERVER_DAEMON_H_

#include <functional>
#include <string>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "common/rpc/metrics.h"
#include "common/rpc/security.h"
#include "common/rpc/stop_signal.h"

namespace lmps {

struct DaemonOptions {
  std::string scheduler;             // host:port (required)
  std::string listen = "0.0.0.0:0";  // port 0: a free port
  std::string advertise_host = "127.0.0.1";
  int shard = -1;              // requested shard; -1: any
  // layout.shard_backups = 1: ask for the backup slot of `shard` while the
  // job assembles (in a running job the scheduler decides).
  bool backup = false;
  std::string checkpoint_dir;  // empty: no checkpoints
  std::string init_from;       // safetensors initial weights
  absl::Duration wait_timeout = absl::Seconds(60);
  absl::Duration assemble_timeout = absl::Seconds(120);
  // Threads of the shard's gradient norm and optimizer step
  // (ShardOptions::threads).
  int threads = 1;
  // Map the shared-memory regions of workers on this host
  // (ServiceOptions::shared_memory).
  bool shared_memory = true;
  // How long the shard serves on while the scheduler is unreachable (it may
  // be restarting: the shard then rejoins it) before giving up.
  absl::Duration scheduler_grace = absl::Seconds(60);
  // Transport security of the server and of the channel to the scheduler
  // (TLS, client certificates, the shared token); default: plaintext.
  Security security;
  // Prometheus metrics (not owned; may be null): gauges of the shard's
  // state, lmps_unauthenticated_total, and every RPC served or made.
  Metrics* metrics = nullptr;
  RpcMetrics* rpc_metrics = nullptr;
  // Receives every log line, prefix included; empty: stderr.
  std::function<void(const std::string&)> log;
  // Tests: runs on the thread creating the shard, before it does (e.g. to
  // make creation slow).
  std::function<void()> before_create_shard;
};

absl::Status RunParameterServer(const DaemonOptions& options, StopSignal* stop);

}  // namespace lmps

#endif  // LMPS_SERVER_DAEMON_H_
