// SchedulerCore: the job-assembly and liveness logic of the lmps scheduler,
// with no networking (SchedulerService adapts it to gRPC). See the Scheduler
// service in proto/lmps.proto for the wire contract.
//
// The job. The spec's layout fixes the expected nodes: `num_shards` parameter
// servers ("server-<shard>") and dp * pp * tp workers ("worker-<rank>"). Every
// node occupies a fixed *slot* (a shard id or a worker rank); a node id names
// its slot, so a replacement for a dead node gets the same id and ranks.
//
// Registration (Register):
//  - Servers must give their address. A server gets its requested shard
//    (RegisterRequest.requested_rank) if that is in range and free, else the
//    lowest free shard. A server registering with the address of an
//    already-registered server takes that server's slot again (a retried
//    Register, or a restart on the same host:port).
//  - A worker gets the rank it asks for (RegisterRequest.requested_rank,
//    e.g. lmps_worker --rank) if that is in range and free, else the lowest
//    free rank. Rank r maps to coordinates with ParallelLayout
//    (common/model/parallel_layout.h): r = (dp_rank * pp + pp_rank) * tp + tp_rank.
//    With pp * tp > 1 a worker must give the address of its WorkerPeer
//    service.
//  - A node re-registering with `rejoin` (the scheduler restarted) takes
//    back exactly the slot it names.
//  - When every slot of the role is taken but one belongs to a node whose
//    lease expired (alive = false), the new node takes over that slot (same
//    id and ranks; for servers the requested shard, then a slot with the same
//    address, then the lowest dead shard is preferred). Otherwise the
//    request fails with RESOURCE_EXHAUSTED. An unknown role is
//    INVALID_ARGUMENT; registering after the job FINISHED or FAILED is
//    FAILED_PRECONDITION. A replacement shares its node id with the node it
//    replaced, so heartbeats from the old node, should it come back, count
//    for the replacement. A replacement server's address appears in the
//    shard_addresses of assignments handed out from then on only.
//
// Shard replication (layout.shard_backups = 1): every shard has two server
// slots, "server-<shard>" and "backup-<shard>" (2 * num_shards servers are
// expected). A server gets the slot its RegisterRequest.backup asks for,
// else the shard's other one; in a RUNNING job a server that asked for a
// shard never takes another shard's slot. The scheduler alone decides the
// roles, with a per-shard epoch (a fencing token that grows with every
// change of roles; Assignment.epoch, HeartbeatResponse.epoch): one slot is
// the primary (initially server-<shard>; Assignment.backup tells each node
// its role, shard_addresses name the primaries and backup_addresses the
// live backups). When the primary's lease expires, the backup is promoted
// in a new epoch (HeartbeatResponse.promote) only if it holds a complete
// copy in the current epoch; a backup whose report lags gets one lease of
// grace to show one; otherwise the job FAILS for a rollback
// (JobStatus.rollback, "lost both copies"). A primary that could not
// forward to its backup asks for leave to serve alone (backup_lost) and gets
// it with a new epoch (detach_backup), in which the old backup is no copy
// until it has a snapshot. A server registering into a RUNNING job for a
// shard whose other slot is alive becomes that shard's backup
// (needs_snapshot) instead of failing the job. Every registration gets an
// incarnation number; a heartbeat of an older incarnation of a slot is
// answered `fenced` (its slot belongs to a newer process). The protocol is
// described in docs/fault-tolerance.md and checked by tests/sim.
//
// Elastic data parallelism (SchedulerOptions.elastic, max_dp > 0). While
// RUNNING (and no worker is done): a worker registering when every slot is
// held by a live node gets RESOURCE_EXHAUSTED and is counted as surplus
// (by RegisterRequest.instance_id, for 5 s after its last try); enough
// surplus workers for another replica (pp * tp) grow dp, up to max_dp. A
// worker slot dead for longer than `grace` (no replacement came) shrinks
// dp to the complete replicas of the live workers, down to min_dp. The new
// spec keeps (or rescales) the global batch and must validate, else the
// resize is refused (an event) and retried after 30 s. The resize: a
// ResizePlan (TakeResizePlan) for the controller, which stops every shard
// at a boundary >= first_step (the largest shard version, plus 2 when every
// worker is alive so that no worker has pulled it yet; a dead worker's
// replicas wait in GradNorm, which StopAt ends) and reports ResizeStopped;
// workers stop there (heartbeat stopped_for_resize) and register again
// (Assignment.elastic); once every live worker has stopped the job
// re-assembles: ASSEMBLING with the new spec and fresh worker slots, the
// servers told to register again (HeartbeatResponse.reassemble), and
// start_step = the boundary's checkpoint (ChooseStartStep). While a resize
// is under way workers cannot register.
//
// Regroup (WorkersNeedPeers: pp * tp > 1, ring all-reduce or host groups;
// elastic or not): a worker that dies leaves its stage and tensor-parallel
// partners (ring peers) unable to finish the step, so the
// job goes through the same stop-and-re-assemble with dp unchanged, at
// the shards' version (the step in progress, nothing lost): the partners
// and the other replicas stop there and register again, a replacement
// (restarted by the launcher or Kubernetes) takes the dead worker's rank,
// and the whole step is redone from that step's checkpoint. Without
// elasticity the regroup starts once the lease expires (the re-assembly
// then waits up to the assemble timeout for the replacement); with it,
// once a replacement took the slot, else the grace shrinks dp instead.
// Assignment.elastic is set for these jobs too. When every worker's lease
// expired while they were alive (frozen, or cut off from the scheduler),
// none stops for the regroup and the job re-assembles at once; a worker
// that did not stop is answered HeartbeatResponse.reassemble (not
// NOT_FOUND, which would make it rejoin the new assembly in place with a
// step of the old one) until its slot is registered again: it drops its
// step and registers again like the others.
//
// Resume step. Once every server slot is registered (and until the job
// assembles) start_step is recomputed by ChooseStartStep: the largest step
// that EVERY server can load. A server can load step t if
//  - t is in its checkpoint_steps and its checkpoint_partition_version
//    equals the job's partition-map version (same layout: its own shard
//    file suffices; this holds with one volume per shard), or
//  - t is in its relayout_checkpoint_steps: its checkpoint directory holds
//    every shard file of the layout that wrote t, whatever that layout's
//    num_shards or max_chunk_bytes (the server reshards them,
//    server/reshard.h); a shared volume or copied files.
// If no step qualifies the result is 0; when some server holds checkpoints
// of another partition, the log line then says that resuming under another
// layout needs every old shard file reachable from every new shard.
// start_step is frozen when the job assembles; it is not capped at
// train.steps.
//
// Job states:
//  ASSEMBLING  until every slot is registered, then RUNNING. If that does not
//              happen within `assemble_timeout` of Create(), the job becomes
//              FAILED with "job did not assemble within 120s: missing ...".
// Events: every registration (and replacement), expired lease, revival,
// reported error and job state change is recorded with its time and what was
// done about it (JobStatus.events, the last 200; NodeStatus.last_event and
// down_since_unix_ms).
//  RUNNING     Leases are enforced only from assembly on (every lease is
//              renewed at assembly, since nodes typically do not heartbeat
//              while waiting in GetAssignment). A node whose last heartbeat
//              is more than `lease` old is marked alive = false, but the job
//              STAYS RUNNING: its slot becomes free for a replacement (see
//              above), and a heartbeat from the node itself revives it. A
//              dead node does not fail the job; a stuck job is the launcher's
//              to notice (JobStatus.message names the dead nodes).
//  FINISHED    every worker slot has reported done = true.
//  FAILED      a node reported a non-empty error (the message names the node
//              and its error), or the job did not assemble in time.
// FINISHED and FAILED are terminal.
//
// Node ids and ranks that do not apply are -1: workers have shard = -1 and
// servers dp/pp/tp ranks = -1.
//
// Time comes from the Clock given to Create. Timeouts are detected whenever
// any method runs; call Tick() periodically (SchedulerService does every
// 100 ms) so that waiting GetAssignment calls and leases are resolved on time
// when no other call arrives.
//
// Thread-safety: every method is safe to call from many threads. Callbacks
// (GetAssignmentAsync's `done`, SchedulerOptions::log) are run without the
// internal lock held and may call back into the SchedulerCore.
//
// Implementation, one part per file of the scheduler_core library:
// scheduler_core.cc (job state, assembly, assignments, status),
// scheduler_slots.cc (the node table), scheduler_register.cc (Register),
// scheduler_liveness.cc (heartbeats, leases, failover) and
// scheduler_elastic.cc (resize and regroup plans), with their private types
// in scheduler_core_internal.h. The resume step is the pure function of
// start_step.h (its own library).
#ifndef LMPS_SERVER_SCHEDULER_SCHEDULER_CORE_H_
#define LMPS_SERVER_SCHEDULER_SCHEDULER_CORE_H_

#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "common/model/parallel_layout.h"
#include "proto/lmps.pb.h"
#include "server/scheduler/clock.h"
#include "server/scheduler/start_step.h"  // ShardCheckpoints, ChooseStartStep

namespace lmps {

// Elastic data parallelism driven by the scheduler: dp follows the workers
// that come and go, within [min_dp, max_dp], changing at a step boundary.
struct ElasticOptions {
  int min_dp = 1;
  int max_dp = 0;  // 0: elasticity off
  // false: keep the global batch (each replica takes batch / dp); true:
  // keep each replica's batch (the global batch scales with dp).
  bool rescale_batch = false;
  // A worker slot dead this long without a replacement shrinks dp.
  absl::Duration grace = absl::Seconds(10);
};

// What the elastic controller (outside the core: it needs the network) must
// do: stop every shard at one step boundary >= first_step
// (ParameterServer.StopAt at each primary), then report ResizeStopped or
// ResizeFailed.
struct ResizePlan {
  int from_dp = 0;
  int to_dp = 0;
  int64_t first_step = 0;
  // Steps past the shards' current versions the boundary must be (2 when
  // every worker runs, 0 when a dead one holds the others back).
  int64_t ahead = 0;
  std::vector<std::string> shard_addresses;  // the primaries, by shard
};

struct SchedulerOptions {
  // The job. Unset fields get their defaults (ApplyJobSpecDefaults) and the
  // result must pass ValidateJobSpec.
  JobSpec spec;
  // How long after Create() every expected node must have registered.
  absl::Duration assemble_timeout = absl::Seconds(120);
  // A node that does not heartbeat for longer than this is marked dead.
  absl::Duration lease = absl::Seconds(10);
  ElasticOptions elastic;
  // Receives one human-readable line per event (registrations, assembly,
  // start step, state changes, expired leases), without a prefix. May be
  // empty (no logging).
  std::function<void(absl::string_view)> log;
};

class SchedulerCore {
 public:
  // Called exactly once with the caller's assignment or the error.
  using AssignmentCallback = std::function<void(absl::StatusOr<Assignment>)>;

  // Validates the options and computes the partition map. `clock` must
  // outlive the SchedulerCore. The assemble timeout starts now.
  static absl::StatusOr<std::unique_ptr<SchedulerCore>> Create(
      SchedulerOptions options, Clock* clock);

  SchedulerCore(const SchedulerCore&) = delete;
  SchedulerCore& operator=(const SchedulerCore&) = delete;
  ~SchedulerCore();

  // Adds a node to the job (see the header comment for the rules).
  absl::StatusOr<RegisterResponse> Register(const RegisterRequest& request);

  // Calls `done` with node_id's assignment once every expected node has
  // registered: immediately (on this thread) if the job has assembled, else
  // from whichever thread completes the assembly. Errors: NOT_FOUND for an
  // unknown node_id; DEADLINE_EXCEEDED, naming the missing nodes, if the job
  // does not assemble before `deadline` or the assemble timeout;
  // FAILED_PRECONDITION if the job failed otherwise; UNAVAILABLE after
  // Shutdown(). Timeouts are detected by the next call into the core (Tick()).
  void GetAssignmentAsync(const std::string& node_id, absl::Time deadline,
                          AssignmentCallback done);

  // Blocking form of GetAssignmentAsync, for tests and tools. While waiting
  // it calls Tick() every 10 ms of real time, so it returns even when the
  // clock is moved by another thread and nobody else ticks.
  absl::StatusOr<Assignment> GetAssignment(const std::string& node_id,
                                           absl::Time deadline);

  // Renews node_id's lease, records its progress and returns the job state.
  // NOT_FOUND for an unknown node_id.
  absl::StatusOr<HeartbeatResponse> Heartbeat(const HeartbeatRequest& request);

  // Every registered node (servers by shard, then workers by rank), the
  // state, the spec, the start step, the expected counts and the partition.
  JobStatus Status();

  // Resolves timeouts at the clock's current time: the assemble timeout,
  // waiting callers' deadlines and expired leases.
  void Tick();

  // Completes every waiting GetAssignment with UNAVAILABLE; later ones and
  // Register fail with UNAVAILABLE too. Call before stopping the server.
  void Shutdown();

  JobState CurrentState();
  // Why the job is FAILED; for other states a description of what it waits
  // for (missing or dead nodes), or empty.
  std::string StateMessage();

  // Elastic resize (options.elastic.max_dp > 0; see the header comment).
  // A plan to carry out, handed out once.
  std::optional<ResizePlan> TakeResizePlan();
  // Every shard accepted stopping at `step`.
  void ResizeStopped(int64_t step);
  // The plan could not be carried out; the job goes on (a new plan may
  // follow after 10 s).
  void ResizeFailed(const std::string& why);

  // True once the job is FINISHED or FAILED and every registered server
  // that is alive has been told so in a HeartbeatResponse (so servers have
  // seen the end before the scheduler exits).
  bool AllServersSawFinalState();

  const PartitionMap& partition() const { return partition_; }
  int expected_servers() const { return expected_servers_; }
  int expected_workers() {
    absl::MutexLock lock(&mu_);
    return expected_workers_;
  }

 private:
  // Defined in scheduler_core_internal.h.
  struct Node;
  struct Pending;
  struct Outbox;
  // Defined in scheduler_register.cc.
  struct SlotRequest;

  SchedulerCore(SchedulerOptions options, Clock* clock, PartitionMap partition,
                ParallelLayout layout);

  // --- Job state, assembly and assignments (scheduler_core.cc).

  // Applies timeouts at `now`; called at the start of every public method.
  void AdvanceLocked(absl::Time now, Outbox* out)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // ASSEMBLING: fails the job after the assemble timeout, and waiting
  // GetAssignment calls whose own deadline passed.
  void AssemblyTimeoutsLocked(absl::Time now, Outbox* out)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void SetStateLocked(JobState state, const std::string& message, Outbox* out)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Records an event of `node` (nullptr: the job) and what was done about it
  // in events_ and the node's last_event.
  void AddEventLocked(Node* node, const std::string& event,
                      const std::string& action)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Moves to FAILED because of `message` and fails every waiting
  // GetAssignment with `error`. `rollback`: JobStatus.rollback.
  void FailLocked(const std::string& message, const absl::Status& error,
                  Outbox* out, bool rollback = false)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void AssembleLocked(absl::Time now, Outbox* out)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void UpdateStartStepLocked(Outbox* out) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Sets *result to the assignment (or error) a GetAssignment for `node`
  // gets now and returns true; returns false if the caller must wait.
  bool ResolveLocked(const Node& node, absl::StatusOr<Assignment>* result)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  Assignment AssignmentLocked(const Node& node) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  std::string StateMessageLocked() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Carries out `out` (logs, then completions); call without mu_ held.
  void Flush(Outbox* out) ABSL_LOCKS_EXCLUDED(mu_);

  // --- The node table (scheduler_slots.cc).

  // workers_ for spec_'s layout, all unregistered.
  void ResetWorkerSlotsLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // The registered node with this id, or nullptr.
  Node* FindLocked(absl::string_view node_id)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  bool AllRegisteredLocked(const std::vector<Node>& slots) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // "missing 1 of 2 workers, 0 of 1 server (registered: server-0 at ...)".
  std::string MissingLocked() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  std::string DescribeDeadLocked() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Replicated jobs: a server slot's index in servers_, and the other slot
  // of its shard.
  int SlotIndexLocked(const Node& n) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  Node& PartnerLocked(const Node& n) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  bool IsPrimaryLocked(const Node& n) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  // --- Registration (scheduler_register.cc): Register's steps, in order.

  absl::StatusOr<RegisterResponse> RegisterLocked(
      const RegisterRequest& request, Outbox* out)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Validation: OK if `request` may register now, else why not (unknown
  // role, shutdown, the job ended, a resize under way, a missing address).
  absl::Status CheckRegisterLocked(const RegisterRequest& request) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // The slots of the request's role and those its requested_rank names.
  SlotRequest SlotRequestLocked(const RegisterRequest& request)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Slot choice: the slot the node takes (setting *how to the log's words
  // for it), nullptr when every slot is held by a live node, or an error
  // for a rejoin that cannot take its slot. Runs the four steps below.
  absl::StatusOr<Node*> ChooseSlotLocked(const RegisterRequest& request,
                                         const SlotRequest& want,
                                         std::string* how)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // 0. Rejoin handling (the scheduler restarted): exactly the named slot.
  absl::StatusOr<Node*> RejoinSlotLocked(const RegisterRequest& request,
                                         const SlotRequest& want,
                                         std::string* how)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // 1. Servers: the slot of a server registered with the same address.
  Node* SameAddressSlotLocked(const RegisterRequest& request,
                              const SlotRequest& want, std::string* how) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // 2. A free slot: a requested one, else (2a) one by host, else the
  // lowest.
  Node* FreeSlotLocked(const SlotRequest& want, std::string* how) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // 2a. Workers with train.workers_per_host > 1: a free slot in the group
  // of their host (RegisterRequest.hostname), else in an empty group.
  Node* HostGroupSlotLocked(const SlotRequest& want) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // 3. The slot of a dead node, to replace it.
  Node* DeadSlotLocked(const RegisterRequest& request, const SlotRequest& want,
                       std::string* how) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // No slot: the RESOURCE_EXHAUSTED answer; an elastic job counts the
  // worker as surplus (ELASTIC_SURPLUS).
  absl::Status NoSlotLocked(const RegisterRequest& request,
                            const SlotRequest& want, absl::Time now)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Assembly of the slot: gives `slot` to the registering node (a rejoining
  // replicated server also tells its shard's roles and epoch).
  void TakeSlotLocked(Node* slot, const RegisterRequest& request,
                      absl::Time now) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void LogRegistrationLocked(Node* slot, const std::string& how,
                             const RegisterRequest& request, Outbox* out)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // A new server process in a RUNNING job: the backup of its shard if the
  // other slot serves it, else the job fails for a rollback.
  void ServerJoinsRunningJobLocked(Node* slot, const std::string& how,
                                   Outbox* out)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  // --- Liveness (scheduler_liveness.cc): heartbeats, leases, failover.

  absl::StatusOr<HeartbeatResponse> HeartbeatLocked(
      const HeartbeatRequest& request, Outbox* out)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Records a heartbeat's progress, done flag and error (which fails the
  // job).
  void RecordProgressLocked(Node* n, const HeartbeatRequest& request,
                            absl::Time now, Outbox* out)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // RUNNING: marks the nodes whose lease expired dead, with what follows
  // (a regroup, a promotion, or the job failing for a rollback).
  void ExpireLeasesLocked(absl::Time now, Outbox* out)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // One node's lease expired. Returns true if the job failed.
  bool ExpireLeaseLocked(Node& n, absl::Time now, Outbox* out)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Replicated jobs: the failover decision for the server `n` whose lease
  // expired, appended to *action. Returns the shard that lost both copies,
  // or -1.
  int FailoverLocked(Node& n, absl::Time now, std::string* action,
                     Outbox* out) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Replicated jobs: fails the job (rollback) for a shard whose primary died
  // while its backup showed no complete copy within a lease.
  void CheckOrphanedShardsLocked(absl::Time now, Outbox* out)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Makes `to` the primary of its shard in a new epoch (told in its next
  // heartbeat answer).
  void PromoteLocked(Node& to, const std::string& why, Outbox* out)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // The replication part of a server's heartbeat answer.
  void ReplicationHeartbeatLocked(Node* n, const HeartbeatRequest& request,
                                  absl::Time now, HeartbeatResponse* r,
                                  Outbox* out)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  // --- Elastic resize and regroup (scheduler_elastic.cc).

  // Decides on a resize, or once every worker stopped at the boundary
  // re-assembles the job with the new dp.
  void ElasticLocked(absl::Time now, Outbox* out)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Plans the resize to dp = `target` (a regroup keeps dp) if the resized
  // spec validates, else records why not and retries in 30 s. `held_back`:
  // a dead or lost worker holds the others back at the shards' version.
  void PlanResizeLocked(int target, const std::string& why, bool regroup,
                        bool held_back, absl::Time now, Outbox* out)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void ReassembleLocked(absl::Time now, Outbox* out)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const SchedulerOptions options_;
  Clock* const clock_;
  const PartitionMap partition_;
  const std::unique_ptr<const ParallelLayout> layout_;
  static constexpr size_t kMaxEvents = 200;
  const int num_shards_;
  const bool replicated_;       // layout.shard_backups = 1
  const int expected_servers_;  // num_shards_, twice that when replicated
  const absl::Time start_time_;

  absl::Mutex mu_;
  // The job: options_.spec, or after an elastic resize its new dp (and
  // batch), with the worker slots to match.
  JobSpec spec_ ABSL_GUARDED_BY(mu_);
  int expected_workers_ ABSL_GUARDED_BY(mu_) = 0;
  // When the current assembly started (Create, or an elastic resize).
  absl::Time assemble_start_ ABSL_GUARDED_BY(mu_);
  JobState state_ ABSL_GUARDED_BY(mu_) = ASSEMBLING;
  std::string failure_ ABSL_GUARDED_BY(mu_);  // the FAILED message
  bool rollback_ ABSL_GUARDED_BY(mu_) = false;  // JobStatus.rollback
  std::deque<NodeEvent> events_ ABSL_GUARDED_BY(mu_);  // the last kMaxEvents
  bool assembly_timed_out_ ABSL_GUARDED_BY(mu_) = false;
  bool shutdown_ ABSL_GUARDED_BY(mu_) = false;
  bool start_step_known_ ABSL_GUARDED_BY(mu_) = false;
  int64_t start_step_ ABSL_GUARDED_BY(mu_) = 0;
  absl::Time assembled_at_ ABSL_GUARDED_BY(mu_);
  // index = shard; when replicated, index num_shards + shard is the shard's
  // backup slot.
  std::vector<Node> servers_ ABSL_GUARDED_BY(mu_);
  // Replicated jobs, per shard: the index in servers_ of the slot serving
  // as its primary (the other one is its backup).
  std::vector<int> primary_ ABSL_GUARDED_BY(mu_);
  // Replicated jobs, per shard: the epoch (fencing token), raised at every
  // change of the shard's roles (server/replication.h).
  std::vector<int64_t> epoch_ ABSL_GUARDED_BY(mu_);
  // Replicated jobs, per shard: since when its primary is dead while its
  // live backup has not (yet) shown a complete copy; InfiniteFuture when
  // not. The backup is promoted as soon as its heartbeat shows one; after a
  // lease without that the shard has lost both copies.
  std::vector<absl::Time> orphaned_since_ ABSL_GUARDED_BY(mu_);
  int64_t last_incarnation_ ABSL_GUARDED_BY(mu_) = 0;  // RegisterResponse
  std::vector<Node> workers_ ABSL_GUARDED_BY(mu_);  // index = worker rank
  std::vector<Pending> pending_ ABSL_GUARDED_BY(mu_);

  // Elastic resize.
  enum class ResizePhase { kNone, kPlanned, kTaken, kStopping };
  ResizePhase resize_phase_ ABSL_GUARDED_BY(mu_) = ResizePhase::kNone;
  ResizePlan resize_plan_ ABSL_GUARDED_BY(mu_);
  JobSpec resize_spec_ ABSL_GUARDED_BY(mu_);  // the job after the resize
  // "elastic resize dp 2 -> 3: ..." or "regroup (dp 2): ...".
  std::string resize_why_ ABSL_GUARDED_BY(mu_);
  // Pipeline/tensor-parallel jobs: why a regroup is due (a worker of the
  // running job was lost); empty: none.
  std::string regroup_why_ ABSL_GUARDED_BY(mu_);
  absl::Time resize_retry_after_ ABSL_GUARDED_BY(mu_) = absl::InfinitePast();
  // Surplus workers asking for a slot: instance -> last time.
  std::map<std::string, absl::Time> surplus_ ABSL_GUARDED_BY(mu_);
  // Servers of the job before a resize, and its workers that did not stop
  // for it: their heartbeats are answered "reassemble" until their slot is
  // registered again.
  std::set<std::string> reassembling_ids_ ABSL_GUARDED_BY(mu_);
};

}  // namespace lmps

#endif  // LMPS_SERVER_SCHEDULER_SCHEDULER_CORE_H_
