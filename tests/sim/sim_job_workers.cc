#include "tests/sim/sim_job.h"

#include <algorithm>
#include <optional>

#include "absl/strings/str_cat.h"
#include "common/model/partition.h"
#include "server/tensor_codec.h"

namespace lmps {
namespace sim {

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


}  // namespace sim
}  // namespace lmps
