// SchedulerCore under faults and changes: replicated shards failing over,
// fenced registrations, elastic resizes, pipeline regroups, concurrency and
// shutdown.
#include "server/scheduler/scheduler_core_test_util.h"

namespace lmps {
namespace scheduler_test {
namespace {


// Shard replication: a backup slot per shard; when the primary's lease
// expires the backup is promoted in a new epoch, assignments name it, and a
// new server process for that shard becomes its backup with a snapshot
// instead of failing the job.
TEST_F(SchedulerCoreTest, ReplicatedShardFailsOverToItsBackup) {
  Start(/*dp=*/1, /*shards=*/1, absl::Seconds(120), absl::Seconds(10),
        /*backups=*/1);
  RegisterRequest backup = Server("b:1", /*requested=*/0);
  backup.set_backup(true);
  EXPECT_EQ(Id(backup), "backup-0");  // registering first
  EXPECT_EQ(Id(Server("p:1", 0)), "server-0");
  EXPECT_EQ(core_->CurrentState(), ASSEMBLING);
  EXPECT_EQ(Id(Worker("host-0")), "worker-0");
  ASSERT_EQ(core_->CurrentState(), RUNNING);
  absl::StatusOr<Assignment> p = core_->GetAssignment("server-0", absl::InfiniteFuture());
  absl::StatusOr<Assignment> b = core_->GetAssignment("backup-0", absl::InfiniteFuture());
  absl::StatusOr<Assignment> w = core_->GetAssignment("worker-0", absl::InfiniteFuture());
  ASSERT_TRUE(p.ok() && b.ok() && w.ok());
  EXPECT_FALSE(p->backup());
  EXPECT_TRUE(b->backup());
  EXPECT_FALSE(b->needs_snapshot());  // both start from the same state
  EXPECT_EQ(p->epoch(), 1);
  EXPECT_EQ(b->epoch(), 1);
  EXPECT_EQ(w->shard_addresses(0), "p:1");
  EXPECT_EQ(w->backup_addresses(0), "b:1");
  absl::StatusOr<HeartbeatResponse> r =
      core_->Heartbeat(ReplicaBeat("server-0", true, 1));
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->backup_address(), "b:1");
  EXPECT_EQ(r->epoch(), 1);
  r = core_->Heartbeat(ReplicaBeat("backup-0", false, 1));
  EXPECT_FALSE(r->promote());

  // The primary dies: the backup is promoted in epoch 2.
  PrimaryMissesItsLease(ReplicaBeat("backup-0", false, 1));
  EXPECT_TRUE(Logged("its backup backup-0 (b:1) takes over shard 0 in epoch 2"))
      << Log();
  r = core_->Heartbeat(ReplicaBeat("backup-0", false, 1));
  EXPECT_TRUE(r->promote());
  EXPECT_EQ(r->epoch(), 2);
  HeartbeatRequest took_over = ReplicaBeat("backup-0", true, 2);
  took_over.set_replication_event("shard 0: backup backup-0 took over");
  r = core_->Heartbeat(took_over);
  EXPECT_FALSE(r->promote());
  EXPECT_EQ(r->backup_address(), "");  // no live backup now
  JobStatus status = core_->Status();
  EXPECT_EQ(status.state(), RUNNING);
  EXPECT_FALSE(Find(status, "server-0")->alive());
  EXPECT_TRUE(Find(status, "backup-0")->serving_primary());
  EXPECT_FALSE(Find(status, "server-0")->serving_primary());
  EXPECT_EQ(Find(status, "backup-0")->epoch(), 2);
  w = core_->GetAssignment("worker-0", absl::InfiniteFuture());
  EXPECT_EQ(w->shard_addresses(0), "b:1");
  EXPECT_EQ(w->backup_addresses(0), "");

  // The old primary was only slow: it heartbeats again, still serving in
  // epoch 1, and is told it is fenced off.
  r = core_->Heartbeat(ReplicaBeat("server-0", true, 1));
  EXPECT_TRUE(r->fenced());

  // The restarted process becomes the backup and needs a snapshot; the job
  // keeps running and the primary is told where its new backup is.
  EXPECT_EQ(Id(Server("p:2", 0)), "server-0");
  EXPECT_EQ(core_->CurrentState(), RUNNING);
  p = core_->GetAssignment("server-0", absl::InfiniteFuture());
  EXPECT_TRUE(p->backup());
  EXPECT_TRUE(p->needs_snapshot());
  EXPECT_EQ(p->epoch(), 2);
  EXPECT_EQ(p->shard_addresses(0), "b:1");
  r = core_->Heartbeat(took_over);
  EXPECT_EQ(r->backup_address(), "p:2");
  HeartbeatRequest waiting = ReplicaBeat("server-0", false, 2, true);
  EXPECT_FALSE(core_->Heartbeat(waiting)->promote());
  w = core_->GetAssignment("worker-0", absl::InfiniteFuture());
  EXPECT_EQ(w->backup_addresses(0), "p:2");

  // The primary dies before the new backup got its snapshot: the backup
  // has a lease to show a complete copy; it does not, so the shard's state
  // is gone and the job fails for a rollback.
  clock_.Advance(absl::Seconds(8));
  ASSERT_TRUE(core_->Heartbeat(waiting).ok());
  ASSERT_TRUE(core_->Heartbeat(Beat("worker-0")).ok());
  clock_.Advance(absl::Seconds(3));
  core_->Tick();
  EXPECT_EQ(core_->CurrentState(), RUNNING);
  EXPECT_FALSE(core_->Heartbeat(waiting)->promote());
  ASSERT_TRUE(core_->Heartbeat(Beat("worker-0")).ok());
  clock_.Advance(absl::Seconds(11));
  core_->Tick();
  EXPECT_EQ(core_->CurrentState(), FAILED);
  EXPECT_TRUE(core_->Status().rollback());
  EXPECT_TRUE(absl::StrContains(core_->StateMessage(), "shard 0 lost both copies"))
      << core_->StateMessage();
}

// Shards of a replicated job heartbeat `starting` while they create their
// shard (a large model takes longer than the lease): the scheduler renews
// their leases and reads no role from those heartbeats, so the backup
// stays a complete copy and takes over when the primary dies later.
TEST_F(SchedulerCoreTest, StartingShardsKeepTheirLeaseAndRoles) {
  StartReplicatedJob();
  HeartbeatRequest primary = Beat("server-0");
  primary.set_starting(true);
  HeartbeatRequest backup = Beat("backup-0");
  backup.set_starting(true);
  for (int i = 0; i < 4; ++i) {  // 20 s: two leases
    clock_.Advance(absl::Seconds(5));
    absl::StatusOr<HeartbeatResponse> r = core_->Heartbeat(primary);
    ASSERT_TRUE(r.ok());
    EXPECT_FALSE(r->promote());
    ASSERT_TRUE(core_->Heartbeat(backup).ok());
    ASSERT_TRUE(core_->Heartbeat(Beat("worker-0")).ok());
    core_->Tick();
  }
  JobStatus status = core_->Status();
  EXPECT_EQ(status.state(), RUNNING);
  EXPECT_TRUE(Find(status, "server-0")->alive());
  EXPECT_TRUE(Find(status, "backup-0")->alive());
  // Both serve; then the primary dies and the backup takes over.
  ASSERT_TRUE(core_->Heartbeat(ReplicaBeat("server-0", true, 1)).ok());
  PrimaryMissesItsLease(ReplicaBeat("backup-0", false, 1));
  EXPECT_TRUE(core_->Heartbeat(ReplicaBeat("backup-0", false, 1))->promote())
      << Log();
  EXPECT_EQ(core_->CurrentState(), RUNNING);
}

// A process whose slot went to a newer registration (it was frozen past
// its lease) is told it is fenced off and changes nothing of the slot.
TEST_F(SchedulerCoreTest, AReplacedRegistrationIsFenced) {
  StartReplicatedJob();
  // The backup freezes; its lease expires and a new process takes its slot.
  clock_.Advance(absl::Seconds(8));
  ASSERT_TRUE(core_->Heartbeat(ReplicaBeat("server-0", true, 1)).ok());
  ASSERT_TRUE(core_->Heartbeat(Beat("worker-0")).ok());
  clock_.Advance(absl::Seconds(3));
  core_->Tick();
  RegisterRequest again = Server("b:2", 0);
  again.set_backup(true);
  absl::StatusOr<RegisterResponse> r = core_->Register(again);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->node_id(), "backup-0");
  const int64_t newer = r->incarnation();
  EXPECT_GT(newer, 0);
  // The frozen process wakes up and heartbeats under the same node id.
  HeartbeatRequest old = ReplicaBeat("backup-0", false, 1);
  old.set_incarnation(newer - 1);
  absl::StatusOr<HeartbeatResponse> answer = core_->Heartbeat(old);
  ASSERT_TRUE(answer.ok());
  EXPECT_TRUE(answer->fenced());
  const JobStatus status = core_->Status();
  const NodeStatus* b = Find(status, "backup-0");
  ASSERT_NE(b, nullptr);
  EXPECT_EQ(b->address(), "b:2");
  EXPECT_TRUE(b->needs_snapshot());  // the new process has no copy yet
  HeartbeatRequest current = ReplicaBeat("backup-0", false, 1, true);
  current.set_incarnation(newer);
  EXPECT_FALSE(core_->Heartbeat(current)->fenced());
}

// A backup counts as a complete copy only in the current epoch: once its
// snapshot arrived it can be promoted; after the primary served without it
// (detach, a new epoch) it cannot, until a new snapshot.
TEST_F(SchedulerCoreTest, OnlyABackupOfTheCurrentEpochIsPromoted) {
  StartReplicatedJob();
  ASSERT_EQ(core_->CurrentState(), RUNNING);
  // The backup becomes unreachable for the primary, which asks to serve
  // alone: epoch 2, the backup is stale.
  HeartbeatRequest lost = ReplicaBeat("server-0", true, 1);
  lost.set_backup_lost(true);
  absl::StatusOr<HeartbeatResponse> r = core_->Heartbeat(lost);
  ASSERT_TRUE(r.ok());
  EXPECT_TRUE(r->detach_backup());
  EXPECT_EQ(r->epoch(), 2);
  EXPECT_TRUE(Logged("server-0 (p:1) lost its backup; it serves shard 0 "
                     "without backup-0 (b:1) in epoch 2"))
      << Log();
  // Asked again (the answer was lost): the same leave, no new epoch.
  r = core_->Heartbeat(lost);
  EXPECT_TRUE(r->detach_backup());
  EXPECT_EQ(r->epoch(), 2);
  // The stale backup still reports epoch 1; the primary dies: no promotion.
  PrimaryMissesItsLease(ReplicaBeat("backup-0", false, 1));
  EXPECT_FALSE(core_->Heartbeat(ReplicaBeat("backup-0", false, 1))->promote());
  ASSERT_TRUE(core_->Heartbeat(Beat("worker-0")).ok());
  clock_.Advance(absl::Seconds(11));
  core_->Tick();
  EXPECT_EQ(core_->CurrentState(), FAILED);
  EXPECT_TRUE(absl::StrContains(core_->StateMessage(), "lost both copies"))
      << core_->StateMessage();
}

// The primary dies just after its new backup received the snapshot, before
// the backup's heartbeat said so: the backup is promoted when it does.
TEST_F(SchedulerCoreTest, ABackupWhoseReportLaggedIsPromoted) {
  StartReplicatedJob();
  HeartbeatRequest lost = ReplicaBeat("server-0", true, 1);
  lost.set_backup_lost(true);
  ASSERT_EQ(core_->Heartbeat(lost)->epoch(), 2);
  PrimaryMissesItsLease(ReplicaBeat("backup-0", false, 1));
  EXPECT_EQ(core_->CurrentState(), RUNNING);
  absl::StatusOr<HeartbeatResponse> r =
      core_->Heartbeat(ReplicaBeat("backup-0", false, 2));
  EXPECT_TRUE(r->promote());
  EXPECT_EQ(r->epoch(), 3);
  for (int i = 0; i < 4; ++i) {  // past the orphan grace: still serving
    clock_.Advance(absl::Seconds(5));
    ASSERT_TRUE(core_->Heartbeat(ReplicaBeat("backup-0", true, 3)).ok());
    ASSERT_TRUE(core_->Heartbeat(Beat("worker-0")).ok());
    core_->Tick();
  }
  EXPECT_EQ(core_->CurrentState(), RUNNING);
}

TEST_F(SchedulerCoreTest, ABackupHoldingTheSnapshotIsPromoted) {
  StartReplicatedJob();
  HeartbeatRequest lost = ReplicaBeat("server-0", true, 1);
  lost.set_backup_lost(true);
  ASSERT_EQ(core_->Heartbeat(lost)->epoch(), 2);
  // The primary re-attaches it with a snapshot of epoch 2.
  EXPECT_EQ(core_->Heartbeat(ReplicaBeat("server-0", true, 2))->backup_address(),
            "b:1");
  ASSERT_TRUE(core_->Heartbeat(ReplicaBeat("backup-0", false, 2)).ok());
  PrimaryMissesItsLease(ReplicaBeat("backup-0", false, 2));
  EXPECT_EQ(core_->CurrentState(), RUNNING);
  absl::StatusOr<HeartbeatResponse> r =
      core_->Heartbeat(ReplicaBeat("backup-0", false, 2));
  EXPECT_TRUE(r->promote());
  EXPECT_EQ(r->epoch(), 3);
}

// Elastic: a surplus worker grows dp at a boundary two steps past the
// shards; once every worker stopped there the job re-assembles with the
// new dp from that checkpoint. A dead worker without a replacement shrinks
// it back, stopping at the shards' current version.
TEST_F(SchedulerCoreTest, ElasticGrowsAndShrinksDp) {
  ElasticOptions e;
  e.min_dp = 1;
  e.max_dp = 3;
  e.grace = absl::Seconds(5);
  Start(/*dp=*/2, /*shards=*/1, absl::Seconds(120), absl::Seconds(10), 0, e);
  Id(Server("s:1", 0));
  Id(Worker("host-0"));
  Id(Worker("host-1"));
  ASSERT_EQ(core_->CurrentState(), RUNNING);
  EXPECT_TRUE(core_->GetAssignment("worker-0", absl::InfiniteFuture())->elastic());
  ASSERT_TRUE(core_->Heartbeat(Beat("server-0", 40)).ok());
  EXPECT_FALSE(core_->TakeResizePlan().has_value());

  // A third worker asks to join: RESOURCE_EXHAUSTED, counted as surplus.
  RegisterRequest extra = Worker("host-2");
  extra.set_instance_id("host-2/1");
  absl::StatusOr<RegisterResponse> r = core_->Register(extra);
  ASSERT_EQ(r.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_TRUE(absl::StrContains(r.status().message(), "elastic")) << r.status();
  EXPECT_EQ(ReasonOf(r.status()), ELASTIC_SURPLUS) << r.status();
  core_->Tick();
  std::optional<ResizePlan> plan = core_->TakeResizePlan();
  ASSERT_TRUE(plan.has_value()) << Log();
  EXPECT_EQ(plan->from_dp, 2);
  EXPECT_EQ(plan->to_dp, 3);
  EXPECT_EQ(plan->first_step, 42);
  EXPECT_EQ(plan->shard_addresses, std::vector<std::string>{"s:1"});
  EXPECT_FALSE(core_->TakeResizePlan().has_value());  // handed out once
  // While resizing no worker can register.
  EXPECT_EQ(core_->Register(extra).status().code(),
            absl::StatusCode::kResourceExhausted);
  core_->ResizeStopped(43);
  HeartbeatRequest stopped = Beat("worker-0", 42);
  stopped.set_stopped_for_resize(true);
  ASSERT_TRUE(core_->Heartbeat(stopped).ok());
  EXPECT_EQ(core_->CurrentState(), RUNNING);  // worker-1 still running
  stopped.set_node_id("worker-1");
  ASSERT_TRUE(core_->Heartbeat(stopped).ok());
  EXPECT_EQ(core_->CurrentState(), ASSEMBLING);
  EXPECT_TRUE(Logged("re-assembling with dp 3 (was 2)")) << Log();
  // The server is told to register again; it reports the boundary's
  // checkpoint, which becomes the start step.
  absl::StatusOr<HeartbeatResponse> hb = core_->Heartbeat(Beat("server-0", 43));
  ASSERT_TRUE(hb.ok()) << hb.status();
  EXPECT_TRUE(hb->reassemble());
  Id(Server("s:1", 0, {40, 43}, core_->partition().version()));
  for (int i = 0; i < 3; ++i) Id(Worker(absl::StrCat("host-", i)));
  ASSERT_EQ(core_->CurrentState(), RUNNING);
  absl::StatusOr<Assignment> a =
      core_->GetAssignment("worker-2", absl::InfiniteFuture());
  ASSERT_TRUE(a.ok());
  EXPECT_EQ(a->spec().layout().dp(), 3);
  EXPECT_EQ(a->dp_rank(), 2);
  EXPECT_EQ(a->start_step(), 43);
  EXPECT_EQ(core_->expected_workers(), 3);

  // worker-2 dies; after its lease and the grace dp shrinks to 2 at the
  // shards' version (the others wait for its gradient there).
  clock_.Advance(absl::Seconds(8));
  ASSERT_TRUE(core_->Heartbeat(Beat("server-0", 50)).ok());
  ASSERT_TRUE(core_->Heartbeat(Beat("worker-0", 50)).ok());
  ASSERT_TRUE(core_->Heartbeat(Beat("worker-1", 50)).ok());
  clock_.Advance(absl::Seconds(3));  // worker-2's lease expires
  core_->Tick();
  EXPECT_FALSE(core_->TakeResizePlan().has_value());  // grace not over
  ASSERT_TRUE(core_->Heartbeat(Beat("server-0", 50)).ok());
  ASSERT_TRUE(core_->Heartbeat(Beat("worker-0", 50)).ok());
  ASSERT_TRUE(core_->Heartbeat(Beat("worker-1", 50)).ok());
  clock_.Advance(absl::Seconds(6));
  core_->Tick();
  plan = core_->TakeResizePlan();
  ASSERT_TRUE(plan.has_value()) << Log();
  EXPECT_EQ(plan->to_dp, 2);
  EXPECT_EQ(plan->first_step, 50);
  core_->ResizeFailed("shard unreachable");
  EXPECT_TRUE(Logged("failed: shard unreachable")) << Log();
  EXPECT_EQ(core_->CurrentState(), RUNNING);
}

// Regroup: in a pipeline job a lost worker's stage partner cannot finish
// the step. Once its lease expires the job stops at the shards' version
// with dp unchanged (workers hear peers_lost, so they stop waiting for the
// peer) and re-assembles from that step's checkpoint; a replacement takes
// the lost rank and the step is redone.
TEST_F(SchedulerCoreTest, LostPipelineWorkerRegroupsTheJobAtItsStep) {
  const std::string first = StartPipelineJob();
  ASSERT_EQ(core_->CurrentState(), RUNNING);
  EXPECT_TRUE(core_->GetAssignment(first, absl::InfiniteFuture())->elastic());
  ASSERT_TRUE(core_->Heartbeat(Beat("server-0", 7)).ok());
  EXPECT_FALSE(core_->Heartbeat(Beat(first, 7))->peers_lost());

  clock_.Advance(absl::Seconds(8));
  ASSERT_TRUE(core_->Heartbeat(Beat("server-0", 7)).ok());
  ASSERT_TRUE(core_->Heartbeat(Beat(first, 7)).ok());
  clock_.Advance(absl::Seconds(3));  // the rank-1 worker's lease expires
  core_->Tick();
  core_->Tick();
  std::optional<ResizePlan> plan = core_->TakeResizePlan();
  ASSERT_TRUE(plan.has_value()) << Log();
  EXPECT_EQ(plan->from_dp, 1);
  EXPECT_EQ(plan->to_dp, 1);
  EXPECT_EQ(plan->first_step, 7);
  EXPECT_EQ(plan->ahead, 0);
  EXPECT_TRUE(Logged("regroup (dp 1): worker-1 (h1:1) missed its heartbeat "
                     "lease"))
      << Log();
  EXPECT_TRUE(core_->Heartbeat(Beat(first, 7))->peers_lost());
  const RegisterRequest replacement = PipelineWorker("h9:1", 1);
  EXPECT_EQ(core_->Register(replacement).status().code(),
            absl::StatusCode::kResourceExhausted);  // not while regrouping

  core_->ResizeStopped(7);
  HeartbeatRequest stopped = Beat(first, 7);
  stopped.set_stopped_for_resize(true);
  ASSERT_TRUE(core_->Heartbeat(stopped).ok());
  EXPECT_EQ(core_->CurrentState(), ASSEMBLING);
  EXPECT_TRUE(Logged("regroup: every live worker stopped at step 7 (1 whose "
                     "lease expired did not); re-assembling with dp 1 (was "
                     "1)"))
      << Log();
  EXPECT_TRUE(core_->Heartbeat(Beat("server-0", 7))->reassemble());
  Id(Server("s:1", 0, {7}, core_->partition().version()));
  Id(PipelineWorker("h0:1", 0));
  const std::string replaced = Id(replacement);
  ASSERT_EQ(core_->CurrentState(), RUNNING);
  absl::StatusOr<Assignment> a =
      core_->GetAssignment(replaced, absl::InfiniteFuture());
  ASSERT_TRUE(a.ok()) << a.status();
  EXPECT_EQ(a->pp_rank(), 1);
  EXPECT_EQ(a->start_step(), 7);
  EXPECT_FALSE(core_->Heartbeat(Beat(replaced, 7))->peers_lost());
}

// The dead worker's replacement registering is the first call after the
// lease expired: the regroup is planned in that same call, so the
// replacement is refused until the job re-assembles instead of taking the
// slot in place in the running job (whose other workers are about to stop
// for the regroup: it would train alone, waiting for peers that left).
TEST_F(SchedulerCoreTest, ReplacementRegisteringAsTheLeaseExpiresWaitsForTheRegroup) {
  const std::string first = StartPipelineJob();
  ASSERT_EQ(core_->CurrentState(), RUNNING);
  clock_.Advance(absl::Seconds(8));
  ASSERT_TRUE(core_->Heartbeat(Beat("server-0", 7)).ok());
  ASSERT_TRUE(core_->Heartbeat(Beat(first, 7)).ok());
  clock_.Advance(absl::Seconds(3));  // the rank-1 worker's lease expires
  EXPECT_EQ(core_->Register(PipelineWorker("h9:1", 1)).status().code(),
            absl::StatusCode::kResourceExhausted)
      << Log();
  EXPECT_TRUE(core_->TakeResizePlan().has_value()) << Log();
}

// Every worker's lease expires while they are alive (frozen, or cut off
// from the scheduler): none stops for the regroup, so the job re-assembles
// at once. A worker of the old assembly heartbeating afterwards is told to
// register again (reassemble), not NOT_FOUND (which would make it rejoin
// the new assembly in place, still in a step of the old one); once it
// registered again its old registration is fenced.
TEST_F(SchedulerCoreTest, WorkersFrozenPastTheirLeaseAreToldToRegisterAgain) {
  Start(/*dp=*/1, /*shards=*/1, absl::Seconds(120), absl::Seconds(10), 0, {},
        /*pp=*/2);
  Id(Server("s:1", 0));
  absl::StatusOr<RegisterResponse> old0 =
      core_->Register(PipelineWorker("h0:1", 0));
  ASSERT_TRUE(old0.ok()) << old0.status();
  Id(PipelineWorker("h1:1", 1));
  ASSERT_EQ(core_->CurrentState(), RUNNING);
  clock_.Advance(absl::Seconds(8));
  ASSERT_TRUE(core_->Heartbeat(Beat("server-0", 7)).ok());
  clock_.Advance(absl::Seconds(3));  // both workers' leases expire
  core_->Tick();
  core_->Tick();
  ASSERT_TRUE(core_->TakeResizePlan().has_value()) << Log();
  core_->ResizeStopped(7);
  core_->Tick();
  ASSERT_EQ(core_->CurrentState(), ASSEMBLING) << Log();
  EXPECT_TRUE(Logged("regroup: every live worker stopped at step 7 (2 whose "
                     "lease expired did not)"))
      << Log();

  HeartbeatRequest thawed = Beat(old0->node_id(), 8);
  thawed.set_incarnation(old0->incarnation());
  absl::StatusOr<HeartbeatResponse> told = core_->Heartbeat(thawed);
  ASSERT_TRUE(told.ok()) << told.status();
  EXPECT_TRUE(told->reassemble());
  EXPECT_TRUE(Logged(absl::StrCat("a heartbeat of ", old0->node_id(),
                                  " (step 8) from the job before its "
                                  "re-assembly: told to register again")))
      << Log();
  EXPECT_TRUE(core_->Heartbeat(Beat("server-0", 7))->reassemble());
  // Its step failing on the re-assembled shards does not fail the job: the
  // report of a worker of the old assembly is answered the same.
  HeartbeatRequest failed = thawed;
  failed.set_error("parameter server has no shard assignment yet");
  told = core_->Heartbeat(failed);
  ASSERT_TRUE(told.ok()) << told.status();
  EXPECT_TRUE(told->reassemble());
  EXPECT_EQ(core_->CurrentState(), ASSEMBLING) << Log();

  Id(Server("s:1", 0, {7}, core_->partition().version()));
  const std::string again = Id(PipelineWorker("h0:1", 0));
  EXPECT_EQ(again, old0->node_id());
  Id(PipelineWorker("h1:1", 1));
  ASSERT_EQ(core_->CurrentState(), RUNNING) << Log();
  EXPECT_EQ(core_->GetAssignment(again, absl::InfiniteFuture())->start_step(),
            7);
  told = core_->Heartbeat(thawed);
  ASSERT_TRUE(told.ok()) << told.status();
  EXPECT_FALSE(told->reassemble());
  EXPECT_TRUE(told->fenced());
}

// Without a replacement the re-assembly times out naming the lost rank.
TEST_F(SchedulerCoreTest, RegroupWithoutReplacementNamesTheMissingRank) {
  Start(/*dp=*/1, /*shards=*/1, absl::Seconds(30), absl::Seconds(10), 0, {},
        /*pp=*/2);
  RegisterRequest w0 = Worker("host");
  w0.set_address("h0:1");
  RegisterRequest w1 = w0;
  w1.set_address("h1:1");
  Id(Server("s:1", 0));
  const std::string first = Id(w0);
  Id(w1);
  ASSERT_EQ(core_->CurrentState(), RUNNING);
  clock_.Advance(absl::Seconds(8));
  ASSERT_TRUE(core_->Heartbeat(Beat("server-0", 3)).ok());
  ASSERT_TRUE(core_->Heartbeat(Beat(first, 3)).ok());
  clock_.Advance(absl::Seconds(3));
  core_->Tick();
  core_->Tick();
  ASSERT_TRUE(core_->TakeResizePlan().has_value()) << Log();
  core_->ResizeStopped(3);
  HeartbeatRequest stopped = Beat(first, 3);
  stopped.set_stopped_for_resize(true);
  ASSERT_TRUE(core_->Heartbeat(stopped).ok());
  ASSERT_EQ(core_->CurrentState(), ASSEMBLING);
  Id(Server("s:1", 0, {3}, core_->partition().version()));
  Id(w0);
  clock_.Advance(absl::Seconds(31));
  core_->Tick();
  EXPECT_EQ(core_->CurrentState(), FAILED);
  EXPECT_TRUE(absl::StrContains(core_->StateMessage(),
                                "missing 1 of 2 workers, 0 of 1 server: "
                                "worker rank 1 (dp 0, pp 1, tp 0)"))
      << core_->StateMessage();
}

// A restarted server takes the slot of its address; since it lost its
// state, the running job fails for a rollback and takes no more nodes.
TEST_F(SchedulerCoreTest, RestartedServerTakesItsSlotAndFailsTheJob) {
  Assemble(/*dp=*/1, /*shards=*/3);
  clock_.Advance(absl::Seconds(11));  // every lease expires
  core_->Tick();
  EXPECT_EQ(Id(Server("127.0.0.1:4002")), "server-2");
  EXPECT_EQ(core_->CurrentState(), FAILED);
  EXPECT_TRUE(absl::StrContains(core_->StateMessage(), "shard 2 restarted"))
      << core_->StateMessage();
  EXPECT_EQ(core_->Register(Server("other:1", /*requested=*/1)).status().code(),
            absl::StatusCode::kFailedPrecondition);
}

TEST_F(SchedulerCoreTest, ConcurrentRegistrationsGetDistinctRanks) {
  Start(/*dp=*/8, /*shards=*/4);
  std::vector<std::thread> threads;
  absl::Mutex mu;
  std::vector<Assignment> assignments;
  for (int i = 0; i < 12; ++i) {
    threads.emplace_back([&, i] {
      const std::string id =
          i < 4 ? Id(Server(absl::StrCat("10.0.0.1:", 5000 + i)))
                : Id(Worker(absl::StrCat("w", i)));
      absl::StatusOr<Assignment> a =
          core_->GetAssignment(id, absl::InfiniteFuture());
      ASSERT_TRUE(a.ok()) << a.status();
      absl::MutexLock lock(&mu);
      assignments.push_back(*a);
    });
  }
  for (std::thread& t : threads) t.join();
  ASSERT_EQ(assignments.size(), 12u);
  std::set<int> shards, ranks;
  for (const Assignment& a : assignments) {
    if (a.role() == SERVER) shards.insert(a.shard());
    if (a.role() == WORKER) ranks.insert(a.dp_rank());
    EXPECT_EQ(a.shard_addresses_size(), 4);
  }
  EXPECT_EQ(shards.size(), 4u);
  EXPECT_EQ(ranks.size(), 8u);
  EXPECT_EQ(*ranks.rbegin(), 7);
}

TEST_F(SchedulerCoreTest, ShutdownReleasesWaiters) {
  Start(1, 1);
  Id(Worker("w"));
  Captured waiting;
  core_->GetAssignmentAsync("worker-0", absl::InfiniteFuture(),
                            waiting.Callback());
  core_->Shutdown();
  ASSERT_TRUE(waiting.has());
  EXPECT_EQ(waiting.get().status().code(), absl::StatusCode::kUnavailable);
  EXPECT_EQ(core_->Register(Server("a:1")).status().code(),
            absl::StatusCode::kUnavailable);
}


}  // namespace
}  // namespace scheduler_test
}  // namespace lmps
