#include "tests/sim/replication_sim.h"

#include <algorithm>
#include <cstdio>
#include <deque>
#include <memory>
#include <optional>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/job_spec.h"
#include "common/partition.h"
#include "proto/lmps.pb.h"
#include "server/replication.h"
#include "server/scheduler/scheduler_core.h"
#include "server/shard.h"
#include "server/tensor_codec.h"
#include "tests/sim/sim_world.h"
#include "worker/shard_failover.h"

namespace lmps {
namespace sim {
namespace {

constexpr int kShards = 2;
constexpr int kDp = 2;
constexpr int kSteps = 16;
constexpr absl::Duration kLease = absl::Milliseconds(200);
constexpr absl::Duration kTick = absl::Milliseconds(20);
// A call to a dead or unreachable host fails after this (connection
// refused / reset); one whose answer never comes, after kRpcTimeout.
constexpr absl::Duration kConnectFail = absl::Milliseconds(5);
constexpr absl::Duration kRpcTimeout = absl::Milliseconds(40);
constexpr absl::Duration kNotReadyRetry = absl::Milliseconds(1);
constexpr absl::Duration kFailoverTimeout = absl::Seconds(20);
constexpr absl::Duration kLiveness = absl::Seconds(30);
const char kScheduler[] = "scheduler";

// A tiny model (1 layer, width 8, vocabulary 16) in chunks of <= 64
// elements, AdamW with clipping, SYNC, dp 2, 2 replicated shards.
JobSpec Spec() {
  JobSpec spec;
  spec.set_name("sim");
  ModelConfig* m = spec.mutable_model();
  m->set_n_layer(1);
  m->set_n_head(2);
  m->set_n_embd(8);
  m->set_block_size(4);
  m->set_vocab_size(16);
  spec.mutable_layout()->set_dp(kDp);
  spec.mutable_layout()->set_num_shards(kShards);
  spec.mutable_layout()->set_shard_backups(1);
  spec.mutable_train()->set_batch_size(4);
  spec.mutable_train()->set_steps(kSteps);
  spec.mutable_optimizer()->set_grad_clip(0.05f);
  spec.set_max_chunk_bytes(256);
  spec.set_max_message_bytes(1024);
  ApplyJobSpecDefaults(&spec);
  return spec;
}

std::string HostOf(const std::string& address) {
  return address.substr(0, address.find('#'));
}

// Version, parameters and optimizer state of a shard, as bytes.
std::string StateBytes(const ParameterShard& shard) {
  std::string out = absl::StrCat(shard.version(), ":");
  for (const ChunkData& chunk : shard.Snapshot().chunks) {
    out.append(reinterpret_cast<const char*>(chunk.params.data()),
               4 * chunk.params.size());
    for (const auto& s : chunk.state) {
      out.append(reinterpret_cast<const char*>(s.data()), 4 * s.size());
    }
  }
  return out;
}

// One process of a parameter server (an incarnation on its host).
struct ServerProc {
  std::string host;     // "server-1", "backup-1": where it runs
  std::string address;  // host#incarnation
  bool backup_flag = false;  // --backup
  int shard = 0;
  bool alive = true;
  bool registered = false;
  std::string node_id;
  int64_t incarnation = 0;
  absl::Time assignment_asked;
  std::unique_ptr<ParameterShard> shard_state;
  std::unique_ptr<ReplicatedShard> rep;
};

enum class Phase { kPull, kPush, kGradNorm, kApply, kDone };

const char* PhaseName(Phase p) {
  switch (p) {
    case Phase::kPull: return "Pull";
    case Phase::kPush: return "Push";
    case Phase::kGradNorm: return "GradNorm";
    case Phase::kApply: return "Apply";
    case Phase::kDone: return "done";
  }
  return "?";
}

struct WorkerProc {
  int rank = 0;
  std::string host;
  std::string node_id;
  bool assigned = false;
  std::vector<ShardFailover> failover;
  int64_t step = 0;
  Phase phase = Phase::kPull;
  int pending = 0;
  std::vector<uint64_t> inflight;  // per shard: the attempt awaited, 0: none
  // Per shard: (tensor, chunk) -> pulled parameters.
  std::vector<std::map<std::pair<std::string, int>, std::vector<float>>> params;
  std::vector<double> sum_squares;
  uint64_t attempts = 0;
  std::string gave_up;
};

// What a server answers a worker's call.
struct Answer {
  absl::Status status;
  std::vector<PullResponse> pull;
  double sum_squares = 0;
  int64_t version = 0;
};

class Job;

class SimLink final : public BackupLink {
 public:
  SimLink(Job* job, std::string from_host, std::string to)
      : job_(job), from_host_(std::move(from_host)), to_(std::move(to)) {}
  absl::StatusOr<ReplicateResponse> Replicate(
      const std::vector<ReplicateRequest>& stream) override;
  std::string address() const override { return to_; }

 private:
  Job* const job_;
  const std::string from_host_;
  const std::string to_;
};

class Job {
 public:
  Job(const SimOptions& options, const std::map<int, std::string>& reference)
      : options_(options), reference_(reference), world_(options.seed) {}

  SimResult Run();
  absl::StatusOr<ReplicateResponse> Forward(
      const std::string& from_host, const std::string& to,
      const std::vector<ReplicateRequest>& stream);
  std::map<int, std::string> FinalStates() const { return final_states_; }

 private:
  void Log(const std::string& line);
  void Violation(const std::string& what);
  bool Terminal() { return core_->CurrentState() == FINISHED ||
                           core_->CurrentState() == FAILED; }
  bool Stalled(const std::string& host) const {
    auto it = stalled_until_.find(host);
    return it != stalled_until_.end() && world_.now() < it->second;
  }
  // Runs `fn` on `host` now, or when its stall ends.
  void OnHost(const std::string& host, std::function<void()> fn);

  // Servers.
  void StartServer(const std::string& host, bool backup_flag, int shard);
  void Register(std::shared_ptr<ServerProc> p);
  void RequestAssignment(std::shared_ptr<ServerProc> p);
  void Serve(std::shared_ptr<ServerProc> p, const Assignment& a);
  void ServerHeartbeat(std::shared_ptr<ServerProc> p);
  void Exit(std::shared_ptr<ServerProc> p, const std::string& why,
            absl::Duration restart_after);
  std::shared_ptr<ServerProc> Proc(const std::string& address) const {
    auto it = procs_.find(address);
    return it == procs_.end() ? nullptr : it->second;
  }

  // Workers.
  void StartWorker(int rank);
  void WorkerHeartbeat(WorkerProc* w);
  void StartPhase(WorkerProc* w);
  void Attempt(WorkerProc* w, int k);
  Answer Handle(const std::string& address, int k, Phase phase, int64_t step,
                int rank, const std::vector<PushRequest>& push,
                double global_sum_squares);
  void OnResult(WorkerProc* w, int k, Answer answer);
  std::vector<PushRequest> Gradient(const WorkerProc& w, int k) const;
  absl::StatusOr<ShardFailover::Nodes> Resolve(WorkerProc* w, int k);

  void ScheduleFaults();
  void CheckInvariants();
  void CheckFailure();
  std::string Describe();

  const SimOptions options_;
  const std::map<int, std::string>& reference_;
  SimWorld world_;
  JobSpec spec_;
  PartitionMap map_;
  std::unique_ptr<SchedulerCore> core_;
  std::map<std::string, std::shared_ptr<ServerProc>> procs_;  // by address
  std::map<std::string, int> incarnations_;                   // by host
  std::map<std::string, std::string> current_;  // host -> live address
  std::map<std::string, absl::Time> stalled_until_;
  std::vector<std::unique_ptr<WorkerProc>> workers_;
  std::vector<int64_t> acked_version_ = std::vector<int64_t>(kShards, 0);
  // (shard, epoch) -> the address that served as primary in it.
  std::map<std::pair<int, int64_t>, std::string> primary_of_epoch_;
  std::deque<std::string> log_;
  std::vector<std::string> faults_;
  std::string violation_;
  bool failure_checked_ = false;
  absl::Time heal_at_;
  std::map<int, std::string> final_states_;
};

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

// ---------------------------------------------------------------- workers

void Job::StartWorker(int rank) {
  auto w = std::make_unique<WorkerProc>();
  w->rank = rank;
  w->host = absl::StrCat("w", rank);
  w->inflight.assign(kShards, 0);
  w->params.resize(kShards);
  w->sum_squares.assign(kShards, 0);
  WorkerProc* wp = w.get();
  workers_.push_back(std::move(w));
  RegisterRequest req;
  req.set_role(WORKER);
  req.set_requested_rank(rank);
  req.set_hostname(wp->host);
  // Registration and assignment of workers are not what is under test:
  // they are retried until they get through.
  std::function<void()> reg = [this, wp, req] {
    if (!wp->node_id.empty()) return;
    absl::StatusOr<RegisterResponse> r = core_->Register(req);
    if (r.ok()) wp->node_id = r->node_id();
  };
  // Poll every 10 ms until registered and assigned.
  auto poll = std::make_shared<std::function<void()>>();
  *poll = [this, wp, reg, poll] {
    if (wp->assigned) return;
    reg();
    if (!wp->node_id.empty()) {
      core_->GetAssignmentAsync(
          wp->node_id, world_.now(), [this, wp](absl::StatusOr<Assignment> a) {
            if (!a.ok() || wp->assigned) return;
            wp->assigned = true;
            for (int k = 0; k < kShards; ++k) {
              wp->failover.emplace_back(
                  k,
                  ShardFailover::Nodes{a->shard_addresses(k),
                                       a->backup_addresses(k)},
                  kFailoverTimeout);
            }
            wp->step = a->start_step();
            world_.After(absl::ZeroDuration(), [this, wp] {
              WorkerHeartbeat(wp);
              StartPhase(wp);
            });
          });
    }
    world_.After(absl::Milliseconds(10), *poll);
  };
  world_.After(absl::Milliseconds(1), *poll);
}

void Job::WorkerHeartbeat(WorkerProc* w) {
  if (Terminal()) return;
  world_.After(kLease / 3, [this, w] { WorkerHeartbeat(w); });
  HeartbeatRequest req;
  req.set_node_id(w->node_id);
  req.set_step(w->step);
  req.set_done(w->phase == Phase::kDone);
  world_.Send(w->host, kScheduler, [this, req] { (void)core_->Heartbeat(req); });
}

void Job::StartPhase(WorkerProc* w) {
  if (w->phase == Phase::kDone || !w->gave_up.empty()) return;
  w->pending = kShards;
  for (int k = 0; k < kShards; ++k) {
    w->failover[k].Begin(world_.now());
    Attempt(w, k);
  }
}

std::vector<PushRequest> Job::Gradient(const WorkerProc& w, int k) const {
  std::vector<PushRequest> stream;
  for (const ChunkDesc& c : ChunksOfShard(map_, k)) {
    const int64_t n = c.end() - c.begin();
    auto it = w.params[k].find({c.tensor(), c.index()});
    std::vector<float> g(n);
    for (int64_t i = 0; i < n; ++i) {
      const float p = it == w.params[k].end() ? 0.f : it->second[i];
      g[i] = 0.05f * p +
             0.01f * static_cast<float>(
                         ((c.begin() + i) * 7 + w.step * 3 + w.rank * 5) % 11 -
                         5);
    }
    PushRequest& m = stream.emplace_back();
    m.set_worker_id(w.node_id);
    m.set_dp_rank(w.rank);
    m.set_step(w.step);
    m.set_partition_version(map_.version());
    ChunkSlice* s = m.add_slices();
    s->set_tensor(c.tensor());
    s->set_chunk(c.index());
    s->set_dtype(F32);
    EncodePayload(F32, g.data(), n, s->mutable_data());
  }
  return stream;
}

void Job::Attempt(WorkerProc* w, int k) {
  const uint64_t id = ++w->attempts;
  w->inflight[k] = id;
  const std::string address = w->failover[k].current();
  const std::string host = HostOf(address);
  const Phase phase = w->phase;
  const int64_t step = w->step;
  std::vector<PushRequest> push;
  if (phase == Phase::kPush) push = Gradient(*w, k);
  double gss = 0;
  for (double s : w->sum_squares) gss += s;
  auto deliver = [this, w, k, id, address, host, phase, step, push, gss] {
    OnHost(host, [this, w, k, id, address, host, phase, step, push, gss] {
      Answer a = Handle(address, k, phase, step, w->rank, push, gss);
      world_.Send(host, w->host, [this, w, k, id, a] {
        if (w->inflight[k] == id) OnResult(w, k, a);
      });
    });
  };
  std::shared_ptr<ServerProc> p = Proc(address);
  const bool up = p != nullptr && p->alive;
  if (!up || !world_.Send(w->host, host, deliver)) {
    world_.After(kConnectFail, [this, w, k, id, address] {
      if (w->inflight[k] != id) return;
      Answer a;
      a.status = absl::UnavailableError(
          absl::StrCat("sim: cannot reach ", address));
      OnResult(w, k, a);
    });
    return;
  }
  world_.After(kRpcTimeout, [this, w, k, id, address] {
    if (w->inflight[k] != id) return;
    Answer a;
    a.status = absl::UnavailableError(
        absl::StrCat("sim: no answer from ", address));
    OnResult(w, k, a);
  });
}

Answer Job::Handle(const std::string& address, int k, Phase phase,
                   int64_t step, int rank, const std::vector<PushRequest>& push,
                   double global_sum_squares) {
  Answer a;
  std::shared_ptr<ServerProc> p = Proc(address);
  if (p == nullptr || !p->alive) {
    a.status = absl::UnavailableError(absl::StrCat(address, ": refused"));
    return a;
  }
  if (p->rep == nullptr) {
    a.status = absl::UnavailableError(absl::StrCat(address, ": not serving yet"));
    return a;
  }
  if (options_.mutation == Mutation::kSelfPromotion &&
      p->rep->role() == ReplicatedShard::Role::kBackup &&
      !p->rep->awaiting_snapshot()) {
    // The old protocol: a backup called by a worker promotes itself.
    HeartbeatResponse promote;
    promote.set_promote(true);
    promote.set_epoch(p->rep->epoch() + 1);
    (void)p->rep->FollowHeartbeat(promote, nullptr);
  }
  ParameterShard* shard = p->shard_state.get();
  switch (phase) {
    case Phase::kPull: {
      a.status = p->rep->CheckServing();
      if (!a.status.ok()) break;
      PullRequest req;
      req.set_step(step);
      req.set_partition_version(map_.version());
      req.set_dtype(F32);
      absl::StatusOr<std::vector<PullResponse>> r =
          shard->Pull(req, absl::InfinitePast());
      a.status = r.status();
      if (r.ok()) a.pull = *std::move(r);
      break;
    }
    case Phase::kPush: {
      absl::StatusOr<PushResponse> r = p->rep->Push(push);
      a.status = r.status();
      break;
    }
    case Phase::kGradNorm: {
      a.status = p->rep->CheckServing();
      if (!a.status.ok()) break;
      absl::StatusOr<double> r = shard->GradNorm(step, absl::InfinitePast());
      a.status = r.status();
      if (r.ok()) a.sum_squares = *r;
      break;
    }
    case Phase::kApply: {
      absl::StatusOr<int64_t> r = p->rep->Apply(step, global_sum_squares);
      a.status = r.status();
      if (r.ok()) a.version = *r;
      break;
    }
    case Phase::kDone:
      break;
  }
  if (a.status.ok() && shard->version() < acked_version_[k]) {
    Violation(absl::StrCat(address, " answered ", PhaseName(phase),
                           " of step ", step, " from rank ", rank,
                           " as shard ", k, "'s primary at version ",
                           shard->version(), ", but version ",
                           acked_version_[k], " was acknowledged"));
  }
  return a;
}

absl::StatusOr<ShardFailover::Nodes> Job::Resolve(WorkerProc* w, int k) {
  if (!world_.Reachable(w->host, kScheduler)) {
    return absl::UnavailableError("sim: scheduler unreachable");
  }
  std::optional<absl::StatusOr<Assignment>> got;
  core_->GetAssignmentAsync(w->node_id, world_.now(),
                            [&got](absl::StatusOr<Assignment> a) { got = a; });
  if (!got.has_value() || !got->ok()) {
    return absl::UnavailableError("sim: no assignment");
  }
  return ShardFailover::Nodes{(*got)->shard_addresses(k),
                              (*got)->backup_addresses(k)};
}

void Job::OnResult(WorkerProc* w, int k, Answer answer) {
  w->inflight[k] = 0;
  const absl::Status& s = answer.status;
  if (s.code() == absl::StatusCode::kDeadlineExceeded) {
    // Pull or GradNorm not ready yet on this node: ask it again.
    world_.After(kNotReadyRetry, [this, w, k] { Attempt(w, k); });
    return;
  }
  if (s.code() == absl::StatusCode::kUnavailable) {
    absl::StatusOr<absl::Duration> pause = w->failover[k].Failed(
        s, world_.now(), [this, w, k] { return Resolve(w, k); });
    if (!pause.ok()) {
      w->gave_up = std::string(pause.status().message());
      Log(absl::StrCat(w->node_id, " gives up: ", w->gave_up));
      return;
    }
    world_.After(*pause, [this, w, k] { Attempt(w, k); });
    return;
  }
  if (!s.ok()) {
    w->gave_up = s.ToString();
    Log(absl::StrCat(w->node_id, " fails: ", w->gave_up));
    if (!Terminal()) {
      Violation(absl::StrCat(w->node_id, " got ", s.ToString(), " from shard ",
                             k, " in ", PhaseName(w->phase), " of step ",
                             w->step));
    }
    return;
  }
  switch (w->phase) {
    case Phase::kPull:
      w->params[k].clear();
      for (const PullResponse& r : answer.pull) {
        for (const ChunkSlice& slice : r.slices()) {
          std::vector<float>& v = w->params[k][{slice.tensor(), slice.chunk()}];
          const int64_t n = static_cast<int64_t>(slice.data().size() / 4);
          v.resize(std::max<int64_t>(v.size(), slice.offset() + n));
          DecodePayload(F32, slice.data(), v.data() + slice.offset());
        }
      }
      break;
    case Phase::kGradNorm:
      w->sum_squares[k] = answer.sum_squares;
      break;
    case Phase::kApply:
      acked_version_[k] = std::max(acked_version_[k], answer.version);
      break;
    default:
      break;
  }
  if (--w->pending > 0) return;
  switch (w->phase) {
    case Phase::kPull: w->phase = Phase::kPush; break;
    case Phase::kPush: w->phase = Phase::kGradNorm; break;
    case Phase::kGradNorm: w->phase = Phase::kApply; break;
    case Phase::kApply:
      ++w->step;
      w->phase = w->step >= kSteps ? Phase::kDone : Phase::kPull;
      break;
    case Phase::kDone: break;
  }
  StartPhase(w);
}

// ------------------------------------------------------------ the schedule

void Job::ScheduleFaults() {
  const absl::Time start = world_.now() + absl::Milliseconds(20);
  const absl::Duration window =
      world_.UniformDuration(absl::Milliseconds(50), absl::Milliseconds(600));
  heal_at_ = start + window + absl::Milliseconds(600);
  std::vector<std::string> servers, hosts = {kScheduler};
  for (int k = 0; k < kShards; ++k) {
    servers.push_back(absl::StrCat("server-", k));
    servers.push_back(absl::StrCat("backup-", k));
  }
  for (const std::string& s : servers) hosts.push_back(s);
  for (int r = 0; r < kDp; ++r) hosts.push_back(absl::StrCat("w", r));
  auto pick = [this](const std::vector<std::string>& v) {
    return v[world_.UniformInt(0, static_cast<int64_t>(v.size()) - 1)];
  };
  NetOptions net;
  net.drop_probability = world_.Chance(0.5) ? world_.Uniform() * 0.05 : 0;
  net.spike_probability = world_.Uniform() * 0.1;
  world_.At(start, [this, net] { world_.set_net(net); });
  faults_.push_back(absl::StrCat("drops ", net.drop_probability, ", spikes ",
                                 net.spike_probability));
  const int n = static_cast<int>(world_.UniformInt(1, 4));
  for (int i = 0; i < n; ++i) {
    const absl::Time at = start + world_.UniformDuration(absl::ZeroDuration(),
                                                         window);
    const std::string when = absl::FormatDuration(at - start);
    const double kind = world_.Uniform();
    if (kind < 0.4) {
      const std::string host = pick(servers);
      const absl::Duration restart =
          world_.UniformDuration(absl::Milliseconds(5), absl::Milliseconds(400));
      faults_.push_back(absl::StrCat("+", when, " kill ", host, ", restart ",
                                     absl::FormatDuration(restart), " later"));
      world_.At(at, [this, host, restart] {
        std::shared_ptr<ServerProc> p = Proc(current_[host]);
        if (p != nullptr) Exit(p, "SIGKILL (fault)", restart);
      });
    } else if (kind < 0.75) {
      const std::string a = pick(hosts);
      std::string b = pick(hosts);
      if (a == b) b = kScheduler == a ? servers[0] : kScheduler;
      const absl::Duration d =
          world_.UniformDuration(absl::Milliseconds(20), absl::Milliseconds(600));
      faults_.push_back(absl::StrCat("+", when, " partition ", a, " | ", b,
                                     " for ", absl::FormatDuration(d)));
      world_.At(at, [this, a, b] { world_.Cut(a, b); });
      world_.At(at + d, [this, a, b] { world_.Heal(a, b); });
    } else {
      const std::string host = pick(servers);
      const absl::Duration d =
          world_.UniformDuration(absl::Milliseconds(50), absl::Milliseconds(500));
      faults_.push_back(absl::StrCat("+", when, " stall ", host, " for ",
                                     absl::FormatDuration(d)));
      world_.At(at, [this, host, d] {
        stalled_until_[host] = std::max(stalled_until_[host], world_.now() + d);
      });
    }
  }
  world_.At(heal_at_, [this] {
    world_.HealAll();
    world_.set_net(NetOptions());
    Log("every fault healed");
  });
}

// -------------------------------------------------------------- invariants

void Job::CheckInvariants() {
  for (const auto& [address, p] : procs_) {
    if (!p->alive || p->rep == nullptr ||
        p->rep->role() != ReplicatedShard::Role::kPrimary) {
      continue;
    }
    const auto key = std::make_pair(p->shard, p->rep->epoch());
    auto [it, inserted] = primary_of_epoch_.emplace(key, address);
    if (!inserted && it->second != address) {
      Violation(absl::StrCat("two primaries of shard ", p->shard,
                             " in epoch ", key.second, ": ", it->second,
                             " and ", address));
    }
  }
  if (!failure_checked_ && core_->CurrentState() == FAILED) {
    failure_checked_ = true;
    CheckFailure();
  }
}

// The job failed: no live node the scheduler hears may hold a complete copy
// of a shard (it must have been promoted instead).
void Job::CheckFailure() {
  const JobStatus status = core_->Status();
  Log(absl::StrCat("the job FAILED: ", status.message()));
  std::map<std::string, NodeStatus> nodes;
  for (const NodeStatus& n : status.nodes()) nodes[n.node_id()] = n;
  for (int k = 0; k < kShards; ++k) {
    // Only the shard the failure is about.
    const std::string m = status.message();
    if (m.find(absl::StrCat("shard ", k, " lost")) == std::string::npos &&
        m.find(absl::StrCat("shard ", k, " restarted")) == std::string::npos) {
      continue;
    }
    bool has_primary = false;
    for (const auto& [address, p] : procs_) {
      if (p->alive && p->shard == k && p->rep != nullptr &&
          p->rep->role() == ReplicatedShard::Role::kPrimary) {
        has_primary = true;
      }
    }
    if (has_primary) continue;
    for (const auto& [address, p] : procs_) {
      if (!p->alive || p->shard != k || p->rep == nullptr) continue;
      auto n = nodes.find(p->node_id);
      const bool heard = n != nodes.end() && n->second.alive() &&
                         n->second.address() == address &&
                         !world_.IsCut(p->host, kScheduler) &&
                         !Stalled(p->host);
      const bool complete =
          p->rep->role() == ReplicatedShard::Role::kBackup &&
          !p->rep->awaiting_snapshot() && n != nodes.end() &&
          p->rep->epoch() == n->second.epoch() &&
          p->shard_state->version() >= acked_version_[k];
      if (heard && complete) {
        Violation(absl::StrCat("the job failed (", status.message(), ") while ",
                               address, " held a complete copy of shard ", k,
                               " (epoch ", p->rep->epoch(), ", version ",
                               p->shard_state->version(), ")"));
      }
    }
  }
}

std::string Job::Describe() {
  std::vector<std::string> parts;
  for (const auto& w : workers_) {
    parts.push_back(absl::StrCat(w->node_id, " step ", w->step, " ",
                                 PhaseName(w->phase),
                                 w->gave_up.empty() ? "" : " (gave up)"));
  }
  for (const auto& [address, p] : procs_) {
    if (!p->alive || p->rep == nullptr) continue;
    parts.push_back(absl::StrCat(
        address, " ",
        p->rep->role() == ReplicatedShard::Role::kPrimary ? "primary"
        : p->rep->role() == ReplicatedShard::Role::kBackup ? "backup"
                                                           : "fenced",
        " e", p->rep->epoch(), " v", p->shard_state->version(),
        p->rep->awaiting_snapshot() ? " awaiting" : "",
        p->rep->backup_lost() ? " backup-lost" : ""));
  }
  return absl::StrJoin(parts, "; ");
}

SimResult Job::Run() {
  spec_ = Spec();
  map_ = *ComputePartition(spec_.model(), kShards, spec_.max_chunk_bytes());
  SchedulerOptions so;
  so.spec = spec_;
  so.lease = kLease;
  so.assemble_timeout = absl::Seconds(30);
  so.log = [this](absl::string_view line) {
    Log(absl::StrCat("scheduler: ", line));
  };
  absl::StatusOr<std::unique_ptr<SchedulerCore>> core =
      SchedulerCore::Create(so, world_.clock());
  SimResult result;
  if (!core.ok()) {
    result.ok = false;
    result.violation = core.status().ToString();
    return result;
  }
  core_ = std::move(*core);
  auto tick = std::make_shared<std::function<void()>>();
  *tick = [this, tick] {
    core_->Tick();
    world_.After(kTick, *tick);
  };
  world_.After(kTick, *tick);
  for (int k = 0; k < kShards; ++k) {
    StartServer(absl::StrCat("server-", k), false, k);
    StartServer(absl::StrCat("backup-", k), true, k);
  }
  for (int r = 0; r < kDp; ++r) StartWorker(r);
  heal_at_ = world_.now();
  if (options_.faults && options_.scenario == Scenario::kRandom) {
    ScheduleFaults();
  } else if (options_.faults) {
    // Shard 0's primary cut off from its backup and from worker 1 (which
    // reaches only the backup) for 800 ms, from step ~3 on; isolated: from
    // the scheduler and worker 0 too.
    std::vector<std::string> cut = {"backup-0", "w1"};
    if (options_.scenario == Scenario::kSplitBrainPrimaryIsolated) {
      cut.push_back(kScheduler);
      cut.push_back("w0");
    }
    const absl::Time at = world_.now() + absl::Milliseconds(30);
    heal_at_ = at + absl::Milliseconds(800);
    for (const std::string& h : cut) {
      faults_.push_back(absl::StrCat("partition server-0 | ", h, " for 800ms"));
      world_.At(at, [this, h] { world_.Cut("server-0", h); });
    }
    world_.At(heal_at_, [this] { world_.HealAll(); });
  }
  // After the heal: every host runs a process again (the launcher's
  // restarts), and the job must end within kLiveness.
  world_.At(heal_at_ + absl::Milliseconds(1), [this] {
    stalled_until_.clear();
    for (auto& [host, address] : current_) {
      std::shared_ptr<ServerProc> p = Proc(address);
      if (p != nullptr && !p->alive && !Terminal()) {
        const bool backup = p->backup_flag;
        const int shard = p->shard;
        world_.After(absl::Milliseconds(1), [this, host = host, backup, shard] {
          std::shared_ptr<ServerProc> q = Proc(current_[host]);
          if (q != nullptr && !q->alive && !Terminal()) {
            StartServer(host, backup, shard);
          }
        });
      }
    }
  });
  auto ended = [this] {
    if (!violation_.empty()) return true;
    const JobState s = core_->CurrentState();
    return s == FINISHED || (s == FAILED && failure_checked_);
  };
  world_.RunUntil(heal_at_ + kLiveness, ended, [this] { CheckInvariants(); });
  const JobState state = core_->CurrentState();
  if (violation_.empty() && state != FINISHED && state != FAILED) {
    Violation(absl::StrCat("liveness: the job is still ",
                           JobState_Name(state), " ",
                           absl::FormatDuration(kLiveness),
                           " after every fault healed: ", Describe()));
  }
  for (const auto& w : workers_) {
    if (violation_.empty() && !w->gave_up.empty() && state != FAILED) {
      Violation(absl::StrCat("liveness: ", w->node_id, " gave up: ",
                             w->gave_up));
    }
  }
  if (violation_.empty() && state == FINISHED) {
    // Per shard the most advanced live copy (an old primary cut off from
    // the scheduler may still think it is one; the job may end before a
    // backup whose primary died at the end is promoted).
    std::map<int, int64_t> best;
    for (const auto& [address, p] : procs_) {
      if (!p->alive || p->rep == nullptr || p->rep->awaiting_snapshot() ||
          p->rep->role() == ReplicatedShard::Role::kFenced) {
        continue;
      }
      const int64_t v = p->shard_state->version();
      if (final_states_.count(p->shard) == 0 || v > best[p->shard]) {
        best[p->shard] = v;
        final_states_[p->shard] = StateBytes(*p->shard_state);
      }
    }
    for (int k = 0; k < kShards; ++k) {
      if (final_states_.count(k) == 0) {
        Violation(absl::StrCat("the job finished without a copy of shard ", k));
      } else if (!reference_.empty() &&
                 final_states_[k] != reference_.at(k)) {
        Violation(absl::StrCat("shard ", k, "'s final state differs from the "
                               "fault-free run's"));
      }
    }
  }
  result.ok = violation_.empty();
  result.violation = violation_;
  if (!result.ok) {
    result.violation += absl::StrCat("\n    state: ", Describe(),
                                     "\n    last events:\n      ",
                                     absl::StrJoin(log_, "\n      "));
  }
  result.outcome = state == FINISHED ? "finished"
                   : state == FAILED ? "rolled back"
                                     : JobState_Name(state);
  result.faults = faults_;
  result.events = world_.events_run();
  result.sim_seconds =
      absl::ToDoubleSeconds(world_.now() - absl::FromUnixSeconds(1700000000));
  return result;
}

}  // namespace

SimResult RunSeed(const SimOptions& options,
                  const std::map<int, std::string>& reference) {
  Job job(options, reference);
  return job.Run();
}

std::map<int, std::string> RunReference() {
  SimOptions o;
  o.seed = 0;
  o.faults = false;
  static const std::map<int, std::string> kNone;
  Job job(o, kNone);
  SimResult r = job.Run();
  if (!r.ok) {
    std::fprintf(stderr, "the fault-free reference run failed: %s\n",
                 r.violation.c_str());
    return {};
  }
  return job.FinalStates();
}

}  // namespace sim
}  // namespace lmps
