#include "tests/sim/sim_job.h"

#include <algorithm>
#include <cstdio>

#include "absl/strings/str_cat.h"

namespace lmps {
namespace sim {

absl::StatusOr<ReplicateResponse> SimLink::Replicate(
    const std::vector<ReplicateRequest>& stream) {
  return job_->Forward(from_host_, to_, stream);
}

void Job::Log(const std::string& line) {
  const std::string stamped = absl::StrCat(
      "[", absl::FormatDuration(world_.now() - absl::FromUnixSeconds(1700000000)),
      "] ", line);
  if (options_.verbose) std::fprintf(stderr, "%s\n", stamped.c_str());
  log_.push_back(stamped);
  if (log_.size() > 60) log_.pop_front();
}

void Job::Violation(const std::string& what) {
  if (!violation_.empty()) return;
  violation_ = what;
  Log(absl::StrCat("VIOLATION: ", what));
}

void Job::OnHost(const std::string& host, std::function<void()> fn) {
  auto it = stalled_until_.find(host);
  if (it != stalled_until_.end() && world_.now() < it->second) {
    world_.At(it->second, [this, host, fn = std::move(fn)]() mutable {
      OnHost(host, std::move(fn));
    });
    return;
  }
  fn();
}

// ---------------------------------------------------------------- servers

void Job::StartServer(const std::string& host, bool backup_flag, int shard) {
  auto p = std::make_shared<ServerProc>();
  p->host = host;
  p->address = absl::StrCat(host, "#", ++incarnations_[host]);
  p->backup_flag = backup_flag;
  p->shard = shard;
  procs_[p->address] = p;
  current_[host] = p->address;
  Log(absl::StrCat(p->address, " starts"));
  Register(p);
}

void Job::Register(std::shared_ptr<ServerProc> p) {
  if (!p->alive || p->registered) return;
  RegisterRequest req;
  req.set_role(SERVER);
  req.set_address(p->address);
  req.set_requested_rank(p->shard);
  req.set_backup(p->backup_flag);
  world_.Send(p->host, kScheduler, [this, p, req] {
    absl::StatusOr<RegisterResponse> r = core_->Register(req);
    world_.Send(kScheduler, p->host, [this, p, r] {
      OnHost(p->host, [this, p, r] {
        if (!p->alive || p->registered) return;
        if (r.ok()) {
          p->registered = true;
          p->node_id = r->node_id();
          p->incarnation = r->incarnation();
          RequestAssignment(p);
        } else if (r.status().code() == absl::StatusCode::kFailedPrecondition) {
          Exit(p, absl::StrCat("cannot register: ", r.status().message()),
               absl::InfiniteDuration());
        }
      });
    });
  });
  world_.After(absl::Milliseconds(50), [this, p] { Register(p); });
}

void Job::RequestAssignment(std::shared_ptr<ServerProc> p) {
  if (!p->alive || p->rep != nullptr) return;
  const std::string id = p->node_id;
  p->assignment_asked = world_.now();
  world_.Send(p->host, kScheduler, [this, p, id] {
    core_->GetAssignmentAsync(
        id, world_.now() + absl::Seconds(10),
        [this, p](absl::StatusOr<Assignment> a) {
          world_.Send(kScheduler, p->host, [this, p, a] {
            OnHost(p->host, [this, p, a] {
              if (!p->alive || p->rep != nullptr) return;
              if (a.ok()) {
                Serve(p, *a);
              } else if (a.status().code() ==
                         absl::StatusCode::kFailedPrecondition) {
                Exit(p, std::string(a.status().message()),
                     absl::InfiniteDuration());
              }
            });
          });
        });
  });
  world_.After(absl::Milliseconds(100), [this, p] { RequestAssignment(p); });
}

void Job::Serve(std::shared_ptr<ServerProc> p, const Assignment& a) {
  ShardOptions so;
  so.shard = a.shard();
  so.spec = a.spec();
  so.map = a.partition();
  so.start_step = a.start_step();
  so.wait_timeout = absl::Nanoseconds(1);  // calls poll: never block
  absl::StatusOr<std::unique_ptr<ParameterShard>> shard =
      ParameterShard::Create(std::move(so));
  if (!shard.ok()) {
    Violation(absl::StrCat(p->address, ": cannot create its shard: ",
                           shard.status().ToString()));
    return;
  }
  p->shard_state = std::move(*shard);
  ReplicaStart start = ReplicaStartFor(a, p->node_id);
  start.options.log = [this, p](const std::string& line) {
    Log(absl::StrCat(p->address, ": ", line));
  };
  start.options.now = [this] { return world_.now(); };
  start.options.lease = kLease;
  absl::StatusOr<std::unique_ptr<ReplicatedShard>> rep =
      ReplicatedShard::Create(p->shard_state.get(), std::move(start.options));
  if (!rep.ok()) {
    Violation(absl::StrCat(p->address, ": ", rep.status().ToString()));
    return;
  }
  p->rep = std::move(*rep);
  p->rep->RenewLease(p->assignment_asked);
  if (!start.attach_backup.empty()) {
    p->rep->AttachBackup(
        std::make_shared<SimLink>(this, p->host, start.attach_backup), false);
  }
  Log(absl::StrCat(p->address, " serves shard ", a.shard(), " as ",
                   a.backup() ? "backup" : "primary", " in epoch ", a.epoch(),
                   a.needs_snapshot() ? " (awaiting a snapshot)" : ""));
  ServerHeartbeat(p);
}

void Job::ServerHeartbeat(std::shared_ptr<ServerProc> p) {
  if (!p->alive) return;
  world_.After(kLease / 3, [this, p] {
    OnHost(p->host, [this, p] { ServerHeartbeat(p); });
  });
  HeartbeatRequest req;
  req.set_node_id(p->node_id);
  req.set_incarnation(p->incarnation);
  req.set_step(p->shard_state->step_clock());
  p->rep->FillHeartbeat(&req);
  const absl::Time sent = world_.now();
  world_.Send(p->host, kScheduler, [this, p, req, sent] {
    absl::StatusOr<HeartbeatResponse> r = core_->Heartbeat(req);
    if (!r.ok()) return;
    HeartbeatResponse resp = *r;
    world_.Send(kScheduler, p->host, [this, p, resp, sent] {
      OnHost(p->host, [this, p, resp, sent] {
        if (!p->alive) return;
        if (resp.state() == FINISHED || resp.state() == FAILED) {
          Exit(p, absl::StrCat("the job is ", JobState_Name(resp.state())),
               absl::InfiniteDuration());
          return;
        }
        absl::Status s = p->rep->FollowHeartbeat(
            resp, [this, p](const std::string& address) {
              return std::make_shared<SimLink>(this, p->host, address);
            });
        if (!s.ok()) {
          Exit(p, std::string(s.message()),
               world_.UniformDuration(absl::Milliseconds(5),
                                      absl::Milliseconds(200)));
          return;
        }
        p->rep->RenewLease(sent);
      });
    });
  });
}

void Job::Exit(std::shared_ptr<ServerProc> p, const std::string& why,
               absl::Duration restart_after) {
  if (!p->alive) return;
  p->alive = false;
  Log(absl::StrCat(p->address, " exits: ", why));
  if (restart_after == absl::InfiniteDuration()) return;
  world_.After(restart_after, [this, p] {
    if (current_[p->host] != p->address || Terminal()) return;
    StartServer(p->host, p->backup_flag, p->shard);
  });
}

absl::StatusOr<ReplicateResponse> Job::Forward(
    const std::string& from_host, const std::string& to,
    const std::vector<ReplicateRequest>& stream) {
  if (options_.mutation == Mutation::kLyingLink && !stream.empty() &&
      stream[0].op_case() != ReplicateRequest::kSnapshot) {
    ReplicateResponse fake;
    fake.set_epoch(stream[0].epoch());
    return fake;
  }
  std::shared_ptr<ServerProc> target = Proc(to);
  if (target == nullptr || !target->alive || target->rep == nullptr ||
      !world_.Reachable(from_host, target->host)) {
    return absl::UnavailableError(absl::StrCat("sim: ", to, " unreachable"));
  }
  if (Stalled(target->host)) {
    return absl::DeadlineExceededError(absl::StrCat("sim: ", to, " stalled"));
  }
  absl::StatusOr<ReplicateResponse> r = target->rep->Replicate(stream);
  if (!world_.Reachable(target->host, from_host)) {
    return absl::DeadlineExceededError("sim: the answer was lost");
  }
  return r;
}


}  // namespace sim
}  // namespace lmps
