// lmps_scheduler: assembles a job of parameter servers and workers, hands out
// their assignments, tracks heartbeats and serves the job status (service
// Scheduler in proto/lmps.proto), plus gRPC health and reflection.
//
//   lmps_scheduler --job=job.textproto --listen=0.0.0.0:7070
//   lmps_scheduler --workers=2 --shards=2 --listen=127.0.0.1:0
//       --port_file=/tmp/sched.port
//   lmps_scheduler ... --tls_ca=ca.crt --tls_cert=server.crt
//       --tls_key=server.key --auth_token_file=token
//
// Transport security: common/rpc/security.h (TLS with client certificates and
// the shared token; the health service needs no token).
//
// Exit codes: 0 the job FINISHED; 1 the job FAILED (the reason is printed),
// or the scheduler could not start; 2 a bad job file or flag; 128+N killed by
// signal N (SIGINT, SIGTERM).
#include <signal.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <memory>
#include <optional>
#include <string>
#include <thread>

#include <cmath>
#include <map>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "common/clients/stop_shards.h"
#include "common/model/job_spec.h"
#include "common/rpc/daemon_metrics.h"
#include "common/rpc/grpc_server.h"
#include "common/rpc/security.h"
#include "common/rpc/security_flags.h"
#include "proto/lmps.pb.h"
#include "report/status_page.h"
#include "server/scheduler/clock.h"
#include "server/scheduler/scheduler_core.h"
#include "server/scheduler/scheduler_service.h"
#include "server/scheduler/status_endpoint.h"

ABSL_FLAG(std::string, job, "",
          "Job spec in protobuf text format (JobSpec); empty: every field at "
          "its default");
ABSL_FLAG(int32_t, steps, 0, "Override train.steps (0: keep the job's)");
ABSL_FLAG(int32_t, workers, 0,
          "Override layout.dp, the number of workers (0: keep the job's)");
ABSL_FLAG(int32_t, shards, 0,
          "Override layout.num_shards, the number of parameter servers (0: "
          "keep the job's)");
ABSL_FLAG(std::string, listen, "0.0.0.0:7070",
          "host:port to serve on; port 0 picks a free port");
ABSL_FLAG(std::string, metrics_listen, "",
          "serve Prometheus /metrics on this host:port (empty: off)");
ABSL_FLAG(std::string, port_file, "",
          "If set, the bound port is written there (atomically) once serving");
ABSL_FLAG(double, assemble_timeout_s, 120,
          "Seconds from start within which every node must register");
ABSL_FLAG(double, lease_s, 10,
          "A node silent for longer than this many seconds is marked dead");
ABSL_FLAG(int32_t, elastic_max_dp, 0,
          "Elastic data parallelism: > 0 lets dp follow the workers that come "
          "and go, up to this (surplus workers registering grow it, workers "
          "dead for --elastic_grace_s shrink it), changing at a step boundary; "
          "0: off");
ABSL_FLAG(int32_t, elastic_min_dp, 1, "Elastic: the smallest dp");
ABSL_FLAG(std::string, elastic_batch, "keep",
          "Elastic: keep the global batch (keep) or each replica's (rescale)");
ABSL_FLAG(double, elastic_grace_s, 10,
          "Elastic: how long a dead worker's slot waits for a replacement "
          "before dp shrinks");
ABSL_FLAG(bool, exit_when_finished, true,
          "Exit (0 after FINISHED, 1 after FAILED) once every server has seen "
          "the final state in a heartbeat, or 10 s after it");
ABSL_FLAG(bool, exit_when_failed, true,
          "Exit 1 after FAILED even with --exit_when_finished=false, so that "
          "a supervisor (Kubernetes) restarts the job, which resumes from the "
          "latest checkpoint (e.g. after a shard restarted)");

namespace lmps {
namespace {

// Job-level gauges from the scheduler's view of every node.
void UpdateMetrics(const JobStatus& status, Metrics* m) {
  std::map<std::string, int> alive = {{"server", 0}, {"worker", 0}};
  int64_t min_step = -1;
  double loss = 0, tps = 0;
  int workers = 0;
  float eval = NAN;
  for (const NodeStatus& n : status.nodes()) {
    const std::string role = n.role() == SERVER ? "server" : "worker";
    if (n.alive()) ++alive[role];
    SetGauge(m, "lmps_heartbeat_age_seconds",
             "Seconds since the node's last heartbeat.",
             n.heartbeat_age_ms() / 1000.0, {{"peer", n.node_id()}});
    if (n.role() != WORKER) continue;
    ++workers;
    min_step = min_step < 0 ? n.step() : std::min(min_step, n.step());
    loss += n.loss();
    tps += n.tokens_per_second();
    if (n.dp_rank() == 0) eval = n.eval_loss();
  }
  for (const auto& [role, count] : alive) {
    SetGauge(m, "lmps_nodes_alive", "Nodes whose lease has not expired.",
             count, {{"role", role}});
  }
  SetGauge(m, "lmps_job_state", "JobState enum (1 assembling, 2 running, "
           "3 finished, 4 failed).", status.state());
  if (workers == 0) return;
  SetGauge(m, "lmps_step", "Slowest worker's completed steps.",
           static_cast<double>(std::max<int64_t>(0, min_step)));
  SetGauge(m, "lmps_loss", "Mean training loss over the workers.", loss / workers);
  SetGauge(m, "lmps_tokens_per_second", "Training tokens per second, all workers.", tps);
  if (std::isfinite(eval)) {
    SetGauge(m, "lmps_eval_loss", "Evaluation loss (data-parallel rank 0).", eval);
  }
}


// Grace after the final state before exiting, and the longest wait for the
// servers to see it.
constexpr absl::Duration kExitGrace = absl::Seconds(2);
constexpr absl::Duration kExitMaxWait = absl::Seconds(10);

std::atomic<int> g_signal{0};

void OnSignal(int signo) { g_signal.store(signo); }

void Log(absl::string_view line) {
  const std::string out = absl::StrCat("[scheduler] ", line, "\n");
  fwrite(out.data(), 1, out.size(), stderr);
  fflush(stderr);
}

struct MainOptions {
  SchedulerOptions scheduler;
  Security security;
  std::string listen;
  std::string port_file;
  bool exit_when_finished = true;
  bool exit_when_failed = true;
};

// Builds the options from the flags. InvalidArgument (exit 2) for a bad job
// file or flag.
absl::StatusOr<MainOptions> OptionsFromFlags() {
  MainOptions options;
  const std::string job = absl::GetFlag(FLAGS_job);
  absl::StatusOr<JobSpec> spec =
      job.empty() ? ParseJobSpec("") : LoadJobSpecFile(job);
  if (!spec.ok()) return spec.status();
  const int steps = absl::GetFlag(FLAGS_steps);
  const int workers = absl::GetFlag(FLAGS_workers);
  const int shards = absl::GetFlag(FLAGS_shards);
  if (steps < 0 || workers < 0 || shards < 0) {
    return absl::InvalidArgumentError(
        "--steps, --workers and --shards must be >= 0 (0 keeps the job's "
        "value)");
  }
  if (steps > 0) spec->mutable_train()->set_steps(steps);
  if (workers > 0) spec->mutable_layout()->set_dp(workers);
  if (shards > 0) spec->mutable_layout()->set_num_shards(shards);
  if (absl::Status s = ValidateJobSpec(*spec); !s.ok()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "invalid job spec", job.empty() ? "" : absl::StrCat(" ", job),
        " with the flag overrides: ", s.message()));
  }
  const double assemble = absl::GetFlag(FLAGS_assemble_timeout_s);
  const double lease = absl::GetFlag(FLAGS_lease_s);
  if (!(assemble > 0) || !(lease > 0)) {
    return absl::InvalidArgumentError(
        "--assemble_timeout_s and --lease_s must be positive");
  }
  options.scheduler.spec = *std::move(spec);
  options.scheduler.assemble_timeout = absl::Seconds(assemble);
  options.scheduler.lease = absl::Seconds(lease);
  options.scheduler.log = Log;
  ElasticOptions& e = options.scheduler.elastic;
  e.max_dp = absl::GetFlag(FLAGS_elastic_max_dp);
  e.min_dp = absl::GetFlag(FLAGS_elastic_min_dp);
  e.grace = absl::Seconds(absl::GetFlag(FLAGS_elastic_grace_s));
  const std::string batch = absl::GetFlag(FLAGS_elastic_batch);
  if (batch != "keep" && batch != "rescale") {
    return absl::InvalidArgumentError(absl::StrCat(
        "--elastic_batch must be keep or rescale, got '", batch, "'"));
  }
  e.rescale_batch = batch == "rescale";
  if (e.max_dp < 0 || e.min_dp < 1 || (e.max_dp > 0 && e.min_dp > e.max_dp) ||
      !(absl::GetFlag(FLAGS_elastic_grace_s) >= 0)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "elastic: need 1 <= --elastic_min_dp <= --elastic_max_dp (0: off) and "
        "--elastic_grace_s >= 0; got min ",
        e.min_dp, ", max ", e.max_dp));
  }
  if (e.max_dp > 0 && options.scheduler.spec.train().mode() == ASYNC) {
    return absl::InvalidArgumentError(
        "elastic data parallelism needs step boundaries: train.mode ASYNC has "
        "none (use SYNC or BOUNDED_STALENESS)");
  }
  absl::StatusOr<Security> security = Security::Load(SecurityOptionsFromFlags());
  if (!security.ok()) return security.status();
  options.security = *std::move(security);
  options.listen = absl::GetFlag(FLAGS_listen);
  options.port_file = absl::GetFlag(FLAGS_port_file);
  options.exit_when_finished = absl::GetFlag(FLAGS_exit_when_finished);
  options.exit_when_failed = absl::GetFlag(FLAGS_exit_when_failed);
  return options;
}

// Writes `port` to `path` through a temporary file and rename(2), so readers
// never see a partial file.
absl::Status WritePortFile(const std::string& path, int port) {
  const std::string tmp = absl::StrCat(path, ".tmp.", getpid());
  {
    std::ofstream out(tmp, std::ios::trunc);
    out << port << "\n";
    out.close();
    if (!out) {
      return absl::UnavailableError(absl::StrCat("cannot write ", tmp));
    }
  }
  if (rename(tmp.c_str(), path.c_str()) != 0) {
    unlink(tmp.c_str());
    return absl::UnavailableError(
        absl::StrCat("cannot rename ", tmp, " to ", path));
  }
  return absl::OkStatus();
}

int Run(MainOptions options) {
  RealClock clock;
  absl::StatusOr<std::unique_ptr<SchedulerCore>> core =
      SchedulerCore::Create(options.scheduler, &clock);
  if (!core.ok()) {
    Log(absl::StrCat("error: ", core.status().message()));
    return 2;
  }
  absl::StatusOr<std::unique_ptr<SchedulerService>> service =
      SchedulerService::Create(core->get());
  if (!service.ok()) {
    Log(absl::StrCat("error: ", service.status().message()));
    return 1;
  }
  // The live status page (GET /status on the metrics port); its HTTP
  // threads stop (StopServing below) before the core goes.
  StatusHistory history;
  StatusEndpoint status_page({.token = options.security.token(),
                              .job_status = [&core] { return (*core)->Status(); },
                              .history = &history});
  absl::StatusOr<DaemonMetrics> metrics =
      StartDaemonMetrics(absl::GetFlag(FLAGS_metrics_listen), "scheduler");
  if (!metrics.ok()) {
    Log(absl::StrCat("error: ", metrics.status().message()));
    return 2;
  }
  if (metrics->metrics->port() > 0) {
    if (absl::Status s = metrics->metrics->AddPage(
            "/status",
            [&status_page](const HttpRequest& r) { return status_page.Serve(r); });
        !s.ok()) {
      Log(absl::StrCat("error: ", s.message()));
      return 1;
    }
    Log(absl::StrCat("live status page on the metrics port: http://HOST:",
                     metrics->metrics->port(), "/status",
                     options.security.has_token() ? "?token=TOKEN" : ""));
  }
  GrpcServerOptions server_options;
  server_options.listen_address = options.listen;
  server_options.rpc_metrics = metrics->rpc.get();
  server_options.security = options.security;
  server_options.metrics = metrics->metrics.get();
  server_options.log = [](const std::string& line) { Log(line); };
  absl::StatusOr<StartedServer> server =
      StartGrpcServer(server_options, {service->get()});
  if (!server.ok()) {
    Log(absl::StrCat("error: ", server.status().message()));
    return 1;
  }
  SetServing(server->server.get(), true);

  const JobSpec& spec = options.scheduler.spec;
  const PartitionMap& partition = (*core)->partition();
  Log(absl::StrCat(
      "job '", spec.name(), "': ", (*core)->expected_servers(), " server(s), ",
      (*core)->expected_workers(), " worker(s) (dp=", spec.layout().dp(),
      " pp=", spec.layout().pp(), " tp=", spec.layout().tp(), "), ",
      spec.train().steps(), " steps; partition version ", partition.version(),
      " (", partition.chunks_size(), " chunks, imbalance ",
      partition.imbalance(), "); assemble timeout ",
      absl::ToDoubleSeconds(options.scheduler.assemble_timeout),
      "s, lease ", absl::ToDoubleSeconds(options.scheduler.lease), "s"));
  Log(absl::StrCat("serving on ", options.listen, " (port ", server->port,
                   "); ", options.security.Describe()));
  if (!options.port_file.empty()) {
    if (absl::Status s = WritePortFile(options.port_file, server->port);
        !s.ok()) {
      Log(absl::StrCat("error: ", s.message()));
      (*core)->Shutdown();
      server->server->Shutdown();
      return 1;
    }
  }

  // The elastic controller: carries out the core's resize plans (stopping
  // every shard at a step boundary needs the network).
  std::atomic<bool> controller_stop{false};
  std::thread controller([&] {
    while (!controller_stop.load()) {
      absl::SleepFor(absl::Milliseconds(100));
      std::optional<ResizePlan> plan = (*core)->TakeResizePlan();
      if (!plan.has_value()) continue;
      absl::StatusOr<int64_t> step =
          StopShardsAt(plan->shard_addresses, options.security,
                       plan->first_step, plan->ahead);
      if (step.ok()) {
        (*core)->ResizeStopped(*step);
      } else {
        (*core)->ResizeFailed(step.status().ToString());
      }
    }
  });

  int exit_code = 0;
  bool ended = false;
  absl::Time ended_at;
  absl::Time last_metrics;
  while (true) {
    absl::SleepFor(absl::Milliseconds(100));
    if (absl::Now() - last_metrics >= absl::Seconds(1)) {
      const JobStatus status = (*core)->Status();
      UpdateMetrics(status, metrics->metrics.get());
      last_metrics = absl::Now();
      history.Observe(status, absl::ToDoubleSeconds(last_metrics -
                                                     absl::UnixEpoch()));
    }
    if (int signo = g_signal.load(); signo != 0) {
      Log(absl::StrCat("caught signal ", signo, "; shutting down"));
      exit_code = 128 + signo;
      break;
    }
    const JobState state = (*core)->CurrentState();
    if (state != FINISHED && state != FAILED) continue;
    if (!(options.exit_when_finished ||
          (state == FAILED && options.exit_when_failed))) {
      continue;
    }
    const absl::Time now = absl::Now();
    if (!ended) {
      ended = true;
      ended_at = now;
      Log(absl::StrCat("job ", JobState_Name(state),
                       "; exiting once every server has seen it (at most ",
                       absl::ToDoubleSeconds(kExitMaxWait), "s)"));
    }
    const absl::Duration waited = now - ended_at;
    if ((waited >= kExitGrace && (*core)->AllServersSawFinalState()) ||
        waited >= kExitMaxWait) {
      if (state == FAILED) {
        Log(absl::StrCat("job FAILED: ", (*core)->StateMessage()));
        exit_code = 1;
      } else {
        Log("job FINISHED");
        exit_code = 0;
      }
      break;
    }
  }

  controller_stop = true;
  controller.join();
  (*core)->Shutdown();
  SetServing(server->server.get(), false);
  // In-flight calls are short (parked GetAssignment calls were finished by
  // core->Shutdown()); gRPC waits out the whole deadline while clients keep
  // their connections open, so keep it short.
  server->server->Shutdown(std::chrono::system_clock::now() +
                           std::chrono::milliseconds(500));
  metrics->metrics->StopServing();
  service->reset();
  core->reset();
  Log(absl::StrCat("exiting with code ", exit_code));
  return exit_code;
}

}  // namespace
}  // namespace lmps


int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "lmps scheduler: assembles a job of parameter servers and workers.\n"
      "  lmps_scheduler [--job=job.textproto] [--workers=N] [--shards=N] "
      "[--steps=N] [--listen=host:port] [--port_file=path]");
  absl::ParseCommandLine(argc, argv);
  signal(SIGINT, lmps::OnSignal);
  signal(SIGTERM, lmps::OnSignal);
  signal(SIGPIPE, SIG_IGN);
  absl::StatusOr<lmps::MainOptions> options = lmps::OptionsFromFlags();
  if (!options.ok()) {
    lmps::Log(absl::StrCat("error: ", options.status().message()));
    return 2;
  }
  return lmps::Run(*std::move(options));
}
