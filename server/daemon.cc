#include "server/daemon.h"

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <memory>
#include <thread>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/synchronization/notification.h"
#include "common/clients/scheduler_client.h"
#include "common/model/partition.h"
#include "common/rpc/daemon_metrics.h"
#include "common/rpc/grpc_server.h"
#include "common/rpc/status_util.h"
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

absl::Status Stopped() { return absl::CancelledError("stopped by a signal"); }

class Daemon {
 public:
  Daemon(const DaemonOptions& options, StopSignal* stop)
      : options_(options),
        stop_(stop),
        log_(options.log, options.shard >= 0
                              ? absl::StrCat("[server-", options.shard, "]")
                              : std::string("[server]")) {}

  ~Daemon() {
    stop_->OnStop(nullptr);  // before client_ goes
    Shutdown();
  }

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
    client_ = std::make_unique<SchedulerClient>(
        Scheduler::NewStub(MakeChannel(options_.scheduler,
                                       options_.rpc_metrics,
                                       options_.security)),
        options_.scheduler);
    client_->set_backoff(absl::Milliseconds(100), absl::Seconds(2));
    client_->set_raw_errors(true);  // the daemon words its own errors
    // A stop (SIGTERM) cancels the call to the scheduler in flight.
    stop_->OnStop([client = client_.get()] { client->Cancel(); });
    while (true) {
      const absl::Time assemble_deadline =
          absl::Now() + options_.assemble_timeout;
      if (absl::Status s = Register(assemble_deadline); !s.ok()) return s;
      if (job_finished_) return absl::OkStatus();
      if (absl::Status s = GetAssignment(assemble_deadline); !s.ok()) return s;
      if (absl::Status s = CreateShardHeartbeating(); !s.ok()) return s;
      EnableRejoin();
      absl::Status s = HeartbeatUntilDone();
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
    so.shared_memory = options_.shared_memory;
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

  // A heartbeat answered NOT_FOUND (the scheduler restarted and does not
  // know this node) registers again, as the shard it serves: it takes this
  // shard back (the scheduler rebuilds its state from the nodes).
  void EnableRejoin() {
    RegisterRequest req = register_request_;
    req.set_requested_rank(assignment_.shard());
    RejoinOptions rejoin;
    rejoin.timeout = absl::Seconds(5);
    rejoin.fill = [this](RegisterRequest* req) {
      // The slot this node holds ("backup-<shard>" or "server-<shard>").
      req->set_backup(client_->backup_slot());
      req->set_step(shard_ != nullptr ? shard_->step_clock() : 0);
      if (replicated_ != nullptr) {
        req->set_epoch(replicated_->epoch());
        req->set_serving_primary(replicated_->role() ==
                                 ReplicatedShard::Role::kPrimary);
      }
    };
    rejoin.done = [this](const RegisterRequest& req,
                         const absl::StatusOr<RegisterResponse>& resp) {
      if (!resp.ok()) {
        rejoin_failed_ = true;
        log_(absl::StrCat("rejoining after a scheduler restart: ",
                          resp.status().message()));
        return;
      }
      log_(absl::StrCat("the scheduler at ", options_.scheduler,
                        " restarted; rejoined as ", resp->node_id(),
                        " at step ", req.step()));
    };
    client_->EnableRejoin(std::move(req), std::move(rejoin));
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
    const absl::StatusOr<RegisterResponse> resp =
        client_->Register(req, deadline - absl::Now());
    if (stop_->stopped()) return Stopped();
    if (ReasonOf(resp.status()) == JOB_FINISHED) {
      // A restarted (replicated) server coming back after the end.
      log_("the job already finished: nothing to serve; exiting");
      job_finished_ = true;
      report_errors_ = false;
      return absl::OkStatus();
    }
    if (!resp.ok()) {
      // Retries running out (the scheduler not up, or no free slot in
      // time) are a deadline missed.
      return absl::Status(
          SchedulerClient::IsRetryable(resp.status())
              ? absl::StatusCode::kDeadlineExceeded
              : resp.status().code(),
          absl::StrCat("cannot register with the scheduler at ",
                       options_.scheduler, " within ",
                       absl::FormatDuration(options_.assemble_timeout), ": ",
                       resp.status().message()));
    }
    register_request_ = req;
    log_(absl::StrCat("registered with the scheduler at ", options_.scheduler,
                      " as ", client_->node_id(), " (lease ",
                      absl::FormatDuration(client_->lease()), ")"));
    return absl::OkStatus();
  }

  absl::Status GetAssignment(absl::Time deadline) {
    assignment_asked_ = absl::Now();
    absl::StatusOr<Assignment> a =
        client_->WaitForAssignment(deadline - absl::Now());
    if (stop_->stopped()) return Stopped();
    if (!a.ok()) {
      return absl::Status(
          a.status().code(),
          absl::StrCat("no assignment from the scheduler at ",
                       options_.scheduler, " within ",
                       absl::FormatDuration(options_.assemble_timeout), ": ",
                       a.status().message()));
    }
    assignment_ = *std::move(a);
    return absl::OkStatus();
  }

  // CreateShard on another thread while this one keeps the lease with
  // heartbeats marked `starting` (the start step; their answers wait for the
  // serving heartbeats): initialising or loading a large shard can take
  // longer than the lease, and the scheduler would declare the shard dead.
  // `starting` tells the scheduler of a replicated job that they carry no
  // replication role yet.
  absl::Status CreateShardHeartbeating() {
    absl::Status created;
    absl::Notification done;
    std::thread creator([&] {
      if (options_.before_create_shard) options_.before_create_shard();
      created = CreateShard();
      done.Notify();
    });
    const absl::Duration interval =
        std::max(client_->lease() / 3, absl::Milliseconds(20));
    while (!done.WaitForNotificationWithTimeout(interval)) {
      HeartbeatRequest req;  // the client fills in node id and incarnation
      req.set_step(assignment_.start_step());
      req.set_eval_loss(std::nanf(""));
      req.set_starting(true);
      (void)client_->Heartbeat(req, std::max(interval, absl::Seconds(1)));
    }
    creator.join();
    return created;
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
    so.threads = options_.threads;
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
    if (!shard.ok() && a.start_step() == 0) {
      // Initialising (not resuming) depends only on the job spec and
      // --init_from: the same start would fail the same way, so it is
      // invalid input (server_main exits with 2 and lmps_local does not
      // restart the job for it).
      return absl::InvalidArgumentError(
          absl::StrCat("cannot initialise the shard: ",
                       shard.status().ToString()));
    }
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
    ReplicaStart start = ReplicaStartFor(assignment_, client_->node_id());
    start.options.log = [this](const std::string& line) { log_(line); };
    start.options.now = [] { return absl::Now(); };
    start.options.lease = client_->lease();
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

  absl::Status HeartbeatUntilDone() {
    const absl::Duration lease = client_->lease();
    const absl::Duration interval =
        std::max(lease / 3, absl::Milliseconds(20));
    absl::Time last_ok = absl::Now();
    while (true) {
      UpdateMetrics();
      HeartbeatRequest req;  // the client fills in node id and incarnation
      req.set_step(shard_->step_clock());  // steps, also in ASYNC mode
      req.set_eval_loss(std::nanf(""));
      if (replicated_ != nullptr) replicated_->FillHeartbeat(&req);
      const absl::Time sent = absl::Now();
      rejoin_failed_ = false;
      const absl::StatusOr<HeartbeatResponse> answer =
          client_->Heartbeat(req, std::max(interval, absl::Seconds(1)));
      const absl::Status& s = answer.status();
      if (stop_->stopped()) {
        log_("stop requested: shutting down");
        return absl::OkStatus();
      }
      if (rejoin_failed_ || s.code() == absl::StatusCode::kNotFound) {
        // The scheduler restarted and the rejoin failed (logged by the
        // rejoin hook, EnableRejoin): the next heartbeat tries again.
      } else if (s.ok()) {
        const HeartbeatResponse& resp = *answer;
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
                 std::max(lease, options_.scheduler_grace)) {
        report_errors_ = false;
        return absl::UnavailableError(absl::StrCat(
            "the scheduler at ", options_.scheduler,
            " has been unreachable for ",
            absl::FormatDuration(
                absl::Trunc(absl::Now() - last_ok, absl::Milliseconds(1))),
            " (longer than --scheduler_grace_s=",
            absl::ToInt64Seconds(std::max(lease, options_.scheduler_grace)),
            "): ", s.message()));
      } else if (!scheduler_down_logged_) {
        scheduler_down_logged_ = true;
        log_(absl::StrCat("the scheduler at ", options_.scheduler,
                          " is unreachable (", s.message(),
                          "); serving on, waiting up to ",
                          absl::FormatDuration(std::max(lease, options_.scheduler_grace)),
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
        {{"node_id", client_->node_id()}, {"role", "server"},
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
    if (client_ == nullptr) return;
    // Best effort (nothing is sent before a registration).
    client_->ReportError(error.message(), absl::Seconds(2)).IgnoreError();
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
  // Every call to the scheduler; cancelled by `stop_`.
  std::unique_ptr<SchedulerClient> client_;
  std::string address_;
  RegisterRequest register_request_;  // for the rejoin (EnableRejoin)
  bool rejoin_failed_ = false;  // in the current heartbeat (EnableRejoin)
  bool scheduler_down_logged_ = false;
  Assignment assignment_;
  bool report_errors_ = true;
  bool reassemble_ = false;  // the heartbeat said: elastic re-assembly
  bool job_finished_ = false;  // registered after the job FINISHED
};

}  // namespace

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
