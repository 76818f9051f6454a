#include "server/replication.h"

#include <grpcpp/grpcpp.h>

#include <algorithm>
#include <cstring>
#include <map>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/rpc/status_util.h"

namespace lmps {
namespace {

// A failure to reach the backup (as opposed to the backup's verdict on the
// operation).
bool IsTransport(const absl::Status& s) {
  switch (s.code()) {
    case absl::StatusCode::kUnavailable:
    case absl::StatusCode::kDeadlineExceeded:
    case absl::StatusCode::kCancelled:
    case absl::StatusCode::kUnknown:
    case absl::StatusCode::kInternal:
    case absl::StatusCode::kResourceExhausted:
    case absl::StatusCode::kUnauthenticated:
    case absl::StatusCode::kPermissionDenied:
      return true;
    default:
      return false;
  }
}

const char* RoleName(ReplicatedShard::Role r) {
  switch (r) {
    case ReplicatedShard::Role::kPrimary:
      return "primary";
    case ReplicatedShard::Role::kBackup:
      return "backup";
    case ReplicatedShard::Role::kFenced:
      return "fenced";
  }
  return "?";
}

class GrpcBackupLink final : public BackupLink {
 public:
  GrpcBackupLink(std::unique_ptr<ParameterServer::StubInterface> stub,
                 std::string address, absl::Duration timeout)
      : stub_(std::move(stub)), address_(std::move(address)), timeout_(timeout) {}

  absl::StatusOr<ReplicateResponse> Replicate(
      const std::vector<ReplicateRequest>& stream) override {
    grpc::ClientContext ctx;
    ctx.set_deadline(absl::ToChronoTime(absl::Now() + timeout_));
    ReplicateResponse response;
    std::unique_ptr<grpc::ClientWriterInterface<ReplicateRequest>> writer =
        stub_->Replicate(&ctx, &response);
    for (const ReplicateRequest& m : stream) {
      if (!writer->Write(m)) break;  // Finish() returns the reason
    }
    writer->WritesDone();
    grpc::Status s = writer->Finish();
    if (!s.ok()) return FromGrpcStatus(s);
    return response;
  }

  std::string address() const override { return address_; }

 private:
  const std::unique_ptr<ParameterServer::StubInterface> stub_;
  const std::string address_;
  const absl::Duration timeout_;
};

}  // namespace

std::shared_ptr<BackupLink> NewGrpcBackupLink(
    std::unique_ptr<ParameterServer::StubInterface> stub, std::string address,
    absl::Duration timeout) {
  return std::make_shared<GrpcBackupLink>(std::move(stub), std::move(address),
                                          timeout);
}

ReplicaStart ReplicaStartFor(const Assignment& a, const std::string& node_id) {
  ReplicaStart start;
  const int k = a.shard();
  ReplicationOptions& o = start.options;
  o.node_id = node_id;
  o.backup = a.backup();
  o.awaiting_snapshot = a.needs_snapshot();
  o.primary_address = k >= 0 && k < a.shard_addresses_size()
                          ? a.shard_addresses(k)
                          : "";
  o.epoch = a.epoch();
  o.max_message_bytes = a.spec().max_message_bytes();
  if (!a.backup() && k >= 0 && k < a.backup_addresses_size()) {
    start.attach_backup = a.backup_addresses(k);
  }
  return start;
}

absl::StatusOr<std::unique_ptr<ReplicatedShard>> ReplicatedShard::Create(
    ParameterShard* shard, ReplicationOptions options) {
  if (shard == nullptr) return absl::InvalidArgumentError("no shard");
  const TrainConfig& t = shard->spec().train();
  if (shard->mode() == ASYNC || t.staleness() > 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "shard replication needs train.mode SYNC (or BOUNDED_STALENESS with "
        "staleness 0); got ",
        ConsistencyMode_Name(shard->mode()), " with staleness ",
        t.staleness()));
  }
  if (options.max_message_bytes <= 0) options.max_message_bytes = 4 << 20;
  return std::unique_ptr<ReplicatedShard>(
      new ReplicatedShard(shard, std::move(options)));
}

ReplicatedShard::ReplicatedShard(ParameterShard* shard,
                                 ReplicationOptions options)
    : shard_(shard), options_(std::move(options)) {
  absl::MutexLock lock(&mu_);
  role_ = options_.backup ? Role::kBackup : Role::kPrimary;
  awaiting_snapshot_ = options_.backup && options_.awaiting_snapshot;
  epoch_ = options_.epoch;
}

ReplicatedShard::Role ReplicatedShard::role() const {
  absl::MutexLock lock(&mu_);
  return role_;
}

int64_t ReplicatedShard::epoch() const {
  absl::MutexLock lock(&mu_);
  return epoch_;
}

bool ReplicatedShard::backup_lost() const {
  absl::MutexLock lock(&mu_);
  return backup_lost_;
}

bool ReplicatedShard::awaiting_snapshot() const {
  absl::MutexLock lock(&mu_);
  return awaiting_snapshot_;
}

std::string ReplicatedShard::backup_address() const {
  absl::MutexLock lock(&mu_);
  if (pending_link_ != nullptr) return pending_link_->address();
  return link_ != nullptr ? link_->address() : "";
}

std::vector<std::string> ReplicatedShard::TakeEvents() {
  absl::MutexLock lock(&mu_);
  std::vector<std::string> out;
  out.swap(events_);
  return out;
}

int64_t ReplicatedShard::forwarded_ops() const {
  absl::MutexLock lock(&mu_);
  return forwarded_ops_;
}

int64_t ReplicatedShard::forwarded_bytes() const {
  absl::MutexLock lock(&mu_);
  return forwarded_bytes_;
}

void ReplicatedShard::EventLocked(const std::string& line) {
  events_.push_back(line);
  if (events_.size() > 100) events_.erase(events_.begin());
  if (options_.log) options_.log(line);
}

ReplicateRequest ReplicatedShard::Header(int64_t epoch) const {
  ReplicateRequest r;
  r.set_shard(shard_->shard());
  r.set_primary(options_.node_id);
  r.set_epoch(epoch);
  return r;
}

void ReplicatedShard::MarkBackupLost(const std::shared_ptr<BackupLink>& link,
                                     const std::string& why) {
  absl::MutexLock lock(&mu_);
  if (link_ != link || backup_lost_) return;  // replaced, or already lost
  backup_lost_ = true;
  EventLocked(absl::StrCat("shard ", shard_->shard(), ": backup at ",
                           link->address(), " failed: ", why,
                           "; acknowledging nothing until the scheduler "
                           "allows serving without it (epoch ",
                           epoch_, ")"));
}

void ReplicatedShard::AttachBackup(std::shared_ptr<BackupLink> link,
                                   bool needs_snapshot) {
  absl::MutexLock lock(&mu_);
  if (role_ != Role::kPrimary || link == nullptr) return;
  if (needs_snapshot) {
    pending_link_ = std::move(link);
    EventLocked(absl::StrCat("shard ", shard_->shard(), ": new backup at ",
                             pending_link_->address(),
                             "; it gets a snapshot at the next step boundary"));
  } else {
    pending_link_.reset();
    link_ = std::move(link);
    backup_lost_ = false;
    if (options_.log) {
      options_.log(absl::StrCat("shard ", shard_->shard(),
                                ": replicating synchronously to the backup at ",
                                link_->address(), " (epoch ", epoch_, ")"));
    }
  }
}

void ReplicatedShard::PromoteLocked(int64_t epoch) {
  if (role_ != Role::kBackup || epoch <= epoch_) return;
  if (awaiting_snapshot_) {
    EventLocked(absl::StrCat(
        "shard ", shard_->shard(), ": cannot take over in epoch ", epoch,
        ": this backup has not received its primary's snapshot yet"));
    return;
  }
  role_ = Role::kPrimary;
  epoch_ = epoch;
  EventLocked(absl::StrCat("shard ", shard_->shard(), ": backup ",
                           options_.node_id,
                           " took over as the primary at version ",
                           shard_->version(), " in epoch ", epoch,
                           " (the scheduler saw the primary's lease expire)"));
}

void ReplicatedShard::FenceLocked(const std::string& why) {
  if (role_ == Role::kFenced) return;
  role_ = Role::kFenced;
  link_.reset();
  pending_link_.reset();
  EventLocked(absl::StrCat("shard ", shard_->shard(), ": fenced off (", why,
                           "); this node stops serving"));
}

void ReplicatedShard::FillHeartbeat(HeartbeatRequest* request) {
  absl::MutexLock lock(&mu_);
  request->set_serving_primary(role_ == Role::kPrimary);
  request->set_awaiting_snapshot(awaiting_snapshot_);
  request->set_epoch(epoch_);
  request->set_backup_lost(role_ == Role::kPrimary && backup_lost_);
  std::vector<std::string> events;
  events.swap(events_);
  request->set_replication_event(absl::StrJoin(events, "; "));
}

absl::Status ReplicatedShard::FollowHeartbeat(
    const HeartbeatResponse& response,
    const std::function<std::shared_ptr<BackupLink>(const std::string&)>&
        make_link) {
  std::string attach;
  {
    absl::MutexLock lock(&mu_);
    if (response.fenced()) {
      FenceLocked(absl::StrCat("the scheduler names another node the primary "
                               "of shard ",
                               shard_->shard(), " in epoch ",
                               response.epoch()));
    }
    if (response.promote()) PromoteLocked(response.epoch());
    if (response.detach_backup() && role_ == Role::kPrimary &&
        response.epoch() > epoch_) {
      const std::string gone =
          link_ != nullptr ? link_->address() : std::string("(none)");
      link_.reset();
      backup_lost_ = false;
      epoch_ = response.epoch();
      EventLocked(absl::StrCat("shard ", shard_->shard(),
                               ": serving without the backup at ", gone,
                               " in epoch ", epoch_,
                               " (the scheduler's leave) until a new backup "
                               "attaches"));
    }
    if (role_ == Role::kFenced) {
      return absl::AbortedError(absl::StrCat(
          "shard ", shard_->shard(), " is served by another node now; this "
          "node is fenced off and exits (restarted, it becomes the new "
          "backup)"));
    }
    const std::string current =
        pending_link_ != nullptr ? pending_link_->address()
        : link_ != nullptr       ? link_->address()
                                 : "";
    if (role_ == Role::kPrimary && !backup_lost_ &&
        !response.backup_address().empty() &&
        response.backup_address() != current) {
      if (attach_wait_ > 0) {
        --attach_wait_;
      } else {
        attach = response.backup_address();
      }
    }
  }
  if (!attach.empty()) AttachBackup(make_link(attach), /*needs_snapshot=*/true);
  return absl::OkStatus();
}

void ReplicatedShard::RenewLease(absl::Time sent) {
  absl::MutexLock lock(&mu_);
  lease_until_ = std::max(lease_until_, sent + options_.lease * 9 / 10);
}

void ReplicatedShard::Shutdown() {
  absl::MutexLock op_lock(&op_mu_);
  {
    absl::MutexLock lock(&mu_);
    shutdown_ = true;
  }
  shard_->Shutdown();
}

absl::Status ReplicatedShard::CheckServing() {
  absl::MutexLock lock(&mu_);
  if (shutdown_) {
    return absl::UnavailableError(absl::StrCat(
        "parameter server shard ", shard_->shard(), " is shutting down"));
  }
  switch (role_) {
    case Role::kPrimary:
      if (options_.now && options_.now() >= lease_until_) {
        return absl::UnavailableError(absl::StrCat(
            "node ", options_.node_id, " (primary of shard ", shard_->shard(),
            " in epoch ", epoch_, ") has had no answer from the scheduler "
            "within its lease; it serves again once one comes (or it is "
            "fenced)"));
      }
      return absl::OkStatus();
    case Role::kFenced:
      return absl::UnavailableError(absl::StrCat(
          "node ", options_.node_id, " no longer serves shard ",
          shard_->shard(), ": the scheduler moved it to another node (this "
          "node is fenced off); ask the scheduler where it is"));
    case Role::kBackup:
      break;
  }
  if (awaiting_snapshot_) {
    return absl::UnavailableError(absl::StrCat(
        "node ", options_.node_id, " is a new backup of shard ",
        shard_->shard(), " waiting for its primary's snapshot; call the "
        "primary at ",
        options_.primary_address));
  }
  return absl::UnavailableError(absl::StrCat(
      "node ", options_.node_id, " is the backup of shard ", shard_->shard(),
      " in epoch ", epoch_, "; its primary (", options_.primary_address,
      " when this node started) serves until the scheduler promotes this "
      "node: call it"));
}

template <typename T>
absl::StatusOr<T> ReplicatedShard::Run(
    const std::function<std::vector<ReplicateRequest>(int64_t)>& make_ops,
    const std::function<absl::StatusOr<T>()>& local, const std::string& what) {
  if (absl::Status s = CheckServing(); !s.ok()) return s;
  std::shared_ptr<BackupLink> link;
  int64_t epoch;
  {
    absl::MutexLock lock(&mu_);
    if (backup_lost_) {
      return absl::UnavailableError(absl::StrCat(
          "shard ", shard_->shard(), ": its backup failed an operation; the "
          "primary ", options_.node_id, " waits for the scheduler's leave to "
          "serve without it (epoch ",
          epoch_, "); retry"));
    }
    link = link_;
    epoch = epoch_;
  }
  if (link == nullptr) return local();
  const std::vector<ReplicateRequest> ops = make_ops(epoch);
  int64_t bytes = 0;
  for (const ReplicateRequest& m : ops) {
    bytes += static_cast<int64_t>(m.ByteSizeLong());
  }
  absl::StatusOr<ReplicateResponse> r = link->Replicate(ops);
  {
    absl::MutexLock lock(&mu_);
    ++forwarded_ops_;
    forwarded_bytes_ += bytes;
  }
  if (!r.ok() && r.status().code() == absl::StatusCode::kAborted) {
    // The backup is in a newer epoch: this node was replaced.
    absl::MutexLock lock(&mu_);
    if (role_ == Role::kPrimary) {
      FenceLocked(absl::StrCat("the backup at ", link->address(),
                               " is in a newer epoch: ", r.status().message()));
    }
    return absl::UnavailableError(absl::StrCat(
        "shard ", shard_->shard(), " moved away from ", options_.node_id,
        "; ask the scheduler where it is"));
  }
  if (r.ok() && r->epoch() != epoch) {
    MarkBackupLost(link, absl::StrCat("it answered ", what, " in epoch ",
                                      r->epoch(), ", not ", epoch));
    return absl::UnavailableError(absl::StrCat(
        "shard ", shard_->shard(), ": backup in another epoch; retry"));
  }
  if (!r.ok() && IsTransport(r.status())) {
    // Not run here either: the worker's retry is the same operation.
    MarkBackupLost(link, absl::StrCat("unreachable during ", what, ": ",
                                      r.status().ToString()));
    return absl::UnavailableError(absl::StrCat(
        "shard ", shard_->shard(), ": its backup at ", link->address(),
        " is unreachable (", r.status().message(), "); retry"));
  }
  absl::StatusOr<T> result = local();
  if (r.ok() != result.ok()) {
    // Diverged: the backup may lack what the primary did (or hold what it
    // refused); the acknowledgement waits for the scheduler's leave, and the
    // worker's retry is a duplicate here.
    MarkBackupLost(link, absl::StrCat("diverged on ", what, ": backup ",
                                      r.ok() ? "OK" : r.status().ToString(),
                                      ", primary ",
                                      result.ok() ? "OK"
                                                  : result.status().ToString()));
    return absl::UnavailableError(absl::StrCat(
        "shard ", shard_->shard(), ": its backup diverged on ", what,
        "; retry"));
  }
  return result;
}

absl::StatusOr<PushResponse> ReplicatedShard::Push(
    const std::vector<PushRequest>& stream) {
  absl::ReaderMutexLock op_lock(&op_mu_);
  auto make_ops = [&](int64_t epoch) {
    std::vector<ReplicateRequest> ops;
    ops.reserve(stream.size());
    for (const PushRequest& m : stream) {
      ops.push_back(Header(epoch));
      *ops.back().mutable_push() = m;
    }
    return ops;
  };
  const std::string what =
      stream.empty() ? "push"
                     : absl::StrCat("push of step ", stream[0].step(), " from ",
                                    stream[0].worker_id());
  return Run<PushResponse>(
      make_ops, [&] { return shard_->Push(stream); }, what);
}

absl::StatusOr<int64_t> ReplicatedShard::Apply(int64_t step,
                                               double global_sum_squares) {
  bool attach;
  {
    absl::MutexLock lock(&mu_);
    attach = pending_link_ != nullptr;
  }
  auto ops = [&](int64_t epoch) {
    std::vector<ReplicateRequest> ops(1, Header(epoch));
    ops[0].mutable_apply()->set_step(step);
    ops[0].mutable_apply()->set_global_sum_squares(global_sum_squares);
    return ops;
  };
  auto local = [&] { return shard_->Apply(step, global_sum_squares); };
  const std::string what = absl::StrCat("apply of step ", step);
  if (!attach) {
    absl::ReaderMutexLock op_lock(&op_mu_);
    return Run<int64_t>(ops, local, what);
  }
  // A backup waits for its snapshot: hold off every other call from the
  // apply to the snapshot, so no push of the next step slips in between.
  absl::MutexLock op_lock(&op_mu_);
  absl::StatusOr<int64_t> result = Run<int64_t>(ops, local, what);
  if (result.ok()) MaybeSendSnapshotLocked();
  return result;
}

absl::StatusOr<int64_t> ReplicatedShard::StopAt(int64_t step) {
  absl::ReaderMutexLock op_lock(&op_mu_);
  auto ops = [&](int64_t epoch) {
    std::vector<ReplicateRequest> ops(1, Header(epoch));
    ops[0].mutable_stop_at()->set_step(step);
    return ops;
  };
  return Run<int64_t>(
      ops, [&] { return shard_->StopAt(step); },
      absl::StrCat("stop at step ", step));
}

void ReplicatedShard::MaybeSendSnapshotLocked() {
  std::shared_ptr<BackupLink> link;
  int64_t epoch;
  {
    absl::MutexLock lock(&mu_);
    link = pending_link_;
    if (link == nullptr || role_ != Role::kPrimary || backup_lost_) return;
    epoch = epoch_;
  }
  if (shard_->HasPendingGradients()) return;  // try at the next apply
  const ShardCheckpoint snapshot = shard_->Snapshot();
  const std::map<int64_t, double> applied = shard_->AppliedSumSquares();
  const int buffers = snapshot.header.state_buffers;
  const int64_t per_message = std::max<int64_t>(
      1, options_.max_message_bytes / (4 * (1 + buffers)));
  std::vector<ReplicateRequest> stream;
  for (const ChunkData& c : snapshot.chunks) {
    const int64_t n = static_cast<int64_t>(c.params.size());
    for (int64_t off = 0; off < n || (n == 0 && off == 0); off += per_message) {
      const int64_t len = std::min(per_message, n - off);
      ReplicateRequest m = Header(epoch);
      ShardSnapshot* s = m.mutable_snapshot();
      s->set_version(snapshot.header.step);
      s->set_tensor(c.desc.tensor());
      s->set_chunk(c.desc.index());
      s->set_offset(off);
      s->set_params(reinterpret_cast<const char*>(c.params.data() + off),
                    4 * len);
      for (const std::vector<float>& b : c.state) {
        s->add_state(reinterpret_cast<const char*>(b.data() + off), 4 * len);
      }
      if (stream.empty()) {
        for (const auto& [step, ss] : applied) {
          s->add_applied_steps(step);
          s->add_applied_sum_squares(ss);
        }
        s->set_last_grad_norm(shard_->last_grad_norm());
      }
      stream.push_back(std::move(m));
      if (n == 0) break;
    }
  }
  absl::StatusOr<ReplicateResponse> r = link->Replicate(stream);
  absl::MutexLock lock(&mu_);
  if (pending_link_ != link) return;
  pending_link_.reset();
  if (r.ok() && r->epoch() != epoch) {
    r = absl::FailedPreconditionError(absl::StrCat(
        "it answered in epoch ", r->epoch(), ", not ", epoch));
  }
  if (!r.ok()) {
    // It may hold the snapshot all the same (only the answer was lost) and
    // then counts as a complete copy of this epoch: acknowledge nothing
    // more until the scheduler lets this node serve without it.
    if (epoch_ == epoch && role_ == Role::kPrimary) {
      link_ = link;
      backup_lost_ = true;
    }
    attach_backoff_ = std::min(64, std::max(1, 2 * attach_backoff_));
    attach_wait_ = attach_backoff_;
    EventLocked(absl::StrCat("shard ", shard_->shard(),
                             ": snapshot to the new backup at ",
                             link->address(), " failed (", r.status().ToString(),
                             "); acknowledging nothing until the scheduler "
                             "allows serving without it (epoch ",
                             epoch, ")"));
    return;
  }
  if (epoch_ != epoch || role_ != Role::kPrimary) return;
  link_ = link;
  backup_lost_ = false;
  attach_backoff_ = 0;
  attach_wait_ = 0;
  EventLocked(absl::StrCat("shard ", shard_->shard(), ": backup at ",
                           link->address(), " attached with a snapshot at "
                           "version ",
                           snapshot.header.step,
                           "; replicating synchronously again"));
}

absl::Status ReplicatedShard::RestoreFrom(
    const std::vector<ReplicateRequest>& stream) {
  ShardCheckpoint cp = shard_->Snapshot();  // the layout to fill in
  std::map<std::pair<std::string, int>, ChunkData*> index;
  int64_t expected = 0;
  for (ChunkData& c : cp.chunks) {
    index[{c.desc.tensor(), c.desc.index()}] = &c;
    expected += static_cast<int64_t>(c.params.size());
  }
  const int64_t version = stream[0].snapshot().version();
  std::map<int64_t, double> applied;
  std::map<const ChunkData*, std::vector<bool>> covered;
  int64_t received = 0;
  for (const ReplicateRequest& m : stream) {
    const ShardSnapshot& s = m.snapshot();
    if (s.version() != version) {
      return absl::InvalidArgumentError(absl::StrCat(
          "snapshot messages disagree on the version: ", version, " and ",
          s.version()));
    }
    auto it = index.find({s.tensor(), s.chunk()});
    if (it == index.end()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "snapshot chunk ", s.tensor(), "#", s.chunk(), " is not one of shard ",
          shard_->shard(), "'s"));
    }
    ChunkData& c = *it->second;
    const int64_t n = static_cast<int64_t>(s.params().size() / 4);
    const int64_t size = static_cast<int64_t>(c.params.size());
    // (offset > size - n, not offset + n > size: a huge offset overflows.)
    if (s.params().size() % 4 != 0 || s.offset() < 0 || n > size ||
        s.offset() > size - n ||
        s.state_size() != static_cast<int>(c.state.size())) {
      return absl::InvalidArgumentError(absl::StrCat(
          "snapshot message for ", s.tensor(), "#", s.chunk(), " offset ",
          s.offset(), " with ", s.params().size(), " bytes and ",
          s.state_size(), " state buffers does not fit the chunk (", size,
          " elements, ", c.state.size(), " buffers)"));
    }
    // Every element exactly once: overlapping messages cannot add up to a
    // complete snapshot with a hole in it.
    std::vector<bool>& seen = covered[&c];
    seen.resize(c.params.size());
    for (int64_t i = s.offset(); i < s.offset() + n; ++i) {
      if (seen[i]) {
        return absl::InvalidArgumentError(absl::StrCat(
            "snapshot messages for ", s.tensor(), "#", s.chunk(),
            " overlap at element ", i));
      }
      seen[i] = true;
    }
    std::memcpy(c.params.data() + s.offset(), s.params().data(), 4 * n);
    for (int b = 0; b < s.state_size(); ++b) {
      if (s.state(b).size() != s.params().size()) {
        return absl::InvalidArgumentError(absl::StrCat(
            "snapshot message for ", s.tensor(), "#", s.chunk(),
            ": state buffer ", b, " has ", s.state(b).size(), " bytes, not ",
            s.params().size()));
      }
      std::memcpy(c.state[b].data() + s.offset(), s.state(b).data(), 4 * n);
    }
    received += n;
    for (int i = 0; i < s.applied_steps_size() &&
                    i < s.applied_sum_squares_size();
         ++i) {
      applied[s.applied_steps(i)] = s.applied_sum_squares(i);
    }
  }
  if (received != expected) {
    return absl::InvalidArgumentError(absl::StrCat(
        "snapshot covers ", received, " elements; shard ", shard_->shard(),
        " holds ", expected));
  }
  cp.header.step = version;
  return shard_->Restore(cp, applied, stream[0].snapshot().last_grad_norm());
}

absl::StatusOr<ReplicateResponse> ReplicatedShard::Replicate(
    const std::vector<ReplicateRequest>& stream) {
  absl::ReaderMutexLock op_lock(&op_mu_);
  if (stream.empty()) {
    return absl::InvalidArgumentError("empty Replicate stream");
  }
  const ReplicateRequest::OpCase op = stream[0].op_case();
  for (const ReplicateRequest& m : stream) {
    if (m.op_case() != op || op == ReplicateRequest::OP_NOT_SET) {
      return absl::InvalidArgumentError(
          "a Replicate stream must carry exactly one kind of operation");
    }
    if (m.shard() != shard_->shard()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "Replicate for shard ", m.shard(), " sent to the backup of shard ",
          shard_->shard()));
    }
  }
  const int64_t epoch = stream[0].epoch();
  for (const ReplicateRequest& m : stream) {
    if (m.epoch() != epoch) {
      return absl::InvalidArgumentError(
          "the messages of a Replicate stream disagree on the epoch");
    }
  }
  {
    absl::MutexLock lock(&mu_);
    if (epoch < epoch_) {
      // The sender was replaced: it must stop serving.
      return absl::AbortedError(absl::StrCat(
          "node ", options_.node_id, " of shard ", shard_->shard(),
          " is in epoch ", epoch_, "; ", stream[0].primary(),
          " forwards in the older epoch ", epoch));
    }
    if (role_ != Role::kBackup) {
      return absl::AbortedError(absl::StrCat(
          "node ", options_.node_id, " is the ", RoleName(role_),
          " of shard ", shard_->shard(), " in epoch ", epoch_,
          ", not a backup taking operations from ", stream[0].primary()));
    }
    if (op == ReplicateRequest::kSnapshot) {
      // Adopted below, once restored.
    } else if (awaiting_snapshot_) {
      return absl::FailedPreconditionError(absl::StrCat(
          "node ", options_.node_id, " is a new backup of shard ",
          shard_->shard(), " and has not received a snapshot yet"));
    } else if (epoch > epoch_) {
      return absl::FailedPreconditionError(absl::StrCat(
          "node ", options_.node_id, " of shard ", shard_->shard(),
          " is in epoch ", epoch_, " and missed the change to epoch ", epoch,
          ": it needs a snapshot"));
    }
  }
  ReplicateResponse response;
  switch (op) {
    case ReplicateRequest::kPush: {
      std::vector<PushRequest> push;
      push.reserve(stream.size());
      for (const ReplicateRequest& m : stream) push.push_back(m.push());
      absl::StatusOr<PushResponse> r = shard_->Push(push);
      if (!r.ok()) return r.status();
      *response.mutable_push() = *r;
      break;
    }
    case ReplicateRequest::kApply: {
      absl::StatusOr<int64_t> r = shard_->Apply(
          stream[0].apply().step(), stream[0].apply().global_sum_squares());
      if (!r.ok()) return r.status();
      break;
    }
    case ReplicateRequest::kStopAt: {
      absl::StatusOr<int64_t> r = shard_->StopAt(stream[0].stop_at().step());
      if (!r.ok()) return r.status();
      break;
    }
    case ReplicateRequest::kSnapshot: {
      LMPS_RETURN_IF_ERROR(RestoreFrom(stream));
      absl::MutexLock lock(&mu_);
      awaiting_snapshot_ = false;
      epoch_ = epoch;
      EventLocked(absl::StrCat("shard ", shard_->shard(), ": backup ",
                               options_.node_id, " holds its primary's "
                               "snapshot at version ",
                               shard_->version(), "; replicating"));
      break;
    }
    default:
      break;
  }
  response.set_version(shard_->version());
  absl::MutexLock lock(&mu_);
  response.set_epoch(epoch_);
  return response;
}

}  // namespace lmps
