#include "server/daemon.h"

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <memory>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/daemon_metrics.h"
#include "common/grpc_server.h"
#include "common/partition.h"
#include "common/status_util.h"
#include "proto/lmps.grpc.pb.h"
#include "server/checkpoint.h"
#include "server/replication.h"
#include "server/reshard.h"
#include "server/service.h"
#include "server/shard.h"

namespace lmps {
namespace {

// Thread-safe line logger with a changeable "[server-N]" prefix.
class Logger {
 public:
  Logger(std::function<void(const std::string&)> sink, std::string prefix)
      : sink_(std::move(sink)), prefix_(std::move(prefix)) {}

  void SetPrefix(std::string prefix) {
    absl::MutexLock lock(&mu_);
    prefix_ = std::move(prefix);
  }

  void operator()(const std::string& line) {
    absl::MutexLock lock(&mu_);
    const std::string full = absl::StrCat(
        prefix_, " ",
        absl::FormatTime("%H:%M:%E3S", absl::Now(), absl::LocalTimeZone()), " ",
        line);
    if (sink_) {
      sink_(full);
    } else {
      std::fprintf(stderr, "%s\n", full.c_str());
      std::fflush(stderr);
    }
  }

 private:
  const std::function<void(const std::string&)> sink_;
  absl::Mutex mu_;
  std::string prefix_ ABSL_GUARDED_BY(mu_);
};

std::string Hostname() {
  char buf[256] = {0};
  if (gethostname(buf, sizeof(buf) - 1) != 0) return "";
  return buf;
}

// Runs one RPC with a deadline, cancellable through `stop`.
template <typename Fn>
grpc::Status Call(StopSignal* stop, absl::Duration timeout, Fn fn) {
  grpc::ClientContext context;
  context.set_deadline(absl::ToChronoTime(absl::Now() + timeout));
  stop->Track(&context);
  grpc::Status status = fn(&context);
  stop->Untrack();
  return status;
}

// Register is retried while the scheduler is not up (UNAVAILABLE, or an
// attempt timing out) and while every server slot is taken by a live node
// (RESOURCE_EXHAUSTED: a dead node's slot frees when its lease expires).
bool Retryable(const grpc::Status& s) {
  return s.error_code() == grpc::StatusCode::UNAVAILABLE ||
         s.error_code() == grpc::StatusCode::DEADLINE_EXCEEDED ||
         s.error_code() == grpc::StatusCode::RESOURCE_EXHAUSTED;
}

absl::Status Stopped() { return absl::CancelledError("stopped by a signal"); }

class Daemon {
 public:
  Daemon(const DaemonOptions& options, StopSignal* stop)
      : options_(options),
        stop_(stop),
        log_(options.log, options.shard >= 0
                              ? absl::StrCat("[server-", options.shard, "]")
                              : std::string("[server]")) {}

  ~Daemon() { Shutdown(); }

  // Runs the life cycle; errors after registration are reported to the
  // scheduler unless they come from it (job FAILED, scheduler lost).
  absl::Status Run() {
    absl::Status status = RunSteps();
    if (!status.ok() && report_errors_ &&
        status.code() != absl::StatusCode::kCancelled) {
      ReportError(status);
    }
    return status;
  }

  void Log(const std::string& line) { log_(line); }

 private:
  absl::Status RunSteps() {
    if (options_.scheduler.empty()) {
      return absl::InvalidArgumentError("--scheduler=host:port is required");
    }
    if (absl::Status s = StartServer(); !s.ok()) return s;
    scheduler_ = Scheduler::NewStub(MakeChannel(
        options_.scheduler, options_.rpc_metrics, options_.security));
    while (true) {
      const absl::Time assemble_deadline =
          absl::Now() + options_.assemble_timeout;
      if (absl::Status s = Register(assemble_deadline); !s.ok()) return s;
      if (job_finished_) return absl::OkStatus();
      if (absl::Status s = GetAssignment(assemble_deadline); !s.ok()) return s;
      if (absl::Status s = CreateShard(); !s.ok()) return s;
      absl::Status s = HeartbeatLoop();
      if (!reassemble_) return s;
      // Elastic resize: the job re-assembles with another dp from the
      // boundary's checkpoint (written: the shard stopped there).
      reassemble_ = false;
      log_(absl::StrCat("the job re-assembles after an elastic resize at "
                        "version ",
                        shard_->version(), "; registering again"));
      DropShard();
    }
  }

  // Stops serving the current shard and frees it once calls in flight are
  // over (every wait ends at Shutdown; no worker calls during a resize).
  void DropShard() {
    service_->SetShard(nullptr, nullptr);
    SetServing(server_.get(), false);
    StopServing();
    stop_->WaitFor(absl::Seconds(2));
    replicated_.reset();
    shard_.reset();
  }

  absl::Status StartServer() {
    ServiceOptions so;
    so.log = [this](const std::string& line) { log_(line); };
    service_ = std::make_unique<ParameterServerService>(std::move(so));
    GrpcServerOptions go;
    go.listen_address = options_.listen;
    go.max_message_bytes = 80 << 20;  // 64 MiB payload cap plus headers
    go.rpc_metrics = options_.rpc_metrics;
    go.security = options_.security;
    go.metrics = options_.metrics;
    go.log = [this](const std::string& line) { log_(line); };
    absl::StatusOr<StartedServer> started =
        StartGrpcServer(go, {service_.get()});
    if (!started.ok()) return started.status();
    server_ = std::move(started->server);
    address_ = absl::StrCat(options_.advertise_host, ":", started->port);
    log_(absl::StrCat("listening on ", options_.listen, " (port ",
                      started->port, "), advertised as ", address_, "; ",
                      options_.security.Describe()));
    return absl::OkStatus();
  }

  // Backoff sleep before the next retry; false if stopped or out of time.
  bool Backoff(absl::Duration* delay, absl::Time deadline) {
    const absl::Duration sleep = std::min(*delay, deadline - absl::Now());
    if (sleep <= absl::ZeroDuration()) return false;
    if (stop_->WaitFor(sleep)) return false;
    *delay = std::min(*delay * 2, absl::Seconds(2));
    return absl::Now() < deadline;
  }

  // Registers again with a restarted scheduler, as the shard it serves.
  absl::Status Rejoin() {
    RegisterRequest req = register_request_;
    req.set_rejoin(true);
    req.set_requested_rank(assignment_.shard());
    // The slot this node holds ("backup-<shard>" or "server-<shard>").
    req.set_backup(backup_slot_);
    req.set_step(shard_ != nullptr ? shard_->step_clock() : 0);
    if (replicated_ != nullptr) {
      req.set_epoch(replicated_->epoch());
      req.set_serving_primary(replicated_->role() ==
                              ReplicatedShard::Role::kPrimary);
    }
    RegisterResponse resp;
    grpc::Status s = Call(stop_, absl::Seconds(5), [&](grpc::ClientContext* ctx) {
      return scheduler_->Register(ctx, req, &resp);
    });
    if (!s.ok()) return FromGrpcStatus(s);
    node_id_ = resp.node_id();
    backup_slot_ = resp.backup_slot();
    incarnation_ = resp.incarnation();
    log_(absl::StrCat("the scheduler at ", options_.scheduler,
                      " restarted; rejoined as ", node_id_, " at step ",
                      req.step()));
    return absl::OkStatus();
  }

  absl::Status Register(absl::Time deadline) {
    RegisterRequest req;
    req.set_role(SERVER);
    req.set_address(address_);
    req.set_requested_rank(options_.shard);
    req.set_backup(options_.backup);
    req.set_hostname(Hostname());
    if (options_.shard >= 0 && !options_.checkpoint_dir.empty()) {
      absl::StatusOr<std::vector<int64_t>> steps =
          ListCompleteCheckpointSteps(options_.checkpoint_dir, options_.shard);
      if (!steps.ok()) return steps.status();
      if (!steps->empty()) {
        absl::StatusOr<CheckpointHeader> latest =
            ReadCheckpointHeader(CheckpointPath(options_.checkpoint_dir,
                                                steps->back(), options_.shard));
        if (!latest.ok()) return latest.status();
        req.set_checkpoint_partition_version(latest->partition_version);
        for (int64_t step : *steps) {
          absl::StatusOr<CheckpointHeader> h = ReadCheckpointHeader(
              CheckpointPath(options_.checkpoint_dir, step, options_.shard));
          if (h.ok() && h->partition_version == latest->partition_version) {
            req.add_checkpoint_steps(step);
          }
        }
        log_(absl::StrCat("complete checkpoints of shard ", options_.shard,
                          " in ", options_.checkpoint_dir, ": steps [",
                          absl::StrJoin(req.checkpoint_steps(), ", "), "]"));
      }
    }
    // Steps whose every shard file (of the layout that wrote them) is here:
    // resumable under any layout (server/reshard.h).
    if (!options_.checkpoint_dir.empty()) {
      absl::StatusOr<std::vector<int64_t>> full =
          ListRelayoutCheckpointSteps(options_.checkpoint_dir);
      if (!full.ok()) return full.status();
      for (int64_t step : *full) req.add_relayout_checkpoint_steps(step);
      if (!full->empty()) {
        log_(absl::StrCat("checkpoints with every shard's file in ",
                          options_.checkpoint_dir,
                          " (resumable under any layout): steps [",
                          absl::StrJoin(*full, ", "), "]"));
      }
    }
    absl::Duration delay = absl::Milliseconds(100);
    while (true) {
      RegisterResponse resp;
      grpc::Status s =
          Call(stop_, std::min(absl::Seconds(5), deadline - absl::Now()),
               [&](grpc::ClientContext* ctx) {
                 return scheduler_->Register(ctx, req, &resp);
               });
      if (stop_->stopped()) return Stopped();
      if (ReasonOf(FromGrpcStatus(s)) == JOB_FINISHED) {
        // A restarted (replicated) server coming back after the end.
        log_("the job already finished: nothing to serve; exiting");
        job_finished_ = true;
        report_errors_ = false;
        return absl::OkStatus();
      }
      if (s.ok()) {
        register_request_ = req;
        node_id_ = resp.node_id();
        backup_slot_ = resp.backup_slot();
        incarnation_ = resp.incarnation();
        lease_ = resp.lease_ms() > 0 ? absl::Milliseconds(resp.lease_ms())
                                     : absl::Seconds(10);
        log_(absl::StrCat("registered with the scheduler at ",
                          options_.scheduler, " as ", node_id_, " (lease ",
                          absl::FormatDuration(lease_), ")"));
        return absl::OkStatus();
      }
      if (!Retryable(s) || !Backoff(&delay, deadline)) {
        if (stop_->stopped()) return Stopped();
        return absl::Status(
            Retryable(s) ? absl::StatusCode::kDeadlineExceeded
                         : static_cast<absl::StatusCode>(s.error_code()),
            absl::StrCat("cannot register with the scheduler at ",
                         options_.scheduler, " within ",
                         absl::FormatDuration(options_.assemble_timeout), ": ",
                         s.error_message()));
      }
    }
  }

  absl::Status GetAssignment(absl::Time deadline) {
    assignment_asked_ = absl::Now();
    GetAssignmentRequest req;
    req.set_node_id(node_id_);
    absl::Duration delay = absl::Milliseconds(100);
    while (true) {
      grpc::Status s =
          Call(stop_, deadline - absl::Now(), [&](grpc::ClientContext* ctx) {
            return scheduler_->GetAssignment(ctx, req, &assignment_);
          });
      if (stop_->stopped()) return Stopped();
      if (s.ok()) return absl::OkStatus();
      const bool retry = s.error_code() == grpc::StatusCode::UNAVAILABLE;
      if (!retry || !Backoff(&delay, deadline)) {
        if (stop_->stopped()) return Stopped();
        return absl::Status(
            static_cast<absl::StatusCode>(s.error_code()),
            absl::StrCat("no assignment from the scheduler at ",
                         options_.scheduler, " within ",
                         absl::FormatDuration(options_.assemble_timeout), ": ",
                         s.error_message()));
      }
    }
  }

  absl::Status CreateShard() {
    const Assignment& a = assignment_;
    if (a.role() != SERVER && a.role() != ROLE_UNSPECIFIED) {
      return absl::FailedPreconditionError(
          absl::StrCat("the scheduler assigned role ", Role_Name(a.role()),
                       " to a parameter server"));
    }
    log_.SetPrefix(absl::StrCat("[server-", a.shard(), "]"));
    if (options_.shard >= 0 && a.shard() != options_.shard) {
      log_(absl::StrCat("requested shard ", options_.shard,
                        " but was assigned shard ", a.shard()));
    }
    ShardOptions so;
    so.shard = a.shard();
    so.spec = a.spec();
    if (a.partition().chunks_size() > 0) {
      so.map = a.partition();
    } else {
      absl::StatusOr<PartitionMap> map =
          ComputePartition(a.spec().model(), a.spec().layout().num_shards(),
                           a.spec().max_chunk_bytes());
      if (!map.ok()) return map.status();
      so.map = *std::move(map);
    }
    so.checkpoint_dir = options_.checkpoint_dir;
    so.start_step = a.start_step();
    so.init_from_safetensors = options_.init_from;
    so.wait_timeout = options_.wait_timeout;
    so.log = [this](const std::string& line) { log_(line); };
    if (!options_.init_from.empty() && a.start_step() > 0) {
      log_(absl::StrCat("resuming from step ", a.start_step(),
                        "; ignoring --init_from=", options_.init_from));
    }
    if (options_.checkpoint_dir.empty()) {
      log_("no --checkpoint_dir: this shard will not write checkpoints");
    }
    absl::StatusOr<std::unique_ptr<ParameterShard>> shard =
        ParameterShard::Create(std::move(so));
    if (!shard.ok()) return shard.status();
    shard_ = std::move(*shard);
    if (a.spec().layout().shard_backups() > 0) {
      if (absl::Status s = CreateReplication(); !s.ok()) return s;
    }
    service_->SetShard(shard_.get(), replicated_.get());
    SetServing(server_.get(), true);
    log_(absl::StrCat(
        replicated_ == nullptr ? "serving shard "
        : a.backup()           ? "backing up shard "
                               : "serving (replicated) shard ",
        a.shard(), " of ", a.spec().layout().num_shards(), " (",
        shard_->num_elements(), " parameters, version ", shard_->version(),
        ") for job '", a.spec().name(), "' at ", address_));
    return absl::OkStatus();
  }

  std::shared_ptr<BackupLink> LinkTo(const std::string& address) {
    return NewGrpcBackupLink(
        ParameterServer::NewStub(
            MakeChannel(address, options_.rpc_metrics, options_.security)),
        address, options_.wait_timeout);
  }

  absl::Status CreateReplication() {
    ReplicaStart start = ReplicaStartFor(assignment_, node_id_);
    start.options.log = [this](const std::string& line) { log_(line); };
    start.options.now = [] { return absl::Now(); };
    start.options.lease = lease_;
    absl::StatusOr<std::unique_ptr<ReplicatedShard>> rep =
        ReplicatedShard::Create(shard_.get(), std::move(start.options));
    if (!rep.ok()) return rep.status();
    replicated_ = std::move(*rep);
    replicated_->RenewLease(assignment_asked_);
    if (!start.attach_backup.empty()) {
      replicated_->AttachBackup(LinkTo(start.attach_backup),
                                /*needs_snapshot=*/false);
    }
    return absl::OkStatus();
  }

  absl::Status HeartbeatLoop() {
    const absl::Duration interval =
        std::max(lease_ / 3, absl::Milliseconds(20));
    absl::Time last_ok = absl::Now();
    while (true) {
      UpdateMetrics();
      HeartbeatRequest req;
      req.set_node_id(node_id_);
      req.set_incarnation(incarnation_);
      req.set_step(shard_->step_clock());  // steps, also in ASYNC mode
      req.set_eval_loss(std::nanf(""));
      if (replicated_ != nullptr) replicated_->FillHeartbeat(&req);
      HeartbeatResponse resp;
      const absl::Time sent = absl::Now();
      grpc::Status s = Call(stop_, std::max(interval, absl::Seconds(1)),
                            [&](grpc::ClientContext* ctx) {
                              return scheduler_->Heartbeat(ctx, req, &resp);
                            });
      if (stop_->stopped()) {
        log_("stop requested: shutting down");
        return absl::OkStatus();
      }
      if (s.error_code() == grpc::StatusCode::NOT_FOUND) {
        // The scheduler restarted and does not know this node: take this
        // shard back from it (it rebuilds its state from the nodes).
        if (absl::Status r = Rejoin(); !r.ok()) {
          log_(absl::StrCat("rejoining after a scheduler restart: ", r.message()));
        }
      } else if (s.ok()) {
        last_ok = absl::Now();
        if (resp.state() == FINISHED) return Finished();
        if (resp.fenced() && replicated_ == nullptr) {
          report_errors_ = false;
          return absl::AbortedError(
              "the scheduler gave this node's slot to a newer registration "
              "(this process was cut off or frozen past its lease); exiting");
        }
        if (resp.reassemble()) {
          reassemble_ = true;
          return absl::OkStatus();
        }
        if (replicated_ != nullptr) {
          absl::Status r = replicated_->FollowHeartbeat(
              resp, [this](const std::string& a) { return LinkTo(a); });
          if (!r.ok()) {
            report_errors_ = false;  // not a job error: it is restarted
            return r;
          }
          replicated_->RenewLease(sent);
        }
        if (resp.state() == FAILED) {
          report_errors_ = false;
          return absl::AbortedError(absl::StrCat(
              "the scheduler reports the job FAILED: ", resp.message()));
        }
      } else if (absl::Now() - last_ok >
                 std::max(lease_, options_.scheduler_grace)) {
        report_errors_ = false;
        return absl::UnavailableError(absl::StrCat(
            "the scheduler at ", options_.scheduler,
            " has been unreachable for ",
            absl::FormatDuration(
                absl::Trunc(absl::Now() - last_ok, absl::Milliseconds(1))),
            " (longer than --scheduler_grace_s=",
            absl::ToInt64Seconds(std::max(lease_, options_.scheduler_grace)),
            "): ", s.error_message()));
      } else if (!scheduler_down_logged_) {
        scheduler_down_logged_ = true;
        log_(absl::StrCat("the scheduler at ", options_.scheduler,
                          " is unreachable (", s.error_message(),
                          "); serving on, waiting up to ",
                          absl::FormatDuration(std::max(lease_, options_.scheduler_grace)),
                          " for it to come back"));
      }
      if (s.ok()) scheduler_down_logged_ = false;
      if (stop_->WaitFor(interval)) {
        log_("stop requested: shutting down");
        return absl::OkStatus();
      }
    }
  }

  void UpdateMetrics() {
    Metrics* m = options_.metrics;
    if (m == nullptr) return;
    auto set = [&](const char* name, const char* help, double v,
                   const prometheus::Labels& labels = {}) {
      SetGauge(m, name, help, v, labels);
    };
    set("lmps_parameter_version", "Optimizer steps applied to this shard.",
        static_cast<double>(shard_->version()));
    set("lmps_grad_norm", "Global gradient L2 norm of the last applied step.",
        shard_->last_grad_norm());
    set("lmps_staleness_steps",
        "Largest lead of a push over the slowest replica seen by this shard.",
        static_cast<double>(shard_->max_staleness_seen()), {{"kind", "max_seen"}});
    const std::vector<int64_t> clocks = shard_->replica_clocks();
    for (size_t r = 0; r < clocks.size(); ++r) {
      set("lmps_replica_clock_steps", "Steps each replica has fully pushed.",
          static_cast<double>(clocks[r]), {{"dp_rank", std::to_string(r)}});
    }
    set("lmps_shard_parameters", "fp32 parameters held by this shard.",
        static_cast<double>(shard_->num_elements()));
    set("lmps_node_info", "Identity of this node (value 1).", 1,
        {{"node_id", node_id_}, {"role", "server"},
         {"shard", std::to_string(assignment_.shard())}});
    long pages = 0, resident = 0;
    if (FILE* f = std::fopen("/proc/self/statm", "r")) {
      if (std::fscanf(f, "%ld %ld", &pages, &resident) != 2) resident = 0;
      std::fclose(f);
    }
    set("lmps_server_memory_bytes", "Resident memory of this server process.",
        static_cast<double>(resident) * static_cast<double>(sysconf(_SC_PAGESIZE)));
    if (replicated_ != nullptr) {
      set("lmps_shard_serving_primary",
          "1 if this node serves its shard as the primary (replicated jobs).",
          replicated_->role() == ReplicatedShard::Role::kPrimary ? 1 : 0);
      set("lmps_shard_backup_attached",
          "1 if this primary forwards to a backup (or is sending it a "
          "snapshot).",
          replicated_->backup_address().empty() ? 0 : 1);
      set("lmps_replication_forwarded_bytes",
          "Bytes of operations this primary forwarded to its backup.",
          static_cast<double>(replicated_->forwarded_bytes()));
    }
    // Counters only grow: add what is new since the last update.
    if (auto c = m->Counter("lmps_rejected_pushes_total",
                            "Pushes rejected, by reason.",
                            {{"reason", "nonfinite"}});
        c.ok()) {
      const double now = static_cast<double>(shard_->rejected_nonfinite_pushes());
      if (now > (*c)->Value()) (*c)->Increment(now - (*c)->Value());
    }
  }

  absl::Status Finished() {
    // Waits for an Apply (and its checkpoint) still in progress.
    StopServing();
    const absl::Status last = shard_->last_checkpoint_status();
    if (!last.ok()) {
      return WithMessage(last, absl::StrCat("job finished but the last "
                                            "checkpoint failed: ",
                                            last.message()));
    }
    log_(absl::StrCat("job finished at version ", shard_->version(),
                      "; exiting"));
    return absl::OkStatus();
  }

  void ReportError(const absl::Status& error) {
    if (node_id_.empty() || scheduler_ == nullptr) return;
    HeartbeatRequest req;
    req.set_node_id(node_id_);
    req.set_error(std::string(error.message()));
    HeartbeatResponse resp;
    grpc::ClientContext ctx;
    ctx.set_deadline(absl::ToChronoTime(absl::Now() + absl::Seconds(2)));
    scheduler_->Heartbeat(&ctx, req, &resp);  // best effort
  }

  // Ends every wait and refuses later calls; a replicated shard forwards
  // none of them (ReplicatedShard::Shutdown).
  void StopServing() {
    if (replicated_ != nullptr) {
      replicated_->Shutdown();
    } else if (shard_ != nullptr) {
      shard_->Shutdown();
    }
  }

  void Shutdown() {
    StopServing();
    if (server_ != nullptr) {
      SetServing(server_.get(), false);
      server_->Shutdown(absl::ToChronoTime(absl::Now() + absl::Seconds(2)));
    }
    service_.reset();
    server_.reset();
    replicated_.reset();
    shard_.reset();
  }

  const DaemonOptions& options_;
  StopSignal* const stop_;
  Logger log_;
  std::unique_ptr<ParameterServerService> service_;
  std::unique_ptr<grpc::Server> server_;
  std::unique_ptr<ParameterShard> shard_;
  std::unique_ptr<ReplicatedShard> replicated_;  // layout.shard_backups = 1
  absl::Time assignment_asked_;  // when the last GetAssignment started
  int64_t incarnation_ = 0;      // RegisterResponse.incarnation
  std::unique_ptr<Scheduler::Stub> scheduler_;
  std::string address_;
  std::string node_id_;
  bool backup_slot_ = false;  // holds "backup-<shard>" (RegisterResponse)
  RegisterRequest register_request_;  // for Rejoin
  bool scheduler_down_logged_ = false;
  absl::Duration lease_ = absl::Seconds(10);
  Assignment assignment_;
  bool report_errors_ = true;
  bool reassemble_ = false;  // the heartbeat said: elastic re-assembly
  bool job_finished_ = false;  // registered after the job FINISHED
};

}  // namespace

void StopSignal::Stop() {
  absl::MutexLock lock(&mu_);
  stopped_ = true;
  if (active_ != nullptr) active_->TryCancel();
}

bool StopSignal::stopped() const {
  absl::MutexLock lock(&mu_);
  return stopped_;
}

bool StopSignal::WaitFor(absl::Duration d) const {
  absl::MutexLock lock(&mu_);
  auto stopped = [this]()
                     ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return stopped_; };
  mu_.AwaitWithTimeout(absl::Condition(&stopped), d);
  return stopped_;
}

void StopSignal::Track(grpc::ClientContext* context) {
  absl::MutexLock lock(&mu_);
  active_ = context;
  if (stopped_) context->TryCancel();
}

void StopSignal::Untrack() {
  absl::MutexLock lock(&mu_);
  active_ = nullptr;
}

absl::Status RunParameterServer(const DaemonOptions& options,
                                StopSignal* stop) {
  Daemon daemon(options, stop);
  absl::Status status = daemon.Run();
  if (status.code() == absl::StatusCode::kCancelled && stop->stopped()) {
    daemon.Log("stop requested before the job started: shutting down");
    return absl::OkStatus();
  }
  if (!status.ok()) {
    daemon.Log(absl::StrCat("error: ", status.ToString()));
  }
  return status;
}

}  // namespace lmps
