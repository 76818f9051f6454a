// ReplicatedShard: synchronous primary-backup replication of one
// ParameterShard (layout.shard_backups = 1), free of gRPC so it is
// unit-tested without a network (server/service.h adapts it; BackupLink is
// the only way out).
//
// Roles. A node of a replicated shard is a primary, a backup or fenced:
//  - kPrimary serves the workers. Every call that changes state (Push,
//    Apply, StopAt) is first forwarded to the backup (BackupLink) and only
//    then run on the local shard, and returns once both are done: whatever
//    a worker saw acknowledged is on both nodes, and the worker's retry on
//    the backup after the primary died is a duplicate push or an already
//    applied step there, exactly as on the primary. Reads (Pull, GradNorm,
//    GetTensorInfo) are local.
//  - kBackup refuses the workers' calls with UNAVAILABLE ("backup of shard
//    k; its primary at A answers: call it") and runs the primary's
//    forwarded operations (Replicate) on its own shard: the same code on
//    the same inputs, so both shards stay bit-identical (in SYNC the result
//    of a step does not depend on the order its pushes arrive in:
//    server/shard.h). It takes over, becoming kPrimary:
//      * when a worker calls it and the primary does not answer a probe
//        (options.probe_primary): workers only come to the backup after the
//        primary failed them; or
//      * when told to (Promote: the scheduler saw the primary's lease
//        expire).
//    From then on it answers Replicate with ABORTED.
//  - kFenced: a primary whose backup answered ABORTED (it took over). It
//    refuses every call with UNAVAILABLE naming the takeover, so no worker
//    can see two diverging copies; the daemon then exits and is restarted
//    as the new backup.
//
// Failures of the backup. If forwarding fails in transport (UNAVAILABLE,
// DEADLINE_EXCEEDED, CANCELLED, ...) the primary detaches the backup and
// serves on alone; if the backup's result differs from the local one (one
// succeeded, the other failed) the backup is detached as diverged. Both are
// logged and queued for TakeEvents() (the daemon reports them to the
// scheduler). A detached shard has no protection until a new backup is
// attached: a second failure then rolls the job back to its checkpoint.
//
// Attaching a new backup (AttachBackup with needs_snapshot): at the next
// Apply that leaves no pending gradients -- in SYNC every Apply: no push of
// step t + 1 is accepted before step t is applied -- the primary holds off
// every other call, sends its state (ParameterShard::Snapshot and
// AppliedSumSquares) as a snapshot stream and forwards everything from then
// on. A backup started with awaiting_snapshot refuses forwarded operations
// (FAILED_PRECONDITION) until its snapshot arrived. A backup that starts
// with its primary (job start, same start step) needs no snapshot: both
// initialise identically.
//
// Thread-safety: thread-safe. Calls that change state hold a shared lock
// across forward and local run; sending a snapshot holds it exclusively.
#ifndef LMPS_SERVER_REPLICATION_H_
#define LMPS_SERVER_REPLICATION_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "proto/lmps.grpc.pb.h"
#include "server/shard.h"

namespace lmps {

// The primary's channel to its backup.
class BackupLink {
 public:
  virtual ~BackupLink() = default;
  // Sends one Replicate stream (one operation); the backup's answer.
  virtual absl::StatusOr<ReplicateResponse> Replicate(
      const std::vector<ReplicateRequest>& stream) = 0;
  virtual std::string address() const = 0;
};

struct ReplicationOptions {
  std::string node_id;  // of this node, for messages and ReplicateRequest
  bool backup = false;  // start as the backup (else as the primary)
  // A backup joining a running job: refuse forwarded operations until a
  // snapshot arrived.
  bool awaiting_snapshot = false;
  // The primary's address, for messages (backups).
  std::string primary_address;
  // Backups: OK when the primary answers. Empty: only Promote() promotes.
  std::function<absl::Status()> probe_primary;
  // Payload bytes per snapshot message.
  int64_t max_message_bytes = 4 << 20;
  // Receives a line for every role change, detach and snapshot; may be
  // empty.
  std::function<void(const std::string&)> log;
};

class ReplicatedShard {
 public:
  enum class Role { kPrimary, kBackup, kFenced };

  // `shard` (not owned) must outlive this object; SYNC or BOUNDED_STALENESS
  // with staleness 0 (else InvalidArgument).
  static absl::StatusOr<std::unique_ptr<ReplicatedShard>> Create(
      ParameterShard* shard, ReplicationOptions options);

  // Workers' calls (see the file comment).
  absl::StatusOr<PushResponse> Push(const std::vector<PushRequest>& stream);
  absl::StatusOr<int64_t> Apply(int64_t step, double global_sum_squares);
  absl::StatusOr<int64_t> StopAt(int64_t step);
  // For reads: OK when this node serves workers; a backup whose primary
  // does not answer its probe takes over here.
  absl::Status CheckServing();

  // The primary's forwarded operation (backups).
  absl::StatusOr<ReplicateResponse> Replicate(
      const std::vector<ReplicateRequest>& stream);

  // Primary: forward to `link` from now on (needs_snapshot: after sending
  // it a snapshot at the next step boundary). Replaces any backup.
  void AttachBackup(std::shared_ptr<BackupLink> link, bool needs_snapshot);
  // Backup: take over as the primary; `why` is logged. No-op otherwise.
  void Promote(const std::string& why);

  Role role() const;
  // A backup that joined a running job and has no snapshot yet.
  bool awaiting_snapshot() const;
  // The attached (or being attached) backup's address, or "".
  std::string backup_address() const;
  // Events (takeover, fenced, backup lost or attached) since the last call.
  std::vector<std::string> TakeEvents();
  // Counters for metrics.
  int64_t forwarded_ops() const;
  int64_t forwarded_bytes() const;
  ParameterShard* shard() const { return shard_; }

 private:
  ReplicatedShard(ParameterShard* shard, ReplicationOptions options);

  // Runs a state-changing call: forward the operation to the backup, then
  // run `local`.
  template <typename T>
  // `make_ops` is called only when a backup is attached.
  absl::StatusOr<T> Run(
      const std::function<std::vector<ReplicateRequest>()>& make_ops,
      const std::function<absl::StatusOr<T>()>& local,
      const std::string& what);
  // Sends the pending backup a snapshot if the shard has no pending
  // gradients. Requires op_mu_ held exclusively.
  void MaybeSendSnapshotLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(op_mu_);
  absl::Status RestoreFrom(const std::vector<ReplicateRequest>& stream);
  void Event(const std::string& line) ABSL_LOCKS_EXCLUDED(mu_);
  void EventLocked(const std::string& line) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Drops `link` if it is still the attached backup.
  void Detach(const std::shared_ptr<BackupLink>& link, const std::string& why);
  ReplicateRequest Header() const;

  ParameterShard* const shard_;
  const ReplicationOptions options_;

  // Shared: Push, Apply, StopAt (forward + local); exclusive: a snapshot.
  absl::Mutex op_mu_ ABSL_ACQUIRED_BEFORE(mu_);
  mutable absl::Mutex mu_;
  Role role_ ABSL_GUARDED_BY(mu_);
  bool awaiting_snapshot_ ABSL_GUARDED_BY(mu_);
  std::shared_ptr<BackupLink> link_ ABSL_GUARDED_BY(mu_);
  std::shared_ptr<BackupLink> pending_link_ ABSL_GUARDED_BY(mu_);
  std::vector<std::string> events_ ABSL_GUARDED_BY(mu_);
  int64_t forwarded_ops_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t forwarded_bytes_ ABSL_GUARDED_BY(mu_) = 0;
};

// A BackupLink over gRPC: one Replicate call per operation, with `timeout`
// as its deadline. `stub` talks to `address`.
std::shared_ptr<BackupLink> NewGrpcBackupLink(
    std::unique_ptr<ParameterServer::StubInterface> stub, std::string address,
    absl::Duration timeout);

}  // namespace lmps

#endif  // LMPS_SERVER_REPLICATION_H_
