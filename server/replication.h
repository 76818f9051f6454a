// ReplicatedShard: synchronous primary-backup replication of one
// ParameterShard (layout.shard_backups = 1), free of gRPC and of clocks so
// that the daemon (server/daemon.cc) and the deterministic simulation
// (tests/sim) run the same code. BackupLink is its only way out; the
// scheduler's heartbeat answers are its only way in besides the RPCs.
//
// Roles and epochs. The scheduler decides the roles (server/scheduler/
// scheduler_core.h, "Replication"): for each shard it names the primary and
// issues an epoch, a fencing token that grows with every change of the
// shard's roles. A node of a replicated shard is a primary, a backup or
// fenced:
//  - kPrimary serves the workers. Every call that changes state (Push,
//    Apply, StopAt) is first forwarded to the backup (BackupLink) with the
//    epoch and only then run on the local shard; it returns once both are
//    done. So whatever a worker saw acknowledged is on both nodes, and the
//    worker's retry on the new primary after a takeover is a duplicate push
//    or an already applied step there. Reads (Pull, GradNorm,
//    GetTensorInfo) are local. If forwarding fails (the backup is
//    unreachable, or its verdict differs from the local one) the primary
//    acknowledges nothing more: it answers UNAVAILABLE and asks the
//    scheduler in its next heartbeat for leave to serve without the backup
//    (HeartbeatRequest.backup_lost). The scheduler grants it with a new
//    epoch (HeartbeatResponse.detach_backup) and from then on counts the
//    backup as stale (it gets a snapshot before it counts again), or it has
//    already promoted the backup and fences this node.
//  - kBackup refuses the workers' calls with UNAVAILABLE ("backup of shard
//    k; call its primary") and runs the primary's forwarded operations
//    (Replicate) on its own shard: the same code on the same inputs, so
//    both shards stay bit-identical (in SYNC the result of a step does not
//    depend on the order its pushes arrive in: docs/parameter-shard.md). It
//    checks the epoch: an operation of an older epoch is answered ABORTED
//    (its sender was replaced and must stop), one of a newer epoch is refused
//    (FAILED_PRECONDITION: this backup missed a change and must be
//    re-snapshotted). It becomes kPrimary only when the scheduler says so
//    (HeartbeatResponse.promote with the new epoch: the primary's lease
//    expired), never on its own.
//  - kFenced: a node that learnt the shard has moved on (its backup
//    answered ABORTED, or the scheduler's answer says fenced). It refuses
//    every call with UNAVAILABLE, so no worker sees two diverging copies;
//    the daemon then exits and is restarted as the new backup.
// Hence at most one node serves as primary in an epoch, and a promoted
// backup holds every acknowledged operation: the primary acknowledged
// nothing it did not forward in the backup's epoch, and a backup that
// missed an operation is stale in the scheduler's eyes and never promoted.
//
// Attaching a new backup (AttachBackup with needs_snapshot): at the next
// Apply that leaves no pending gradients -- in SYNC every Apply: no push of
// step t + 1 is accepted before step t is applied -- the primary holds off
// every other call, sends its state (ParameterShard::Snapshot and
// AppliedSumSquares) with its epoch as a snapshot stream and forwards
// everything from then on. A backup started with awaiting_snapshot refuses
// forwarded operations (FAILED_PRECONDITION) until its snapshot arrived and
// adopts the snapshot's epoch. A snapshot that fails may still have arrived
// (only its answer lost), so the primary then needs the scheduler's leave
// as for a failed forward, and waits 1, 2, 4 ... 64 heartbeat answers
// before trying that backup again. A backup that starts with its primary
// (job start, same start step) needs no snapshot: both initialise
// identically.
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
  // The shard's epoch when this node starts (Assignment.epoch; a backup
  // awaiting a snapshot adopts the snapshot's).
  int64_t epoch = 0;
  // The primary's address, for messages (backups).
  std::string primary_address;
  // The serving lease: a primary serves (reads too) only until `lease`
  // after sending the last heartbeat the scheduler answered (RenewLease),
  // less a tenth for clock-rate differences; the scheduler promotes its
  // backup only after that heartbeat's lease expired there, so a primary
  // cut off from the scheduler has stopped serving by then. `now` reads
  // the clock; empty: no lease (the primary serves until fenced).
  std::function<absl::Time()> now;
  absl::Duration lease = absl::Seconds(10);
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
  // For reads: OK when this node serves workers (a primary within its
  // serving lease, not shut down).
  absl::Status CheckServing();
  // Ends serving (the job finished, or the shard is dropped): waits for the
  // operations in flight, then refuses every later one UNAVAILABLE before
  // it is forwarded, so a late call can neither diverge from the backup nor
  // count a backup that already exited as failed; then shuts the local
  // shard down (ParameterShard::Shutdown). Idempotent.
  void Shutdown();
  // The scheduler answered a heartbeat sent at `sent` (or the assignment
  // asked for at `sent`): the serving lease runs until sent + 0.9 lease.
  void RenewLease(absl::Time sent);

  // The primary's forwarded operation (backups).
  absl::StatusOr<ReplicateResponse> Replicate(
      const std::vector<ReplicateRequest>& stream);

  // Primary: forward to `link` from now on (needs_snapshot: after sending
  // it a snapshot at the next step boundary). Replaces any backup.
  void AttachBackup(std::shared_ptr<BackupLink> link, bool needs_snapshot);

  // The heartbeat side: what this node tells the scheduler (serving_primary,
  // awaiting_snapshot, epoch, backup_lost, replication_event)...
  void FillHeartbeat(HeartbeatRequest* request);
  // ...and what it does with the answer: fence itself, take over in a new
  // epoch (promote), serve without its backup (detach_backup), attach a
  // new backup (backup_address, through make_link). Returns Aborted when
  // this node is fenced off (the daemon exits).
  absl::Status FollowHeartbeat(
      const HeartbeatResponse& response,
      const std::function<std::shared_ptr<BackupLink>(const std::string&)>&
          make_link);

  Role role() const;
  int64_t epoch() const;
  // A primary whose backup failed; it waits for the scheduler's leave to
  // serve alone.
  bool backup_lost() const;
  // A backup that joined a running job and has no snapshot yet.
  bool awaiting_snapshot() const;
  // The attached (or being attached) backup's address, or "".
  std::string backup_address() const;
  // Events (takeover, fenced, backup lost or attached) not yet taken here
  // or by FillHeartbeat.
  std::vector<std::string> TakeEvents();
  // Counters for metrics.
  int64_t forwarded_ops() const;
  int64_t forwarded_bytes() const;
  ParameterShard* shard() const { return shard_; }

 private:
  ReplicatedShard(ParameterShard* shard, ReplicationOptions options);

  // Runs a state-changing call: forward the operation to the backup, then
  // run `local`.
  // `make_ops(epoch)` is called only when a backup is attached.
  template <typename T>
  absl::StatusOr<T> Run(
      const std::function<std::vector<ReplicateRequest>(int64_t)>& make_ops,
      const std::function<absl::StatusOr<T>()>& local,
      const std::string& what);
  // Sends the pending backup a snapshot if the shard has no pending
  // gradients. Requires op_mu_ held exclusively.
  void MaybeSendSnapshotLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(op_mu_);
  absl::Status RestoreFrom(const std::vector<ReplicateRequest>& stream);
  void EventLocked(const std::string& line) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // The backup behind `link` failed an operation: acknowledge nothing more
  // until the scheduler allows serving without it (if it is still the
  // attached one).
  void MarkBackupLost(const std::shared_ptr<BackupLink>& link,
                      const std::string& why);
  void PromoteLocked(int64_t epoch) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void FenceLocked(const std::string& why) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  ReplicateRequest Header(int64_t epoch) const;

  ParameterShard* const shard_;
  const ReplicationOptions options_;

  // Shared: Push, Apply, StopAt (forward + local); exclusive: a snapshot.
  absl::Mutex op_mu_ ABSL_ACQUIRED_BEFORE(mu_);
  mutable absl::Mutex mu_;
  Role role_ ABSL_GUARDED_BY(mu_);
  bool awaiting_snapshot_ ABSL_GUARDED_BY(mu_);
  bool shutdown_ ABSL_GUARDED_BY(mu_) = false;
  int64_t epoch_ ABSL_GUARDED_BY(mu_);
  absl::Time lease_until_ ABSL_GUARDED_BY(mu_) = absl::InfinitePast();
  // Forwarding to link_ failed; waiting for HeartbeatResponse.detach_backup.
  bool backup_lost_ ABSL_GUARDED_BY(mu_) = false;
  // After a failed snapshot the next attach waits this many heartbeat
  // answers (doubling up to 64; 0 after a success): a live but unreachable
  // backup costs a stall per attempt, not per heartbeat.
  int attach_backoff_ ABSL_GUARDED_BY(mu_) = 0;
  int attach_wait_ ABSL_GUARDED_BY(mu_) = 0;
  std::shared_ptr<BackupLink> link_ ABSL_GUARDED_BY(mu_);
  std::shared_ptr<BackupLink> pending_link_ ABSL_GUARDED_BY(mu_);
  std::vector<std::string> events_ ABSL_GUARDED_BY(mu_);
  int64_t forwarded_ops_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t forwarded_bytes_ ABSL_GUARDED_BY(mu_) = 0;
};

// How a node of a replicated shard starts, from its assignment (role,
// needs_snapshot, epoch, the shard's addresses): its options (node_id set;
// log left empty) and, for a primary whose backup starts with it, the
// backup to forward to from the first operation ("" if none).
struct ReplicaStart {
  ReplicationOptions options;
  std::string attach_backup;
};
ReplicaStart ReplicaStartFor(const Assignment& assignment,
                             const std::string& node_id);

// A BackupLink over gRPC: one Replicate call per operation, with `timeout`
// as its deadline. `stub` talks to `address`.
std::shared_ptr<BackupLink> NewGrpcBackupLink(
    std::unique_ptr<ParameterServer::StubInterface> stub, std::string address,
    absl::Duration timeout);

}  // namespace lmps

#endif  // LMPS_SERVER_REPLICATION_H_
