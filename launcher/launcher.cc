#include "launcher/launcher.h"

#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>
#include <optional>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <google/protobuf/text_format.h>

#include "absl/status/statusor.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "common/clients/stop_shards.h"
#include "common/model/job_spec.h"
#include "common/process/binaries.h"
#include "common/process/process_group.h"
#include "common/rpc/grpc_server.h"
#include "common/rpc/security.h"
#include "common/rpc/status_util.h"
#include "common/text/gpt2_bpe.h"
#include "launcher/progress.h"
#include "launcher/restart_policy.h"
#include "launcher/run_logs.h"
#include "proto/lmps.grpc.pb.h"

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
  explicit Launcher(const LauncherOptions& options)
      : options_(options),
        restart_policy_(RestartLimits{options.restart_scheduler,
                                      options.restart_workers,
                                      options.restart_job,
                                      options.elastic_min_dp}),
        faults_(options.faults),
        progress_(options.quiet, isatty(1) != 0) {}
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
  // Reaps exited children and restarts what restart_policy_ says; returns
  // an error naming a child that failed. Restarts nothing once the job has
  // FAILED.
  absl::Status Reap();
  // The job as restart_policy_ sees it now.
  JobRestartState RestartState() const;
  // Starts the exited child `c` again, its output to `log`.
  absl::Status Respawn(Child* c, std::string log);
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

  const LauncherOptions options_;
  const RestartPolicy restart_policy_;  // what Reap() restarts
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
  FaultInjector faults_;
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
  ProgressLine progress_;
  // RUN_DIR/steps.jsonl, events.jsonl and report.html; opened by Run().
  RunLogs logs_;
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
  if (absl::EndsWith(binary, "lmps_worker")) {
    // Every process of a worker slot (replacements, restarts) appends to
    // the same step log.
    args.push_back(absl::StrCat("--step_log=", run_dir_, "/steps/", name,
                                ".jsonl"));
  }
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
                        attempt_ < options_.restart_job &&
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

JobRestartState Launcher::RestartState() const {
  JobRestartState job;
  job.replicated = replicated_;
  job.pipeline = pipeline_;
  job.elastic_scheduler = elastic_scheduler_;
  job.elastic_dp = elastic_dp_;
  job.spares_available = spares_available_;
  job.attempt = attempt_;
  job.interrupted = g_interrupted != 0;
  return job;
}

absl::Status Launcher::Respawn(Child* c, std::string log) {
  c->log = std::move(log);
  LMPS_ASSIGN_OR_RETURN(c->pid, Spawn(c->binary, c->args, c->log));
  c->exited = false;
  ++c->restarts;
  return absl::OkStatus();
}

absl::Status Launcher::Reap() {
  for (Child& c : children_) {
    if (c.exited) continue;
    const std::optional<ExitStatus> status = processes_.Poll(c.pid);
    if (!status.has_value()) continue;
    c.exited = true;
    if (status->success() || c.removed) continue;
    const std::string how = status->Describe();
    if (restart_policy_.ChecksJobFailedFirst(c.name, RestartState())) {
      LMPS_RETURN_IF_ERROR(CheckNotFailed());
    }
    switch (restart_policy_.Decide(c.name, c.restarts, RestartState(),
                                   status->exit_code())) {
      case RestartAction::kRestartScheduler:
        std::printf("\nlmps: the scheduler %s; restarting it on %s (%d of %d); "
                    "the nodes rejoin it\n",
                    how.c_str(), scheduler_.c_str(), c.restarts + 1,
                    options_.restart_scheduler);
        logs_.LogEvent("scheduler", how, "restarted; the nodes rejoin it");
        std::fflush(stdout);
        for (std::string& a : c.args) {
          if (a.rfind("--listen=", 0) == 0) a = "--listen=" + scheduler_;
        }
        LMPS_RETURN_IF_ERROR(Respawn(
            &c, absl::StrCat(run_dir_, "/logs/scheduler.restart",
                            c.restarts + 1, ".log")));
        continue;
      case RestartAction::kRestartAsBackup:
        std::printf("\nlmps: %s %s; its shard's other node serves on, and "
                    "the restarted process becomes its backup (%d of %d)\n",
                    c.name.c_str(), how.c_str(), c.restarts + 1,
                    RestartPolicy::kMaxBackupRestarts);
        logs_.LogEvent(c.name, how, "restarted; becomes its shard's backup");
        std::fflush(stdout);
        LMPS_RETURN_IF_ERROR(Respawn(
            &c, absl::StrCat(run_dir_, "/logs/", c.name, ".restart",
                            c.restarts + 1, ".log")));
        continue;
      case RestartAction::kDropReplica:
        --elastic_dp_;
        std::printf("\nlmps: %s %s; the elastic scheduler drops its replica "
                    "(dp %d -> %d) once its lease and --elastic_grace_s "
                    "expire\n",
                    c.name.c_str(), how.c_str(), elastic_dp_ + 1, elastic_dp_);
        std::fflush(stdout);
        continue;
      case RestartAction::kRestartJob:
        lost_server_ = absl::StrCat(c.name, " ", how);
        return absl::UnavailableError(lost_server_);
      case RestartAction::kReplaceWorker:
        std::printf("\nlmps: %s %s; starting a replacement (%d of %d)\n",
                    c.name.c_str(), how.c_str(), c.restarts + 1,
                    options_.restart_workers);
        logs_.LogEvent(c.name, how, "a replacement takes its slot");
        std::fflush(stdout);
        c.args = WithoutFaultFlags(c.args);
        LMPS_RETURN_IF_ERROR(Respawn(
            &c, absl::StrCat(run_dir_, "/logs/", c.name, ".restart",
                            c.restarts + 1, ".log")));
        continue;
      case RestartAction::kAwaitElasticShrink:
        std::printf("\nlmps: %s %s; the elastic scheduler shrinks dp once its "
                    "lease and --elastic_grace_s expire (unless a worker "
                    "takes its slot)\n",
                    c.name.c_str(), how.c_str());
        std::fflush(stdout);
        continue;
      case RestartAction::kAwaitSpare:
        --spares_available_;
        std::printf("\nlmps: %s %s; a spare worker takes over its slot once "
                    "its lease expires\n",
                    c.name.c_str(), how.c_str());
        std::fflush(stdout);
        continue;
      case RestartAction::kFail:
        break;
    }
    return absl::AbortedError(absl::StrCat(c.name, " ", how, "; the end of ",
                                           c.log, ":\n", LogTail(c.log, 15)));
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
  targets.signal_workers = [this](int signal) {
    std::vector<std::string> names;
    for (Child& c : children_) {
      if (absl::StartsWith(c.name, "worker") && !c.exited &&
          processes_.Signal(c.pid, signal).ok()) {
        names.push_back(c.name);
      }
    }
    return names;
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
  if (!resize_flag_done_ && options_.resize_at_step >= 0 &&
      slowest != INT64_MAX && slowest >= options_.resize_at_step) {
    resize_flag_done_ = true;
    want = options_.resize_workers;
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
  if (options_.elastic_batch == "rescale") {
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
  const int lo = options_.elastic_min_dp,
            hi = options_.elastic_max_dp;
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
                options_.elastic_grace_s);
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
  const int metrics_port = options_.metrics_base_port;
  auto metrics_flag = [&](int offset) -> std::vector<std::string> {
    if (metrics_port <= 0) return {};
    return {absl::StrCat("--metrics_listen=127.0.0.1:", metrics_port + offset)};
  };
  // Scheduler first, on a free port it reports through a file.
  const std::string port_file = run_dir_ + "/scheduler.port";
  std::vector<std::string> scheduler_args = {
      "--job=" + job_file, "--listen=127.0.0.1:0", "--port_file=" + port_file,
      absl::StrCat("--lease_s=", options_.lease_s)};
  for (const std::string& a : metrics_flag(0)) scheduler_args.push_back(a);
  for (const std::string& a : security_.server_args) scheduler_args.push_back(a);
  elastic_scheduler_ = options_.elastic_max_dp > 0;
  elastic_dp_ = spec.layout().dp();
  if (elastic_scheduler_) {
    scheduler_args.push_back(
        absl::StrCat("--elastic_max_dp=", options_.elastic_max_dp));
    scheduler_args.push_back(
        absl::StrCat("--elastic_min_dp=", options_.elastic_min_dp));
    scheduler_args.push_back(
        absl::StrCat("--elastic_grace_s=", options_.elastic_grace_s));
    scheduler_args.push_back("--elastic_batch=" + options_.elastic_batch);
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
    for (const std::string& a : split_args(options_.server_args)) args.push_back(a);
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
    for (const std::string& a : split_args(options_.worker_args)) args.push_back(a);
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
  const int spares = options_.spare_workers;
  for (int i = 0; i < spares; ++i) {
    std::vector<std::string> args = {"--scheduler=" + scheduler,
                                     absl::StrCat("--threads=", std::max(1, cores / W)),
                                     "--spare", "--sample_out=" + run_dir_ + "/sample.txt"};
    for (const std::string& a : split_args(options_.worker_args)) args.push_back(a);
    for (const std::string& a : security_.worker_args) args.push_back(a);
    LMPS_RETURN_IF_ERROR(Start(absl::StrCat("worker-spare-", i), Bin("worker/lmps_worker"), args));
  }
  spares_available_ = spares;
  return absl::OkStatus();
}

absl::Status Launcher::Monitor() {
  const auto deadline = start_ + std::chrono::seconds(options_.timeout_s);
  while (!AllExited("worker")) {
    if (g_interrupted) {
      return absl::CancelledError("interrupted; stopped every process");
    }
    if (std::chrono::steady_clock::now() > deadline) {
      return absl::DeadlineExceededError(absl::StrCat(
          "the job did not finish within --timeout_s=", options_.timeout_s));
    }
    LMPS_RETURN_IF_ERROR(Reap());
    if (absl::StatusOr<JobStatus> polled = QueryStatus(); polled.ok()) {
      const JobStatus& status = *polled;
      if (status.state() == FAILED) return JobFailed(status);
      progress_.Update(status, false);
      logs_.MergeSteps(status, /*final=*/false);
      logs_.LogEvents(status);
      faults_.MaybeInject(status, attempt_, absl::Now(), Targets());
      MaybeResize(status);
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(
        faults_.fault_pending() ? 20 : progress_.tty() ? 200 : 500));
  }
  return absl::OkStatus();
}

absl::Status Launcher::Run() {
  start_ = std::chrono::steady_clock::now();
  LMPS_ASSIGN_OR_RETURN(security_, PlanSecurity(options_.tls_dir,
                                                options_.auth_token_file));
  bin_dir_ = BinDir(options_.bin_dir);
  run_dir_ = fs::absolute(options_.run_dir).string();
  LMPS_ASSIGN_OR_RETURN(JobSpec spec, PlanJobSpec(options_.job));
  std::error_code ec;
  fs::create_directories(run_dir_ + "/logs", ec);
  if (ec) {
    return absl::InternalError(absl::StrCat("cannot create ", run_dir_, ": ", ec.message()));
  }
  const std::string ckpt = run_dir_ + "/ckpt";
  if (!options_.resume) fs::remove_all(ckpt, ec);
  fs::create_directories(ckpt, ec);
  fs::remove(run_dir_ + "/sample.txt", ec);
  logs_.Open(run_dir_, options_.resume);
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
              options_.resume ? "resuming" : "fresh start",
              IsTokenData(spec.data())
                  ? absl::StrCat("token shards ", spec.data().train_shards()).c_str()
                  : spec.data().path().c_str(),
              run_dir_.c_str());
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
      logs_.LogEvent("", "elastic resize",
                     absl::StrCat("the job restarts at step ", resize_step_,
                                  " with dp ", resized_spec_.layout().dp()));
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
    logs_.LogEvent("", lost_server_,
                   "the job restarts from the latest complete checkpoint");
    std::printf("\nlmps: %s; restarting the job from the latest complete "
                "checkpoint (restart %d of %d)\n",
                lost_server_.c_str(), attempt_, options_.restart_job);
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
  logs_.MergeSteps(last, /*final=*/true);
  logs_.LogEvents(last);
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
  if (options_.export_model) {
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
  if (!fs::exists(run_dir_ + "/sample.txt") && options_.export_model &&
      spec.train().sample_tokens() > 0) {
    // With pp * tp > 1 no worker holds the whole model: sample from the
    // exported one.
    std::vector<std::string> args = {
        "--model=" + run_dir_ + "/model.safetensors", "--prompt=The ",
        absl::StrCat("--generate=", spec.train().sample_tokens()),
        "--temperature=0.8", "--top_k=40",
        absl::StrCat("--seed=", spec.train().seed()),
        "--generate_out=" + run_dir_ + "/sample.txt"};
    if (IsTokenData(spec.data())) {
      // GPT-2's tokenizer where the workers would find it
      // (worker/data/create_dataset.h); without it, bytes.
      std::string dir = spec.data().tokenizer_dir();
      if (dir.empty()) dir = DefaultGpt2VocabDir();
      if (access((dir + "/encoder.json").c_str(), R_OK) == 0) {
        args.push_back("--gpt2_vocab_dir=" + dir);
      }
    }
    LMPS_RETURN_IF_ERROR(Start("sample", Bin("worker/lmps_eval"), args));
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
  logs_.WriteReport();
  const double secs =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
  std::printf("lmps: done in %.1f s\n", secs);
  return absl::OkStatus();
}

}  // namespace

void InstallLauncherSignalHandlers() {
  struct sigaction sa;
  std::memset(&sa, 0, sizeof(sa));
  sa.sa_handler = OnSignal;
  sigaction(SIGINT, &sa, nullptr);
  sigaction(SIGTERM, &sa, nullptr);
  struct sigaction resize;
  std::memset(&resize, 0, sizeof(resize));
  resize.sa_handler = OnResizeSignal;
  sigaction(SIGUSR1, &resize, nullptr);
  sigaction(SIGUSR2, &resize, nullptr);
  signal(SIGPIPE, SIG_IGN);
}

absl::Status RunLocalJob(const LauncherOptions& options) {
  Launcher launcher(options);
  return launcher.Run();
}  // the launcher stops every child

}  // namespace lmps

