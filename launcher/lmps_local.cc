// lmps_local: runs a whole lmps job on this machine as separate processes
// talking gRPC on loopback: one scheduler, S parameter-server shards and W
// workers, each on a free port. It shows a progress line, stops every child
// cleanly at the end, on an error or on Ctrl-C (children also die with it if
// it is killed), exports the final model to safetensors and prints the
// generated sample.
//
//   lmps_local [--job=job.textproto] [--workers=W] [--shards=S] [--steps=N]
//              [--run_dir=DIR] [--resume]
//              [--tls_dir=DIR] [--auth_token_file=FILE]
//
// Transport security (common/security.h): --tls_dir names the output of
// scripts/make_test_certs.sh; the scheduler and the shards then serve mutual
// TLS with DIR/server.{crt,key}, the workers and the launcher's own status
// channel use DIR/client.{crt,key}, all trusting DIR/ca.crt.
// --auth_token_file is passed to every daemon and used by the launcher.
//
// Layout of --run_dir: job.textproto (the effective spec), logs/<node>.log,
// ckpt/step_*/shard_*.ckpt, model.safetensors, sample.txt.
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <optional>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <google/protobuf/text_format.h>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "common/grpc_server.h"
#include "common/stop_shards.h"
#include "common/job_spec.h"
#include "common/process/process_group.h"
#include "common/security.h"
#include "common/status_util.h"
#include "launcher/fault_injection.h"
#include "launcher/job_plan.h"
#include "launcher/progress.h"
#include "proto/lmps.grpc.pb.h"

ABSL_FLAG(std::string, job, "", "job spec (text proto); empty: the defaults");
ABSL_FLAG(int, workers, 0, "data-parallel workers (0: the spec's layout.dp)");
ABSL_FLAG(int, pp, 0, "pipeline stages (0: the spec's layout.pp)");
ABSL_FLAG(int, tp, 0, "tensor-parallel ranks (0: the spec's layout.tp)");
ABSL_FLAG(std::string, schedule, "",
          "pipeline schedule: 1f1b or gpipe (empty: the spec's)");
ABSL_FLAG(int, micro_batches, 0,
          "micro-batches per replica per step (0: the spec's)");
ABSL_FLAG(int, shards, 0, "parameter-server shards (0: the spec's layout)");
ABSL_FLAG(int, steps, 0, "training steps (0: the spec's train.steps)");
ABSL_FLAG(std::string, data, "", "data file (empty: the spec's data.path)");
ABSL_FLAG(std::string, run_dir, "lmps_run", "where logs, checkpoints, the "
          "exported model and the sample go");
ABSL_FLAG(bool, resume, false,
          "resume from the latest complete checkpoint in --run_dir/ckpt "
          "(otherwise old checkpoints there are removed)");
ABSL_FLAG(std::string, bin_dir, "",
          "directory of the lmps binaries (default: found next to this one)");
ABSL_FLAG(std::string, worker_args, "", "extra flags for every worker");
ABSL_FLAG(std::string, server_args, "", "extra flags for every server");
ABSL_FLAG(int, metrics_base_port, 0,
          "serve Prometheus /metrics on 127.0.0.1: the scheduler on this "
          "port, shard s on port+1+s, worker w on port+1+S+w (0: off)");
ABSL_FLAG(int, resize_at_step, -1,
          "elastic data parallelism (tests, demos): once the slowest worker "
          "reaches this step, change dp to --resize_workers at the next step "
          "boundary (SIGUSR1 / SIGUSR2 add / remove one replica at any time)");
ABSL_FLAG(int, resize_workers, 0, "see --resize_at_step");
ABSL_FLAG(int, elastic_max_dp, 0,
          "> 0: the scheduler drives elastic dp (lmps_scheduler "
          "--elastic_max_dp): --resize_at_step/--resize_workers and "
          "SIGUSR1/SIGUSR2 then only start or kill worker processes, and the "
          "scheduler grows or shrinks dp at a step boundary, within "
          "[--elastic_min_dp, --elastic_max_dp]");
ABSL_FLAG(int, elastic_min_dp, 1, "see --elastic_max_dp");
ABSL_FLAG(double, elastic_grace_s, 10,
          "with --elastic_max_dp: how long a dead worker's slot waits for a "
          "replacement before the scheduler shrinks dp");
ABSL_FLAG(std::string, elastic_batch, "keep",
          "on a dp change: keep the global batch (each replica takes "
          "batch/dp; the result equals the fixed-dp run's) or rescale it "
          "(each replica keeps its batch, the global batch scales with dp)");
ABSL_FLAG(int, spare_workers, 0,
          "spare workers started with the job: each waits for a worker to "
          "die and takes over its slot at once (data-parallel jobs)");
ABSL_FLAG(int, restart_workers, 3,
          "replace a worker that dies up to this many times per worker");
ABSL_FLAG(int, lease_s, 10, "heartbeat lease (a dead worker's slot frees "
          "up for its replacement after it)");
ABSL_FLAG(int, fault_worker, -1,
          "fault injection for tests: worker index to kill, with "
          "--fault_kill_at_step");
ABSL_FLAG(int, fault_kill_at_step, -1,
          "fault injection: SIGKILL --fault_worker after it pushes this step");
ABSL_FLAG(int, restart_job, 3,
          "when a parameter-server shard (or, with pp * tp > 1, a worker "
          "out of --restart_workers) dies, restart the whole job from the "
          "latest complete checkpoint up to this many times (the job rolls "
          "back to that step everywhere)");
ABSL_FLAG(int, fault_kill_server, -1,
          "fault injection for tests: shard to SIGKILL once the slowest "
          "worker reaches --fault_kill_server_at_step");
ABSL_FLAG(int, fault_kill_server_at_step, -1, "see --fault_kill_server");
ABSL_FLAG(int, fault_kill_primary_again_at_step, -1,
          "fault injection for tests (layout.shard_backups = 1): after "
          "--fault_kill_server, SIGKILL whichever node then serves that shard "
          "as its primary once the slowest worker reaches this step and the "
          "shard's other node holds a complete copy again");
ABSL_FLAG(int, restart_scheduler, 3,
          "restart a scheduler that dies, on the same port, up to this many "
          "times; the running nodes rejoin it and the job continues");
ABSL_FLAG(int, fault_kill_scheduler_at_step, -1,
          "fault injection for tests: SIGKILL the scheduler once the slowest "
          "worker reaches this step");
ABSL_FLAG(int, timeout_s, 3600, "give up and stop everything after this");
ABSL_FLAG(bool, export_model, true,
          "export the final model to --run_dir/model.safetensors");
ABSL_FLAG(bool, quiet, false, "no progress lines");
ABSL_FLAG(std::string, tls_dir, "",
          "mutual TLS for every daemon and channel, with the files of "
          "scripts/make_test_certs.sh in this directory (ca.crt, server.crt/"
          ".key, client.crt/.key); empty: plaintext");
ABSL_FLAG(std::string, auth_token_file, "",
          "shared token file passed to every daemon (--auth_token_file) and "
          "sent by the launcher; empty: no token");

namespace lmps {
namespace {

namespace fs = std::filesystem;

volatile sig_atomic_t g_interrupted = 0;
void OnSignal(int) { g_interrupted = 1; }
volatile sig_atomic_t g_resize_delta = 0;  // SIGUSR1: +1 replica, SIGUSR2: -1
void OnResizeSignal(int signo) { g_resize_delta += signo == SIGUSR1 ? 1 : -1; }

struct Child {
  std::string name;
  std::string binary;
  std::vector<std::string> args;
  int restarts = 0;
  pid_t pid = -1;
  std::string log;
  bool exited = false;
  bool removed = false;  // killed on purpose (elastic shrink)
};

class Launcher {
 public:
  ~Launcher() { StopAll(); }

  absl::Status Run();

 private:
  // Starts the scheduler, the shards and the workers; sets scheduler_.
  absl::Status StartJob(const JobSpec& spec);
  // Follows the job until every worker is done.
  absl::Status Monitor();
  // The fault injector's view of children_.
  FaultTargets Targets();
  // Elastic dp (--resize_at_step, SIGUSR1/SIGUSR2): asks every shard to stop
  // at the next step boundary; Run() then restarts the job with the new dp
  // from that step's checkpoint.
  void MaybeResize(const JobStatus& status);
  // Elastic scheduler: starts or kills worker processes for `want` replicas.
  void ElasticProcesses(int want);
  absl::Status Start(const std::string& name, const std::string& binary,
                     std::vector<std::string> args);
  // Reaps exited children; returns an error naming a child that failed.
  // Restarts nothing once the job has FAILED.
  absl::Status Reap();
  // The scheduler's status, asked now (2 s deadline).
  absl::StatusOr<JobStatus> QueryStatus();
  // The job FAILED: stops every process at once and says why. Returns
  // Unavailable (Run() restarts the job from its checkpoint) for a rollback
  // while --restart_job allows, else FailedPrecondition with the reason.
  absl::Status JobFailed(const JobStatus& status);
  // Before a process is restarted: the job's failure, if it failed.
  absl::Status CheckNotFailed();
  // Starts `binary args...` with its output to `log`; it dies with the
  // launcher and ignores SIGINT (the launcher decides how children stop).
  absl::StatusOr<pid_t> Spawn(const std::string& binary,
                              const std::vector<std::string>& args,
                              const std::string& log);
  void StopAll();
  bool AllExited(const std::string& prefix) const;
  std::string Bin(const std::string& rel) const { return BinaryIn(bin_dir_, rel); }

  std::string bin_dir_, run_dir_, job_file_, scheduler_;
  // The daemons' flags and the launcher's own channel security.
  SecurityPlan security_;
  std::unique_ptr<Scheduler::Stub> status_stub_;  // QueryStatus()
  std::string status_stub_target_;
  int attempt_ = 0;             // job restarts after a lost shard
  std::string lost_server_;     // set by Reap() when a shard died
  // pp * tp > 1: a lost worker restarts the whole job too (its stage and
  // tensor-parallel partners cannot continue the step without it).
  bool pipeline_ = false;
  bool replicated_ = false;  // layout.shard_backups = 1
  // --elastic_max_dp: the scheduler resizes; the launcher starts or kills
  // worker processes toward elastic_dp_ replicas.
  bool elastic_scheduler_ = false;
  int elastic_dp_ = 0;
  int extra_workers_ = 0;
  std::vector<std::string> extra_worker_args_;
  FaultInjector faults_{FaultOptions{
      absl::GetFlag(FLAGS_fault_worker),
      absl::GetFlag(FLAGS_fault_kill_at_step),
      absl::GetFlag(FLAGS_fault_kill_server),
      absl::GetFlag(FLAGS_fault_kill_server_at_step),
      absl::GetFlag(FLAGS_fault_kill_primary_again_at_step),
      absl::GetFlag(FLAGS_fault_kill_scheduler_at_step)}};
  int spares_available_ = 0;  // spares not yet used for a dead worker
  // Elastic resize in progress: the step boundary the shards stop at, and
  // the spec the job restarts with.
  int64_t resize_step_ = -1;
  bool resize_flag_done_ = false;
  JobSpec spec_;            // the running job's spec
  JobSpec resized_spec_;
  ProcessGroup processes_;
  std::vector<Child> children_;
  std::chrono::steady_clock::time_point start_;
  ProgressLine progress_{absl::GetFlag(FLAGS_quiet), isatty(1) != 0};
};

absl::StatusOr<pid_t> Launcher::Spawn(const std::string& binary,
                                      const std::vector<std::string>& args,
                                      const std::string& log) {
  std::vector<std::string> argv = {binary};
  argv.insert(argv.end(), args.begin(), args.end());
  SpawnOptions options;
  options.output_path = log;
  options.ignore_sigint = true;
  absl::StatusOr<pid_t> pid = processes_.Spawn(argv, options);
  if (absl::IsNotFound(pid.status())) {
    return absl::NotFoundError(absl::StrCat(pid.status().message(),
                                            " (build it, or pass --bin_dir)"));
  }
  return pid;
}

absl::Status Launcher::Start(const std::string& name, const std::string& binary,
                             std::vector<std::string> args) {
  Child c;
  c.name = name;
  c.binary = binary;
  c.args = args;
  c.log = attempt_ == 0 ? absl::StrCat(run_dir_, "/logs/", name, ".log")
                        : absl::StrCat(run_dir_, "/logs/", name, ".attempt",
                                       attempt_, ".log");
  LMPS_ASSIGN_OR_RETURN(c.pid, Spawn(binary, args, c.log));
  children_.push_back(c);
  return absl::OkStatus();
}

absl::StatusOr<JobStatus> Launcher::QueryStatus() {
  if (status_stub_ == nullptr || status_stub_target_ != scheduler_) {
    status_stub_ =
        Scheduler::NewStub(MakeChannel(scheduler_, nullptr, security_.launcher));
    status_stub_target_ = scheduler_;
  }
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(2));
  JobStatus status;
  grpc::Status s = status_stub_->GetStatus(&ctx, GetStatusRequest(), &status);
  if (!s.ok()) return FromGrpcStatus(s);
  return status;
}

absl::Status Launcher::JobFailed(const JobStatus& status) {
  const bool rollback = status.rollback() &&
                        attempt_ < absl::GetFlag(FLAGS_restart_job) &&
                        !g_interrupted;
  std::printf("\nlmps: the job FAILED: %s\nlmps: stopping every process%s\n",
              status.message().c_str(),
              rollback ? "; the job restarts from its latest checkpoint" : "");
  std::fflush(stdout);
  StopAll();
  if (rollback) {
    lost_server_ = absl::StrCat("the job FAILED for a rollback (",
                                status.message(), ")");
    return absl::UnavailableError(lost_server_);
  }
  return absl::FailedPreconditionError(
      absl::StrCat("the job FAILED: ", status.message()));
}

absl::Status Launcher::CheckNotFailed() {
  absl::StatusOr<JobStatus> status = QueryStatus();
  if (status.ok() && status->state() == FAILED) return JobFailed(*status);
  return absl::OkStatus();
}

absl::Status Launcher::Reap() {
  for (Child& c : children_) {
    if (c.exited) continue;
    const std::optional<ExitStatus> status = processes_.Poll(c.pid);
    if (!status.has_value()) continue;
    c.exited = true;
    const bool ok = status->success() || c.removed;
    if (!ok) {
      std::string how = status->Describe();
      if (c.name == "scheduler" &&
          c.restarts < absl::GetFlag(FLAGS_restart_scheduler) && !g_interrupted) {
        // Its state is rebuilt from the nodes: they keep training and rejoin
        // the new scheduler on the same address.
        std::printf("\nlmps: the scheduler %s; restarting it on %s (%d of %d); "
                    "the nodes rejoin it\n",
                    how.c_str(), scheduler_.c_str(), c.restarts + 1,
                    absl::GetFlag(FLAGS_restart_scheduler));
        std::fflush(stdout);
        for (std::string& a : c.args) {
          if (a.rfind("--listen=", 0) == 0) a = "--listen=" + scheduler_;
        }
        c.log = absl::StrCat(run_dir_, "/logs/scheduler.restart", c.restarts + 1,
                             ".log");
        LMPS_ASSIGN_OR_RETURN(c.pid, Spawn(c.binary, c.args, c.log));
        c.exited = false;
        ++c.restarts;
        continue;
      }
      const bool server = c.name.rfind("server", 0) == 0 ||
                          c.name.rfind("backup", 0) == 0;
      if ((server && replicated_) || c.name.rfind("worker", 0) == 0) {
        LMPS_RETURN_IF_ERROR(CheckNotFailed());
      }
      if (server && replicated_ && c.restarts < 5 && !g_interrupted) {
        // Replicated shards: the other node of the shard serves on (the
        // workers fail over to it); the restarted process registers again
        // and becomes the shard's new backup, with a snapshot.
        std::printf("\nlmps: %s %s; its shard's other node serves on, and "
                    "the restarted process becomes its backup (%d of 5)\n",
                    c.name.c_str(), how.c_str(), c.restarts + 1);
        std::fflush(stdout);
        c.log = absl::StrCat(run_dir_, "/logs/", c.name, ".restart",
                             c.restarts + 1, ".log");
        LMPS_ASSIGN_OR_RETURN(c.pid, Spawn(c.binary, c.args, c.log));
        c.exited = false;
        ++c.restarts;
        continue;
      }
      const bool worker = c.name.rfind("worker", 0) == 0;
      if (worker && pipeline_ && elastic_scheduler_ &&
          elastic_dp_ > absl::GetFlag(FLAGS_elastic_min_dp) && !g_interrupted) {
        // Its stage and tensor-parallel partners cannot go on without it:
        // the elastic scheduler drops its whole replica (dp - 1) at the
        // step it died in, and the partners register again.
        --elastic_dp_;
        std::printf("\nlmps: %s %s; the elastic scheduler drops its replica "
                    "(dp %d -> %d) once its lease and --elastic_grace_s "
                    "expire\n",
                    c.name.c_str(), how.c_str(), elastic_dp_ + 1, elastic_dp_);
        std::fflush(stdout);
        continue;
      }
      // Pipeline workers are replaced too (the scheduler regroups the job
      // at the step in progress); out of replacements and spares, the job
      // restarts.
      const bool lost_worker_of_pipeline =
          pipeline_ && worker &&
          c.restarts >= absl::GetFlag(FLAGS_restart_workers) &&
          spares_available_ == 0;
      if ((server || lost_worker_of_pipeline) &&
          attempt_ < absl::GetFlag(FLAGS_restart_job) && !g_interrupted) {
        lost_server_ = absl::StrCat(c.name, " ", how);
        return absl::UnavailableError(lost_server_);
      }
      if (c.name.rfind("worker", 0) == 0 &&
          c.restarts < absl::GetFlag(FLAGS_restart_workers) && !g_interrupted) {
        // Workers are stateless: a replacement takes the dead one's slot once
        // its lease expires and redoes exactly the lost work (a pipeline
        // replica: the step in progress, after the scheduler's regroup).
        std::printf("\nlmps: %s %s; starting a replacement (%d of %d)\n",
                    c.name.c_str(), how.c_str(), c.restarts + 1,
                    absl::GetFlag(FLAGS_restart_workers));
        std::fflush(stdout);
        std::vector<std::string> args;
        for (const std::string& a : c.args) {
          if (a.rfind("--fault_", 0) != 0) args.push_back(a);
        }
        c.args = args;
        c.log = absl::StrCat(run_dir_, "/logs/", c.name, ".restart",
                             c.restarts + 1, ".log");
        LMPS_ASSIGN_OR_RETURN(c.pid, Spawn(c.binary, c.args, c.log));
        c.exited = false;
        ++c.restarts;
        continue;
      }
      if (c.name.rfind("worker", 0) == 0 && elastic_scheduler_ && !g_interrupted) {
        std::printf("\nlmps: %s %s; the elastic scheduler shrinks dp once its "
                    "lease and --elastic_grace_s expire (unless a worker "
                    "takes its slot)\n",
                    c.name.c_str(), how.c_str());
        std::fflush(stdout);
        continue;
      }
      if (c.name.rfind("worker", 0) == 0 && spares_available_ > 0 &&
          !g_interrupted) {
        --spares_available_;
        std::printf("\nlmps: %s %s; a spare worker takes over its slot once "
                    "its lease expires\n",
                    c.name.c_str(), how.c_str());
        std::fflush(stdout);
        continue;
      }
      return absl::AbortedError(absl::StrCat(c.name, " ", how, "; the end of ",
                                             c.log, ":\n", LogTail(c.log, 15)));
    }
  }
  return absl::OkStatus();
}

bool Launcher::AllExited(const std::string& prefix) const {
  for (const Child& c : children_) {
    if (c.name.rfind(prefix, 0) == 0 && !c.exited) return false;
  }
  return true;
}

void Launcher::StopAll() {
  processes_.StopAll();
  for (Child& c : children_) c.exited = true;
}

FaultTargets Launcher::Targets() {
  FaultTargets targets;
  targets.running = [this](const std::string& name) {
    for (const Child& c : children_) {
      if (c.name == name && !c.exited) return true;
    }
    return false;
  };
  targets.kill = [this](const std::string& name) {
    for (Child& c : children_) {
      if (c.name == name && !c.exited) {
        processes_.Signal(c.pid, SIGKILL).IgnoreError();
      }
    }
  };
  return targets;
}

void Launcher::MaybeResize(const JobStatus& status) {
  if (resize_step_ >= 0 || status.state() != RUNNING) return;
  const int dp = elastic_scheduler_ ? elastic_dp_ : spec_.layout().dp();
  int want = dp;
  int64_t slowest = INT64_MAX;
  for (const NodeStatus& n : status.nodes()) {
    if (n.role() == WORKER) slowest = std::min(slowest, n.step());
  }
  if (!resize_flag_done_ && absl::GetFlag(FLAGS_resize_at_step) >= 0 &&
      slowest != INT64_MAX && slowest >= absl::GetFlag(FLAGS_resize_at_step)) {
    resize_flag_done_ = true;
    want = absl::GetFlag(FLAGS_resize_workers);
  }
  if (g_resize_delta != 0) {
    want = dp + g_resize_delta;
    g_resize_delta = 0;
  }
  if (elastic_scheduler_) {
    ElasticProcesses(want);
    return;
  }
  if (want == dp) return;
  JobSpec next = spec_;
  next.mutable_layout()->set_dp(want);
  if (absl::GetFlag(FLAGS_elastic_batch) == "rescale") {
    next.mutable_train()->set_batch_size(spec_.train().batch_size() / dp * want);
  }
  if (absl::Status valid = ValidateJobSpec(next); want < 1 || !valid.ok()) {
    std::printf("\nlmps: cannot resize dp %d -> %d: %s\n", dp, want,
                want < 1 ? "dp must be >= 1" : std::string(valid.message()).c_str());
    std::fflush(stdout);
    return;
  }
  // The boundary: two steps past the most advanced shard, so no worker has
  // pulled it yet; a shard already past it answers with its version and
  // every shard is asked again for a later step.
  std::vector<std::string> shards;
  int64_t step = 0;
  for (const NodeStatus& n : status.nodes()) {
    if (n.role() == SERVER && n.serving_primary()) {  // a backup follows
      shards.push_back(n.address());
      step = std::max(step, n.step());
    }
  }
  absl::StatusOr<int64_t> stop = StopShardsAt(shards, security_.launcher, step + 2, /*ahead=*/2);
  if (!stop.ok()) {
    std::printf("\nlmps: cannot resize: %s\n", std::string(stop.status().message()).c_str());
    std::fflush(stdout);
    return;
  }
  resize_step_ = *stop;
  resized_spec_ = next;
  std::printf("\nlmps: elastic resize: dp %d -> %d at step %lld (global "
              "batch %d -> %d); the job stops there, checkpoints, and "
              "restarts with the new dp\n",
              dp, want, static_cast<long long>(*stop), spec_.train().batch_size(),
              next.train().batch_size());
  std::fflush(stdout);
}

void Launcher::ElasticProcesses(int want) {
  const int group = spec_.layout().pp() * spec_.layout().tp();
  const int lo = absl::GetFlag(FLAGS_elastic_min_dp),
            hi = absl::GetFlag(FLAGS_elastic_max_dp);
  if (want == elastic_dp_) return;
  if (want < lo || want > hi) {
    std::printf("\nlmps: cannot resize dp %d -> %d: outside [%d, %d] "
                "(--elastic_min_dp, --elastic_max_dp)\n",
                elastic_dp_, want, lo, hi);
    std::fflush(stdout);
    return;
  }
  if (want > elastic_dp_) {
    const int n = (want - elastic_dp_) * group;
    std::printf("\nlmps: elastic: starting %d more worker process%s; the "
                "scheduler grows dp %d -> %d at a step boundary\n",
                n, n == 1 ? "" : "es", elastic_dp_, want);
    std::fflush(stdout);
    for (int i = 0; i < n; ++i) {
      const absl::Status s = Start(absl::StrCat("worker-x", extra_workers_++),
                                   Bin("worker/lmps_worker"), extra_worker_args_);
      if (!s.ok()) {
        std::printf("lmps: %s\n", std::string(s.message()).c_str());
        return;
      }
    }
  } else {
    int n = (elastic_dp_ - want) * group;
    std::printf("\nlmps: elastic: stopping %d worker process%s; the "
                "scheduler shrinks dp %d -> %d once their leases and "
                "--elastic_grace_s=%g expire\n",
                n, n == 1 ? "" : "es", elastic_dp_, want,
                absl::GetFlag(FLAGS_elastic_grace_s));
    std::fflush(stdout);
    for (auto it = children_.rbegin(); it != children_.rend() && n > 0; ++it) {
      if (it->name.rfind("worker", 0) == 0 && !it->exited && !it->removed) {
        it->removed = true;
        processes_.Signal(it->pid, SIGKILL).IgnoreError();
        --n;
      }
    }
  }
  elastic_dp_ = want;
}

absl::Status Launcher::StartJob(const JobSpec& spec) {
  spec_ = spec;
  pipeline_ = spec.layout().pp() * spec.layout().tp() > 1;
  replicated_ = spec.layout().shard_backups() > 0;
  const int W = spec.layout().dp() * spec.layout().pp() * spec.layout().tp(),
            S = spec.layout().num_shards();
  const int cores = std::max(1u, std::thread::hardware_concurrency());
  const std::string ckpt = run_dir_ + "/ckpt";
  const std::string& job_file = job_file_;
  std::error_code ec;
  fs::remove(run_dir_ + "/scheduler.port", ec);
  const int metrics_port = absl::GetFlag(FLAGS_metrics_base_port);
  auto metrics_flag = [&](int offset) -> std::vector<std::string> {
    if (metrics_port <= 0) return {};
    return {absl::StrCat("--metrics_listen=127.0.0.1:", metrics_port + offset)};
  };
  // Scheduler first, on a free port it reports through a file.
  const std::string port_file = run_dir_ + "/scheduler.port";
  std::vector<std::string> scheduler_args = {
      "--job=" + job_file, "--listen=127.0.0.1:0", "--port_file=" + port_file,
      absl::StrCat("--lease_s=", absl::GetFlag(FLAGS_lease_s))};
  for (const std::string& a : metrics_flag(0)) scheduler_args.push_back(a);
  for (const std::string& a : security_.server_args) scheduler_args.push_back(a);
  elastic_scheduler_ = absl::GetFlag(FLAGS_elastic_max_dp) > 0;
  elastic_dp_ = spec.layout().dp();
  if (elastic_scheduler_) {
    scheduler_args.push_back(
        absl::StrCat("--elastic_max_dp=", absl::GetFlag(FLAGS_elastic_max_dp)));
    scheduler_args.push_back(
        absl::StrCat("--elastic_min_dp=", absl::GetFlag(FLAGS_elastic_min_dp)));
    scheduler_args.push_back(
        absl::StrCat("--elastic_grace_s=", absl::GetFlag(FLAGS_elastic_grace_s)));
    scheduler_args.push_back("--elastic_batch=" + absl::GetFlag(FLAGS_elastic_batch));
  }
  LMPS_RETURN_IF_ERROR(Start("scheduler", Bin("server/scheduler/lmps_scheduler"),
                             scheduler_args));
  std::string port;
  for (int i = 0; i < 600 && port.empty(); ++i) {
    LMPS_RETURN_IF_ERROR(Reap());
    std::ifstream in(port_file);
    std::getline(in, port);
    if (port.empty()) std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  if (port.empty()) {
    return absl::DeadlineExceededError(
        "the scheduler did not start within 30 s; see " + run_dir_ + "/logs/scheduler.log");
  }
  scheduler_ = "127.0.0.1:" + port;
  const std::string& scheduler = scheduler_;
  auto split_args = [](const std::string& s) {
    std::vector<std::string> out = absl::StrSplit(s, ' ', absl::SkipEmpty());
    return out;
  };
  for (int s = 0; s < S; ++s) {
    std::vector<std::string> args = {"--scheduler=" + scheduler,
                                     "--listen=127.0.0.1:0",
                                     "--advertise_host=127.0.0.1",
                                     absl::StrCat("--shard=", s),
                                     "--checkpoint_dir=" + ckpt};
    for (const std::string& a : split_args(absl::GetFlag(FLAGS_server_args))) args.push_back(a);
    for (const std::string& a : metrics_flag(1 + s)) args.push_back(a);
    for (const std::string& a : security_.server_args) args.push_back(a);
    LMPS_RETURN_IF_ERROR(Start(absl::StrCat("server-", s), Bin("server/lmps_server"), args));
    if (replicated_) {
      // Its synchronous backup, on the same checkpoint directory (both
      // write identical files, each atomically).
      args.push_back("--backup");
      std::vector<std::string> backup_args;
      for (const std::string& a : args) {
        if (a.rfind("--metrics_listen=", 0) != 0) backup_args.push_back(a);
      }
      LMPS_RETURN_IF_ERROR(Start(absl::StrCat("backup-", s),
                                 Bin("server/lmps_server"), backup_args));
    }
  }
  for (int w = 0; w < W; ++w) {
    std::vector<std::string> args = {"--scheduler=" + scheduler,
                                     absl::StrCat("--threads=", std::max(1, cores / W)),
                                     absl::StrCat("--rank=", w),
                                     "--sample_out=" + run_dir_ + "/sample.txt"};
    for (const std::string& a : split_args(absl::GetFlag(FLAGS_worker_args))) args.push_back(a);
    for (const std::string& a : metrics_flag(1 + S + w)) args.push_back(a);
    for (const std::string& a : security_.worker_args) args.push_back(a);
    if (w == 0) {
      extra_worker_args_.clear();
      for (const std::string& a : args) {
        if (a.rfind("--rank=", 0) != 0 && a.rfind("--metrics_listen=", 0) != 0) {
          extra_worker_args_.push_back(a);
        }
      }
    }
    for (const std::string& a : faults_.WorkerArgs(w, attempt_)) args.push_back(a);
    LMPS_RETURN_IF_ERROR(Start(absl::StrCat("worker-", w), Bin("worker/lmps_worker"), args));
  }
  // Spares: each waits until the job is RUNNING, then for a slot whose
  // worker died (worker_main.cc --spare; in a pipeline job, after the
  // scheduler's regroup).
  const int spares = absl::GetFlag(FLAGS_spare_workers);
  for (int i = 0; i < spares; ++i) {
    std::vector<std::string> args = {"--scheduler=" + scheduler,
                                     absl::StrCat("--threads=", std::max(1, cores / W)),
                                     "--spare", "--sample_out=" + run_dir_ + "/sample.txt"};
    for (const std::string& a : split_args(absl::GetFlag(FLAGS_worker_args))) args.push_back(a);
    for (const std::string& a : security_.worker_args) args.push_back(a);
    LMPS_RETURN_IF_ERROR(Start(absl::StrCat("worker-spare-", i), Bin("worker/lmps_worker"), args));
  }
  spares_available_ = spares;
  return absl::OkStatus();
}

absl::Status Launcher::Monitor() {
  const auto deadline = start_ + std::chrono::seconds(absl::GetFlag(FLAGS_timeout_s));
  while (!AllExited("worker")) {
    if (g_interrupted) {
      return absl::CancelledError("interrupted; stopped every process");
    }
    if (std::chrono::steady_clock::now() > deadline) {
      return absl::DeadlineExceededError(absl::StrCat(
          "the job did not finish within --timeout_s=", absl::GetFlag(FLAGS_timeout_s)));
    }
    LMPS_RETURN_IF_ERROR(Reap());
    if (absl::StatusOr<JobStatus> polled = QueryStatus(); polled.ok()) {
      const JobStatus& status = *polled;
      if (status.state() == FAILED) return JobFailed(status);
      progress_.Update(status, false);
      faults_.MaybeInject(status, attempt_, Targets());
      MaybeResize(status);
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(
        faults_.server_fault_pending() ? 20 : progress_.tty() ? 200 : 500));
  }
  return absl::OkStatus();
}

absl::Status Launcher::Run() {
  start_ = std::chrono::steady_clock::now();
  LMPS_ASSIGN_OR_RETURN(security_, PlanSecurity(absl::GetFlag(FLAGS_tls_dir),
                                                absl::GetFlag(FLAGS_auth_token_file)));
  bin_dir_ = BinDir(absl::GetFlag(FLAGS_bin_dir));
  run_dir_ = fs::absolute(absl::GetFlag(FLAGS_run_dir)).string();
  JobOverrides overrides;
  overrides.job_file = absl::GetFlag(FLAGS_job);
  overrides.workers = absl::GetFlag(FLAGS_workers);
  overrides.pp = absl::GetFlag(FLAGS_pp);
  overrides.tp = absl::GetFlag(FLAGS_tp);
  overrides.schedule = absl::GetFlag(FLAGS_schedule);
  overrides.micro_batches = absl::GetFlag(FLAGS_micro_batches);
  overrides.shards = absl::GetFlag(FLAGS_shards);
  overrides.steps = absl::GetFlag(FLAGS_steps);
  overrides.data = absl::GetFlag(FLAGS_data);
  LMPS_ASSIGN_OR_RETURN(JobSpec spec, PlanJobSpec(overrides));
  std::error_code ec;
  fs::create_directories(run_dir_ + "/logs", ec);
  if (ec) {
    return absl::InternalError(absl::StrCat("cannot create ", run_dir_, ": ", ec.message()));
  }
  const std::string ckpt = run_dir_ + "/ckpt";
  if (!absl::GetFlag(FLAGS_resume)) fs::remove_all(ckpt, ec);
  fs::create_directories(ckpt, ec);
  fs::remove(run_dir_ + "/sample.txt", ec);
  fs::remove(run_dir_ + "/scheduler.port", ec);
  std::string text;
  google::protobuf::TextFormat::PrintToString(spec, &text);
  job_file_ = run_dir_ + "/job.textproto";
  std::ofstream(job_file_) << text;

  const int W = spec.layout().dp() * spec.layout().pp() * spec.layout().tp(),
            S = spec.layout().num_shards();
  std::printf("lmps: %d worker%s (dp %d x pp %d x tp %d%s), %d shard%s, %d "
              "steps of %d sequences x %d tokens; model %d layers x %d wide "
              "(%s); data %s\nlmps: logs in %s/logs\n",
              W, W == 1 ? "" : "s", spec.layout().dp(), spec.layout().pp(),
              spec.layout().tp(),
              spec.layout().pp() > 1
                  ? absl::StrCat(", ", PipelineSchedule_Name(spec.layout().schedule()),
                                 ", ", spec.train().micro_batches(), " micro-batches")
                        .c_str()
                  : "",
              S, S == 1 ? "" : "s", spec.train().steps(),
              spec.train().batch_size(), spec.model().block_size(),
              spec.model().n_layer(), spec.model().n_embd(),
              absl::GetFlag(FLAGS_resume) ? "resuming" : "fresh start",
              spec.data().path().c_str(), run_dir_.c_str());
  if (security_.launcher.tls() || security_.launcher.has_token()) {
    std::printf("lmps: transport security: %s\n",
                security_.launcher.Describe().c_str());
  }
  std::fflush(stdout);

  while (true) {
    LMPS_RETURN_IF_ERROR(StartJob(spec));
    absl::Status status = Monitor();
    if (status.ok() && resize_step_ >= 0) {
      // Every worker stopped at the boundary and every shard checkpointed
      // it: restart the job there with the new dp.
      std::printf("\nlmps: restarting at step %lld with dp %d\n",
                  static_cast<long long>(resize_step_), resized_spec_.layout().dp());
      std::fflush(stdout);
      StopAll();
      children_.clear();
      spec = resized_spec_;
      std::string resized;
      google::protobuf::TextFormat::PrintToString(spec, &resized);
      std::ofstream(job_file_) << resized;
      resize_step_ = -1;
      ++attempt_;
      progress_.Restart();
      continue;
    }
    if (status.code() != absl::StatusCode::kUnavailable || lost_server_.empty()) {
      LMPS_RETURN_IF_ERROR(status);
      break;
    }
    ++attempt_;
    std::printf("\nlmps: %s; restarting the job from the latest complete "
                "checkpoint (restart %d of %d)\n",
                lost_server_.c_str(), attempt_, absl::GetFlag(FLAGS_restart_job));
    std::fflush(stdout);
    StopAll();
    children_.clear();
    lost_server_.clear();
    progress_.Restart();
  }
  JobStatus last;
  LMPS_RETURN_IF_ERROR(Reap());
  if (absl::StatusOr<JobStatus> polled = QueryStatus(); polled.ok()) {
    last = *polled;
  }
  progress_.Update(last, true);
  // Servers and the scheduler exit on their own once the job is finished.
  const auto wait_until = std::chrono::steady_clock::now() + std::chrono::seconds(30);
  while (!(AllExited("server") && AllExited("backup") &&
           AllExited("scheduler"))) {
    LMPS_RETURN_IF_ERROR(Reap());
    if (g_interrupted) return absl::CancelledError("interrupted");
    if (std::chrono::steady_clock::now() > wait_until) {
      return absl::DeadlineExceededError(
          "servers or scheduler did not exit within 30 s after the workers finished");
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  LMPS_RETURN_IF_ERROR(Reap());

  std::printf("lmps: checkpoints in %s\n", ckpt.c_str());
  if (absl::GetFlag(FLAGS_export_model)) {
    const std::string out = run_dir_ + "/model.safetensors";
    LMPS_RETURN_IF_ERROR(Start("export", Bin("server/lmps_export"),
                               {"--checkpoint_dir=" + ckpt, "--out=" + out}));
    while (!AllExited("export")) {
      LMPS_RETURN_IF_ERROR(Reap());
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    LMPS_RETURN_IF_ERROR(Reap());
    std::printf("lmps: model exported to %s\n", out.c_str());
  }
  if (!fs::exists(run_dir_ + "/sample.txt") && absl::GetFlag(FLAGS_export_model) &&
      spec.train().sample_tokens() > 0) {
    // With pp * tp > 1 no worker holds the whole model: sample from the
    // exported one.
    LMPS_RETURN_IF_ERROR(Start(
        "sample", Bin("worker/lmps_eval"),
        {"--model=" + run_dir_ + "/model.safetensors", "--prompt=The ",
         absl::StrCat("--generate=", spec.train().sample_tokens()),
         "--temperature=0.8", "--top_k=40",
         absl::StrCat("--seed=", spec.train().seed()),
         "--generate_out=" + run_dir_ + "/sample.txt"}));
    while (!AllExited("sample")) {
      LMPS_RETURN_IF_ERROR(Reap());
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    LMPS_RETURN_IF_ERROR(Reap());
  }
  std::ifstream sample(run_dir_ + "/sample.txt");
  if (sample) {
    std::stringstream s;
    s << sample.rdbuf();
    std::printf("lmps: sample:\n----\n%s\n----\n", s.str().c_str());
  }
  const double secs =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
  std::printf("lmps: done in %.1f s\n", secs);
  return absl::OkStatus();
}

}  // namespace
}  // namespace lmps

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "run an lmps job locally: lmps_local [--job=F] [--workers=W] "
      "[--shards=S] [--steps=N] [--run_dir=DIR] [--resume]");
  absl::ParseCommandLine(argc, argv);
  struct sigaction sa;
  std::memset(&sa, 0, sizeof(sa));
  sa.sa_handler = lmps::OnSignal;
  sigaction(SIGINT, &sa, nullptr);
  sigaction(SIGTERM, &sa, nullptr);
  struct sigaction resize;
  std::memset(&resize, 0, sizeof(resize));
  resize.sa_handler = lmps::OnResizeSignal;
  sigaction(SIGUSR1, &resize, nullptr);
  sigaction(SIGUSR2, &resize, nullptr);
  signal(SIGPIPE, SIG_IGN);
  absl::Status status;
  {
    lmps::Launcher launcher;
    status = launcher.Run();
  }  // stops every child
  if (!status.ok()) {
    std::fprintf(stderr, "\nlmps: error: %s\n", status.ToString().c_str());
    return status.code() == absl::StatusCode::kInvalidArgument ? 2 : 1;
  }
  return 0;
}
