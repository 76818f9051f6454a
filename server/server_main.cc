// lmps_server: one parameter-server shard of an lmps job. See
// server/daemon.h for the life cycle and docs/parameter-shard.md for the semantics.
//
//   lmps_server --scheduler=host:port [--listen=0.0.0.0:0]
//               [--advertise_host=127.0.0.1] [--shard=-1]
//               [--checkpoint_dir=DIR] [--init_from=model.safetensors]
//               [--wait_timeout_s=60] [--assemble_timeout_s=120]
//               [--threads=0] [--shared_memory=true]
//               [--tls_ca=ca.crt --tls_cert=server.crt --tls_key=server.key]
//               [--auth_token_file=token]
//
// Transport security (common/rpc/security.h): the TLS flags secure both the
// served port and the channel to the scheduler; the certificate must allow
// both serverAuth and clientAuth (scripts/make_test_certs.sh's server.crt
// does).
//
// Exit status: 0 when the job FINISHED (after the last checkpoint was
// written) or after a clean shutdown on SIGTERM/SIGINT; 1 with a message on
// stderr otherwise (job FAILED, scheduler unreachable or not assembling,
// bad checkpoint or initial weights, ...); 2 for an unusable
// --metrics_listen or security file (missing, malformed, short token).
#include <pthread.h>
#include <signal.h>

#include <algorithm>
#include <cstdio>
#include <string>
#include <thread>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/strings/str_cat.h"
#include "common/rpc/allocator.h"
#include "common/rpc/daemon_metrics.h"
#include "common/rpc/security.h"
#include "common/rpc/security_flags.h"
#include "server/daemon.h"

ABSL_FLAG(std::string, scheduler, "", "Scheduler address host:port (required)");
ABSL_FLAG(std::string, listen, "0.0.0.0:0",
          "Address to serve gRPC on; port 0 picks a free port");
ABSL_FLAG(std::string, advertise_host, "127.0.0.1",
          "Host other nodes use to reach this server; the registered "
          "address is advertise_host:<bound port>");
ABSL_FLAG(std::string, metrics_listen, "",
          "serve Prometheus /metrics on this host:port (empty: off)");
ABSL_FLAG(int, shard, -1, "Requested shard id; -1: any");
ABSL_FLAG(bool, backup, false,
          "layout.shard_backups = 1: register for the backup slot of --shard "
          "(a synchronous copy that takes over when the primary dies)");
ABSL_FLAG(std::string, checkpoint_dir, "",
          "Directory of shard checkpoints (written and resumed from); empty: "
          "no checkpoints");
ABSL_FLAG(std::string, init_from, "",
          "safetensors file with initial weights (ignored when resuming)");
ABSL_FLAG(int, wait_timeout_s, 60,
          "Longest wait of a Pull or GradNorm for other workers, seconds");
ABSL_FLAG(int, threads, 0,
          "Threads of the shard's gradient norm and optimizer step (results "
          "are the same for any count); 0: one per core, at most 8");
ABSL_FLAG(bool, shared_memory, true,
          "map the shared-memory regions of workers on this host, whose "
          "payloads then skip the socket (docs/parameter-shard.md); false: "
          "refuse them (the workers fall back to the socket)");
ABSL_FLAG(int, scheduler_grace_s, 60,
          "keep serving while the scheduler is unreachable this long (it may "
          "be restarting; the shard rejoins it), then exit with an error");
ABSL_FLAG(int, assemble_timeout_s, 120,
          "Give up registering / getting an assignment after this many "
          "seconds");

int main(int argc, char** argv) {
  lmps::TuneAllocatorForLargeBuffers();
  absl::SetProgramUsageMessage(
      "Parameter-server shard of an lmps job.\n"
      "  lmps_server --scheduler=host:port [--checkpoint_dir=DIR] ...");
  absl::ParseCommandLine(argc, argv);

  // SIGTERM/SIGINT are handled by one thread (sigwait), so they are blocked
  // before any other thread exists and inherited blocked by gRPC's threads.
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGTERM);
  sigaddset(&signals, SIGINT);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);
  signal(SIGPIPE, SIG_IGN);

  lmps::DaemonOptions options;
  options.scheduler = absl::GetFlag(FLAGS_scheduler);
  options.listen = absl::GetFlag(FLAGS_listen);
  options.advertise_host = absl::GetFlag(FLAGS_advertise_host);
  options.shard = absl::GetFlag(FLAGS_shard);
  options.backup = absl::GetFlag(FLAGS_backup);
  options.checkpoint_dir = absl::GetFlag(FLAGS_checkpoint_dir);
  options.init_from = absl::GetFlag(FLAGS_init_from);
  options.wait_timeout = absl::Seconds(absl::GetFlag(FLAGS_wait_timeout_s));
  options.scheduler_grace =
      absl::Seconds(absl::GetFlag(FLAGS_scheduler_grace_s));
  options.threads = absl::GetFlag(FLAGS_threads);
  options.shared_memory = absl::GetFlag(FLAGS_shared_memory);
  if (options.threads == 0) {
    options.threads = static_cast<int>(
        std::clamp(std::thread::hardware_concurrency(), 1u, 8u));
  }
  options.assemble_timeout =
      absl::Seconds(absl::GetFlag(FLAGS_assemble_timeout_s));
  absl::StatusOr<lmps::DaemonMetrics> metrics =
      lmps::StartDaemonMetrics(absl::GetFlag(FLAGS_metrics_listen), "server");
  if (!metrics.ok()) {
    std::fprintf(stderr, "[server] error: %s\n", metrics.status().ToString().c_str());
    return 2;
  }
  options.metrics = metrics->metrics.get();
  options.rpc_metrics = metrics->rpc.get();
  const std::string prefix = options.shard >= 0
                                 ? absl::StrCat("[server-", options.shard, "]")
                                 : std::string("[server]");
  absl::StatusOr<lmps::Security> security =
      lmps::Security::Load(lmps::SecurityOptionsFromFlags());
  if (!security.ok()) {
    std::fprintf(stderr, "%s error: %s\n", prefix.c_str(),
                 std::string(security.status().message()).c_str());
    return 2;
  }
  options.security = *std::move(security);
  if (options.scheduler.empty()) {
    std::fprintf(stderr, "%s --scheduler=host:port is required (see --help)\n",
                 prefix.c_str());
    return 1;
  }
  if (options.threads < 1) {
    std::fprintf(stderr, "%s --threads must be >= 0 (0: one per core)\n",
                 prefix.c_str());
    return 1;
  }
  if (options.wait_timeout <= absl::ZeroDuration() ||
      options.assemble_timeout <= absl::ZeroDuration()) {
    std::fprintf(stderr,
                 "%s --wait_timeout_s and --assemble_timeout_s must be "
                 "positive\n",
                 prefix.c_str());
    return 1;
  }

  // Leaked on purpose: the detached signal thread may outlive main().
  lmps::StopSignal* stop = new lmps::StopSignal;
  std::thread([stop, signals, prefix] {
    int sig = 0;
    if (sigwait(&signals, &sig) == 0) {
      std::fprintf(stderr, "%s received %s: shutting down\n", prefix.c_str(),
                   sig == SIGTERM ? "SIGTERM" : "SIGINT");
      stop->Stop();
    }
  }).detach();

  // 2 (lmps_local's kExitInvalidInput) for an invalid configuration or
  // input, e.g. an --init_from file that does not fit the model: restarting
  // would fail the same way.
  const absl::Status status = lmps::RunParameterServer(options, stop);
  if (status.ok()) return 0;
  return status.code() == absl::StatusCode::kInvalidArgument ? 2 : 1;
}
