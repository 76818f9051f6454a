// SchedulerCore: creation, registration, assembly, assignments, the start
// step, job end and errors, leases and replacements (replicated shards,
// fencing, elastic resizes and regroups: scheduler_faults_test.cc).
#include "server/scheduler/scheduler_core_test_util.h"

namespace lmps {
namespace scheduler_test {
namespace {

TEST_F(SchedulerCoreTest, CreateRejectsBadOptions) {
  SchedulerOptions options;
  options.spec = Spec(1, 1);
  options.spec.mutable_layout()->set_dp(3);  // batch 16 % 3 != 0
  EXPECT_EQ(SchedulerCore::Create(options, &clock_).status().code(),
            absl::StatusCode::kInvalidArgument);
  options.spec = Spec(1, 1);
  options.lease = absl::ZeroDuration();
  EXPECT_EQ(SchedulerCore::Create(options, &clock_).status().code(),
            absl::StatusCode::kInvalidArgument);
  options.lease = absl::Seconds(1);
  EXPECT_EQ(SchedulerCore::Create(options, nullptr).status().code(),
            absl::StatusCode::kInvalidArgument);
}

// pp = 2, tp = 2: workers must give their peer address; assignments carry
// the stage's layers and every worker's ranks and address.
TEST_F(SchedulerCoreTest, PipelineAndTensorParallelAssignments) {
  SchedulerOptions options;
  options.spec = Spec(1, 1);
  options.spec.mutable_layout()->set_pp(2);
  options.spec.mutable_layout()->set_tp(2);
  auto created = SchedulerCore::Create(options, &clock_);
  ASSERT_TRUE(created.ok()) << created.status();
  core_ = std::move(*created);
  EXPECT_EQ(core_->expected_workers(), 4);
  absl::StatusOr<RegisterResponse> no_address = core_->Register(Worker("h"));
  ASSERT_FALSE(no_address.ok());
  EXPECT_NE(no_address.status().message().find("WorkerPeer"), std::string::npos);
  for (int i = 0; i < 4; ++i) {
    RegisterRequest w = Worker("h");
    w.set_address(absl::StrCat("127.0.0.1:50", i));
    EXPECT_EQ(Id(w), absl::StrCat("worker-", i));
  }
  EXPECT_EQ(Id(Server("127.0.0.1:4001")), "server-0");
  absl::StatusOr<Assignment> w3 =
      core_->GetAssignment("worker-3", absl::InfiniteFuture());
  ASSERT_TRUE(w3.ok()) << w3.status();
  EXPECT_EQ(w3->pp_rank(), 1);
  EXPECT_EQ(w3->tp_rank(), 1);
  EXPECT_EQ(w3->layer_begin(), 1);
  EXPECT_EQ(w3->layer_end(), 2);
  ASSERT_EQ(w3->workers_size(), 4);
  EXPECT_EQ(w3->workers(2).address(), "127.0.0.1:502");
  EXPECT_EQ(w3->workers(2).pp_rank(), 1);
  EXPECT_EQ(w3->workers(2).tp_rank(), 0);
  absl::StatusOr<Assignment> w0 =
      core_->GetAssignment("worker-0", absl::InfiniteFuture());
  ASSERT_TRUE(w0.ok());
  EXPECT_EQ(w0->layer_begin(), 0);
  EXPECT_EQ(w0->layer_end(), 1);
}

// train.workers_per_host: the workers of one host (hostname) get the
// consecutive dp ranks of one group, whatever order they register in; a
// host with more workers than a group spills into an empty group.
TEST_F(SchedulerCoreTest, WorkersOfOneHostShareAHostGroup) {
  SchedulerOptions options;
  options.spec = Spec(6, 1);
  options.spec.mutable_train()->set_batch_size(12);
  options.spec.mutable_train()->set_workers_per_host(2);
  auto created = SchedulerCore::Create(options, &clock_);
  ASSERT_TRUE(created.ok()) << created.status();
  core_ = std::move(*created);
  EXPECT_EQ(Id(Worker("a")), "worker-0");
  EXPECT_EQ(Id(Worker("b")), "worker-2");
  EXPECT_EQ(Id(Worker("a")), "worker-1");
  EXPECT_EQ(Id(Worker("b")), "worker-3");
  EXPECT_EQ(Id(Worker("a")), "worker-4");  // a third worker on host a
  EXPECT_EQ(Id(Worker("c")), "worker-5");  // no empty group left
}

// A restarted scheduler: the running nodes rejoin with their ranks (in any
// order) and the job is RUNNING again without anyone asking for an
// assignment; a rejoin must name its rank.
TEST_F(SchedulerCoreTest, RejoiningNodesRebuildARestartedScheduler) {
  Start(/*dp=*/2, /*shards=*/1);
  RegisterRequest bad = Worker("h");
  bad.set_rejoin(true);
  bad.set_requested_rank(7);
  EXPECT_EQ(core_->Register(bad).status().code(), absl::StatusCode::kInvalidArgument);
  RegisterRequest w1 = Worker("h1");
  w1.set_rejoin(true);
  w1.set_requested_rank(1);
  w1.set_step(42);
  EXPECT_EQ(Id(w1), "worker-1");
  RegisterRequest s0 = Server("127.0.0.1:4001", 0);
  s0.set_rejoin(true);
  EXPECT_EQ(Id(s0), "server-0");
  RegisterRequest w0 = Worker("h0");
  w0.set_rejoin(true);
  w0.set_requested_rank(0);
  EXPECT_EQ(Id(w0), "worker-0");
  JobStatus status = core_->Status();
  EXPECT_EQ(status.state(), RUNNING);
  EXPECT_EQ(Find(status, "worker-1")->step(), 42);
  EXPECT_TRUE(absl::StrContains(Find(status, "worker-1")->last_event(),
                                "rejoined the running job at step 42"))
      << Find(status, "worker-1")->last_event();
  EXPECT_TRUE(absl::StrContains(Find(status, "worker-1")->last_event(),
                                "keeps its assignment"));
}

TEST_F(SchedulerCoreTest, AssemblesAndHandsOutAssignments) {
  Start(/*dp=*/2, /*shards=*/2);
  EXPECT_EQ(core_->expected_servers(), 2);
  EXPECT_EQ(core_->expected_workers(), 2);
  EXPECT_EQ(Id(Worker("host-a")), "worker-0");
  Captured early;
  core_->GetAssignmentAsync("worker-0", absl::InfiniteFuture(),
                            early.Callback());
  EXPECT_FALSE(early.has());
  EXPECT_EQ(core_->CurrentState(), ASSEMBLING);
  EXPECT_EQ(Id(Server("127.0.0.1:4001")), "server-0");
  EXPECT_EQ(Id(Worker("host-b")), "worker-1");
  EXPECT_FALSE(early.has());
  absl::StatusOr<RegisterResponse> last = core_->Register(Server("127.0.0.1:4002"));
  ASSERT_TRUE(last.ok()) << last.status();
  EXPECT_EQ(last->node_id(), "server-1");
  EXPECT_EQ(last->lease_ms(), 10000);
  EXPECT_EQ(core_->CurrentState(), RUNNING);
  ASSERT_TRUE(early.has());

  absl::StatusOr<PartitionMap> partition =
      ComputePartition(Spec(2, 2).model(), 2, 2048);
  ASSERT_TRUE(partition.ok());
  absl::StatusOr<Assignment> w0 = early.get();
  ASSERT_TRUE(w0.ok()) << w0.status();
  EXPECT_EQ(w0->node_id(), "worker-0");
  EXPECT_EQ(w0->role(), WORKER);
  EXPECT_EQ(w0->dp_rank(), 0);
  EXPECT_EQ(w0->pp_rank(), 0);
  EXPECT_EQ(w0->tp_rank(), 0);
  EXPECT_EQ(w0->shard(), -1);
  EXPECT_EQ(w0->start_step(), 0);
  EXPECT_EQ(w0->spec().layout().dp(), 2);
  EXPECT_EQ(w0->partition().version(), partition->version());
  EXPECT_EQ(w0->partition().chunks_size(), partition->chunks_size());
  ASSERT_EQ(w0->shard_addresses_size(), 2);
  EXPECT_EQ(w0->shard_addresses(0), "127.0.0.1:4001");
  EXPECT_EQ(w0->shard_addresses(1), "127.0.0.1:4002");

  absl::StatusOr<Assignment> w1 = core_->GetAssignment("worker-1", absl::InfiniteFuture());
  ASSERT_TRUE(w1.ok()) << w1.status();
  EXPECT_EQ(w1->dp_rank(), 1);
  absl::StatusOr<Assignment> s1 = core_->GetAssignment("server-1", absl::InfiniteFuture());
  ASSERT_TRUE(s1.ok()) << s1.status();
  EXPECT_EQ(s1->role(), SERVER);
  EXPECT_EQ(s1->shard(), 1);
  EXPECT_EQ(s1->dp_rank(), -1);

  JobStatus status = core_->Status();
  EXPECT_EQ(status.state(), RUNNING);
  ASSERT_EQ(status.nodes_size(), 4);
  EXPECT_EQ(status.nodes(0).node_id(), "server-0");
  EXPECT_EQ(status.nodes(1).node_id(), "server-1");
  EXPECT_EQ(status.nodes(2).node_id(), "worker-0");
  EXPECT_EQ(status.nodes(3).node_id(), "worker-1");
  EXPECT_EQ(status.nodes(3).dp_rank(), 1);
  EXPECT_EQ(status.expected_servers(), 2);
  EXPECT_EQ(status.expected_workers(), 2);
  EXPECT_EQ(status.partition().version(), partition->version());
  EXPECT_TRUE(Logged("job assembled"));
  EXPECT_TRUE(Logged("ASSEMBLING -> RUNNING"));
}

TEST_F(SchedulerCoreTest, HonoursRequestedShardWhenFreeAndInRange) {
  Start(/*dp=*/1, /*shards=*/3);
  EXPECT_EQ(Id(Server("a:1", /*requested=*/2)), "server-2");
  EXPECT_EQ(Id(Server("a:2", /*requested=*/2)), "server-0");   // taken
  EXPECT_EQ(Id(Server("a:3", /*requested=*/17)), "server-1");  // out of range
  EXPECT_TRUE(Logged("requested shard 2 is taken"));
  EXPECT_TRUE(Logged("requested shard 17 is out of range"));
}

TEST_F(SchedulerCoreTest, ServerWithTheSameAddressGetsItsSlotBack) {
  Start(/*dp=*/1, /*shards=*/2);
  EXPECT_EQ(Id(Server("a:1")), "server-0");
  EXPECT_EQ(Id(Server("a:1", -1, {10}, core_->partition().version())),
            "server-0");
  EXPECT_EQ(Id(Server("a:2")), "server-1");
  EXPECT_EQ(core_->CurrentState(), ASSEMBLING);
}

// Two live shards behind one advertised address (e.g. a Service name) that
// ask for different shard ids are two nodes, not one restarting.
TEST_F(SchedulerCoreTest, LiveShardsSharingAnAddressKeepTheirOwnSlots) {
  Start(/*dp=*/1, /*shards=*/2);
  EXPECT_EQ(Id(Server("svc:7071", /*requested=*/1)), "server-1");
  EXPECT_EQ(Id(Server("svc:7071", /*requested=*/0)), "server-0");
  // The same shard asking again is a restart and keeps its slot.
  EXPECT_EQ(Id(Server("svc:7071", /*requested=*/1)), "server-1");
}

TEST_F(SchedulerCoreTest, WorkersMayAskForARank) {
  Start(/*dp=*/4, /*shards=*/1);
  RegisterRequest w = Worker("h");
  w.set_requested_rank(2);
  EXPECT_EQ(Id(w), "worker-2");
  EXPECT_EQ(Id(Worker("h")), "worker-0");
  EXPECT_EQ(Id(w), "worker-1");  // 2 is taken: the next free one
}

TEST_F(SchedulerCoreTest, TooManyNodesIsResourceExhausted) {
  Start(/*dp=*/2, /*shards=*/1);
  Id(Server("a:1"));
  Id(Worker("w0"));
  Id(Worker("w1"));
  absl::StatusOr<RegisterResponse> extra = core_->Register(Worker("w2"));
  EXPECT_EQ(extra.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_TRUE(absl::StrContains(extra.status().message(), "too many workers"))
      << extra.status();
  EXPECT_TRUE(absl::StrContains(extra.status().message(), "expects 2"))
      << extra.status();
  EXPECT_EQ(ReasonOf(extra.status()), ERROR_REASON_UNSPECIFIED)
      << "not elastic: no surplus to stand by";
  extra = core_->Register(Server("a:2"));
  EXPECT_EQ(extra.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_TRUE(absl::StrContains(extra.status().message(), "too many servers"));
}

TEST_F(SchedulerCoreTest, BadRegistrationsAreInvalidArgument) {
  Start(1, 1);
  for (int role : {0, 1, 42}) {
    RegisterRequest r = Worker("x");
    r.set_role(static_cast<Role>(role));
    absl::StatusOr<RegisterResponse> resp = core_->Register(r);
    EXPECT_EQ(resp.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_TRUE(absl::StrContains(resp.status().message(), "valid roles"));
  }
  EXPECT_EQ(core_->Register(Server("")).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(core_->Status().nodes_size(), 0);
}

TEST_F(SchedulerCoreTest, UnknownNodeIsNotFound) {
  Start(1, 1);
  EXPECT_EQ(core_->GetAssignment("worker-0", absl::InfiniteFuture()).status().code(),
            absl::StatusCode::kNotFound);  // slot exists, nobody registered
  EXPECT_EQ(core_->GetAssignment("nope", absl::InfiniteFuture()).status().code(),
            absl::StatusCode::kNotFound);
  EXPECT_EQ(core_->Heartbeat(Beat("worker-7")).status().code(),
            absl::StatusCode::kNotFound);
}

TEST_F(SchedulerCoreTest, AssembleTimeoutNamesWhatIsMissing) {
  Start(/*dp=*/2, /*shards=*/2);
  Id(Server("127.0.0.1:4001"));
  Id(Worker("host-a"));
  Captured waiting;
  core_->GetAssignmentAsync("worker-0", absl::InfiniteFuture(),
                            waiting.Callback());
  clock_.Advance(absl::Seconds(119));
  core_->Tick();
  EXPECT_FALSE(waiting.has());
  EXPECT_EQ(core_->CurrentState(), ASSEMBLING);
  EXPECT_TRUE(absl::StrContains(core_->StateMessage(), "missing 1 of 2"));
  clock_.Advance(absl::Seconds(1));
  core_->Tick();
  ASSERT_TRUE(waiting.has());
  absl::Status st = waiting.get().status();
  EXPECT_EQ(st.code(), absl::StatusCode::kDeadlineExceeded);
  EXPECT_EQ(st.message(),
            "job did not assemble within 120s: missing 1 of 2 workers, 1 of 2 "
            "servers: shard 1, worker rank 1 (dp 1, pp 0, tp 0) (registered: "
            "server-0 at 127.0.0.1:4001, worker-0 at host-a)");
  EXPECT_EQ(core_->CurrentState(), FAILED);
  absl::StatusOr<HeartbeatResponse> hb = core_->Heartbeat(Beat("worker-0"));
  ASSERT_TRUE(hb.ok());
  EXPECT_EQ(hb->state(), FAILED);
  EXPECT_EQ(hb->message(), st.message());
  // Late nodes are turned away; GetAssignment fails at once.
  EXPECT_EQ(core_->Register(Worker("late")).status().code(),
            absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(core_->GetAssignment("server-0", absl::InfiniteFuture()).status().code(),
            absl::StatusCode::kDeadlineExceeded);
  EXPECT_TRUE(Logged("ASSEMBLING -> FAILED: job did not assemble within 120s"));
}

TEST_F(SchedulerCoreTest, NothingRegisteredSaysNone) {
  Start(1, 1, absl::Seconds(2));
  clock_.Advance(absl::Seconds(2));
  EXPECT_EQ(core_->StateMessage(),
            "job did not assemble within 2s: missing 1 of 1 worker, 1 of 1 "
            "server: shard 0, worker rank 0 (dp 0, pp 0, tp 0) (registered: "
            "none)");
}

TEST_F(SchedulerCoreTest, CallersDeadlineEndsOnlyThatWait) {
  Start(/*dp=*/1, /*shards=*/1);
  Id(Worker("host-a"));
  Captured short_wait, long_wait;
  core_->GetAssignmentAsync("worker-0", clock_.Now() + absl::Seconds(5),
                            short_wait.Callback());
  core_->GetAssignmentAsync("worker-0", absl::InfiniteFuture(),
                            long_wait.Callback());
  clock_.Advance(absl::Seconds(5));
  core_->Tick();
  ASSERT_TRUE(short_wait.has());
  EXPECT_EQ(short_wait.get().status().code(),
            absl::StatusCode::kDeadlineExceeded);
  EXPECT_TRUE(absl::StrContains(short_wait.get().status().message(),
                                "missing 0 of 1 worker, 1 of 1 server"))
      << short_wait.get().status();
  EXPECT_FALSE(long_wait.has());
  EXPECT_EQ(core_->CurrentState(), ASSEMBLING);
  // A deadline already in the past fails at once.
  Captured past;
  core_->GetAssignmentAsync("worker-0", clock_.Now() - absl::Seconds(1),
                            past.Callback());
  ASSERT_TRUE(past.has());
  EXPECT_EQ(past.get().status().code(), absl::StatusCode::kDeadlineExceeded);
  Id(Server("a:1"));
  ASSERT_TRUE(long_wait.has());
  EXPECT_TRUE(long_wait.get().ok());
}

TEST_F(SchedulerCoreTest, BlockingGetAssignmentWaitsForOtherThreads) {
  Start(/*dp=*/1, /*shards=*/1);
  Id(Worker("host-a"));
  std::thread other([this] {
    absl::SleepFor(absl::Milliseconds(50));
    Id(Server("a:1"));
  });
  absl::StatusOr<Assignment> a =
      core_->GetAssignment("worker-0", absl::InfiniteFuture());
  other.join();
  ASSERT_TRUE(a.ok()) << a.status();
  EXPECT_EQ(a->shard_addresses(0), "a:1");
  // And it notices a clock moved by another thread.
  Start(1, 1, absl::Seconds(30));
  Id(Worker("host-a"));
  std::thread mover([this] {
    absl::SleepFor(absl::Milliseconds(50));
    clock_.Advance(absl::Seconds(31));
  });
  a = core_->GetAssignment("worker-0", absl::InfiniteFuture());
  mover.join();
  EXPECT_EQ(a.status().code(), absl::StatusCode::kDeadlineExceeded);
}

TEST_F(SchedulerCoreTest, StartStepIsTheLatestCheckpointEveryShardHolds) {
  Start(/*dp=*/1, /*shards=*/2);
  const uint64_t v = core_->partition().version();
  Id(Server("a:1", -1, {50, 100, 150}, v));
  EXPECT_EQ(core_->Status().start_step(), 0);  // not every server yet
  Id(Server("a:2", -1, {100, 50}, v));
  EXPECT_EQ(core_->Status().start_step(), 100);
  EXPECT_TRUE(Logged("start_step = 100"));
  Id(Worker("w"));
  absl::StatusOr<Assignment> a = core_->GetAssignment("worker-0", absl::InfiniteFuture());
  ASSERT_TRUE(a.ok());
  EXPECT_EQ(a->start_step(), 100);
}

TEST_F(SchedulerCoreTest, CheckpointsOfAnotherPartitionAreIgnored) {
  Start(/*dp=*/1, /*shards=*/2);
  const uint64_t v = core_->partition().version();
  Id(Server("a:1", -1, {50, 100}, v));
  Id(Server("a:2", -1, {50, 100}, v + 1));
  Id(Worker("w"));
  EXPECT_EQ(core_->Status().start_step(), 0);
}

TEST_F(SchedulerCoreTest, LayoutChangeResumesFromCompleteOldShardFiles) {
  // Written by 2 shards (another partition version), resumed by 3 sharing
  // one directory: every server sees both old files of steps 50 and 100.
  Start(/*dp=*/1, /*shards=*/3);
  const uint64_t v = core_->partition().version();
  RegisterRequest a = Server("a:1", 0, {50, 100}, v + 1);
  RegisterRequest b = Server("a:2", 1, {50, 100}, v + 1);
  RegisterRequest c = Server("a:3", 2);
  for (RegisterRequest* r : {&a, &b, &c}) {
    r->add_relayout_checkpoint_steps(50);
    r->add_relayout_checkpoint_steps(100);
  }
  Id(a);
  Id(b);
  Id(c);
  EXPECT_EQ(core_->Status().start_step(), 100);
  EXPECT_TRUE(Logged("start_step = 100")) << Log();
  EXPECT_TRUE(Logged("shards [0,1,2] load it from the complete set"))
      << Log();
  Id(Worker("w"));
  absl::StatusOr<Assignment> w =
      core_->GetAssignment("worker-0", absl::InfiniteFuture());
  ASSERT_TRUE(w.ok());
  EXPECT_EQ(w->start_step(), 100);
}

TEST_F(SchedulerCoreTest, LayoutChangeWithoutReachableOldFilesSaysSo) {
  // One volume per shard: each server sees only its own old file.
  Start(/*dp=*/1, /*shards=*/3);
  const uint64_t v = core_->partition().version();
  Id(Server("a:1", 0, {50, 100}, v + 1));
  Id(Server("a:2", 1, {50, 100}, v + 1));
  Id(Server("a:3", 2));
  EXPECT_EQ(core_->Status().start_step(), 0);
  EXPECT_TRUE(Logged("every old shard file of the step reachable from every "
                     "new shard"))
      << Log();
  EXPECT_TRUE(Logged("shared volume")) << Log();
}

TEST_F(SchedulerCoreTest, EveryWorkerDoneFinishesTheJob) {
  Assemble(/*dp=*/2, /*shards=*/1);
  HeartbeatRequest hb = Beat("worker-0", 200);
  hb.set_done(true);
  absl::StatusOr<HeartbeatResponse> r = core_->Heartbeat(hb);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->state(), RUNNING);
  EXPECT_FALSE(core_->AllServersSawFinalState());
  hb.set_node_id("worker-1");
  r = core_->Heartbeat(hb);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->state(), FINISHED);
  EXPECT_FALSE(core_->AllServersSawFinalState());
  r = core_->Heartbeat(Beat("server-0", 200));
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->state(), FINISHED);
  EXPECT_TRUE(core_->AllServersSawFinalState());
  JobStatus status = core_->Status();
  EXPECT_EQ(status.state(), FINISHED);
  const NodeStatus* w1 = Find(status, "worker-1");
  ASSERT_NE(w1, nullptr);
  EXPECT_TRUE(w1->done());
  EXPECT_EQ(w1->step(), 200);
  EXPECT_FLOAT_EQ(w1->loss(), 2.5f);
  EXPECT_TRUE(std::isnan(w1->eval_loss()));
  EXPECT_DOUBLE_EQ(w1->tokens_per_second(), 1000);
  // Terminal: a later error does not change the state.
  HeartbeatRequest bad = Beat("worker-0");
  bad.set_error("late");
  EXPECT_EQ(core_->Heartbeat(bad)->state(), FINISHED);
  // A node that registers now learns the job finished, by reason.
  const absl::Status late = core_->Register(Worker("late")).status();
  EXPECT_EQ(late.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(ReasonOf(late), JOB_FINISHED) << late;
}

TEST_F(SchedulerCoreTest, ReportedErrorFailsTheJob) {
  Assemble(/*dp=*/2, /*shards=*/1);
  HeartbeatRequest hb = Beat("worker-1");
  hb.set_error("CUDA out of memory");
  absl::StatusOr<HeartbeatResponse> r = core_->Heartbeat(hb);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->state(), FAILED);
  EXPECT_EQ(r->message(),
            "node worker-1 (host host-1) reported an error: CUDA out of memory");
  r = core_->Heartbeat(Beat("worker-0"));
  EXPECT_EQ(r->state(), FAILED);
  EXPECT_EQ(r->message(),
            "node worker-1 (host host-1) reported an error: CUDA out of memory");
  JobStatus status = core_->Status();
  EXPECT_EQ(status.state(), FAILED);
  EXPECT_EQ(Find(status, "worker-1")->error(), "CUDA out of memory");
  EXPECT_EQ(core_->GetAssignment("worker-0", absl::InfiniteFuture()).status().code(),
            absl::StatusCode::kFailedPrecondition);
}

TEST_F(SchedulerCoreTest, ErrorWhileAssemblingFailsWaiters) {
  Start(/*dp=*/1, /*shards=*/1);
  Id(Server("a:1"));
  Captured waiting;
  core_->GetAssignmentAsync("server-0", absl::InfiniteFuture(),
                            waiting.Callback());
  HeartbeatRequest hb = Beat("server-0");
  hb.set_error("disk full");
  EXPECT_EQ(core_->Heartbeat(hb)->state(), FAILED);
  {
    JobStatus status = core_->Status();
    bool error_event = false, failed_event = false;
    for (const NodeEvent& e : status.events()) {
      error_event |= absl::StrContains(e.event(), "reported an error: disk full") &&
                     e.action() == "the job is marked FAILED";
      failed_event |= e.node_id().empty() &&
                      absl::StrContains(e.event(), " -> FAILED");
    }
    EXPECT_TRUE(error_event && failed_event) << status.DebugString();
  }
  ASSERT_TRUE(waiting.has());
  EXPECT_EQ(waiting.get().status().code(),
            absl::StatusCode::kFailedPrecondition);
  EXPECT_TRUE(absl::StrContains(waiting.get().status().message(), "disk full"));
}

TEST_F(SchedulerCoreTest, LeasesAreNotEnforcedWhileAssembling) {
  Start(/*dp=*/1, /*shards=*/1);
  Id(Server("a:1"));
  clock_.Advance(absl::Seconds(60));
  Id(Worker("w"));
  JobStatus status = core_->Status();
  EXPECT_EQ(status.state(), RUNNING);
  for (const NodeStatus& n : status.nodes()) EXPECT_TRUE(n.alive());
  EXPECT_EQ(Find(status, "server-0")->heartbeat_age_ms(), 60000);
  // The lease counts from assembly.
  clock_.Advance(absl::Seconds(10));
  EXPECT_TRUE(Find(core_->Status(), "server-0")->alive());
}

TEST_F(SchedulerCoreTest, ExpiredLeaseMarksTheNodeDeadButKeepsRunning) {
  Assemble(/*dp=*/2, /*shards=*/1);
  clock_.Advance(absl::Seconds(5));
  ASSERT_TRUE(core_->Heartbeat(Beat("worker-0")).ok());
  ASSERT_TRUE(core_->Heartbeat(Beat("server-0")).ok());
  clock_.Advance(absl::Seconds(5));  // worker-1: exactly 10s, still alive
  core_->Tick();
  EXPECT_TRUE(Find(core_->Status(), "worker-1")->alive());
  clock_.Advance(absl::Milliseconds(1));
  core_->Tick();
  JobStatus status = core_->Status();
  EXPECT_EQ(status.state(), RUNNING);
  EXPECT_FALSE(Find(status, "worker-1")->alive());
  EXPECT_TRUE(Find(status, "worker-0")->alive());
  EXPECT_EQ(Find(status, "worker-1")->heartbeat_age_ms(), 10001);
  EXPECT_TRUE(absl::StrContains(status.message(), "worker-1 (host host-1)"))
      << status.message();
  EXPECT_TRUE(Logged("node worker-1 (host host-1) missed its heartbeat lease "
                     "of 10s"));
  // The status says since when and what was done about it.
  const NodeStatus* dead = Find(status, "worker-1");
  EXPECT_EQ(dead->down_since_unix_ms(), absl::ToUnixMillis(clock_.Now()));
  EXPECT_TRUE(absl::StrContains(dead->last_event(),
                                "missed its heartbeat lease of 10s"))
      << dead->last_event();
  EXPECT_TRUE(absl::StrContains(dead->last_event(), "-> marked dead; its slot "
                                                    "is open for a replacement"))
      << dead->last_event();
  ASSERT_GT(status.events_size(), 0);
  const NodeEvent& last = status.events(status.events_size() - 1);
  EXPECT_EQ(last.node_id(), "worker-1");
  EXPECT_EQ(last.unix_ms(), absl::ToUnixMillis(clock_.Now()));
  EXPECT_EQ(last.action(), "marked dead; its slot is open for a replacement");
  EXPECT_EQ(Find(status, "worker-0")->down_since_unix_ms(), 0);
  // Its own heartbeat revives it.
  absl::StatusOr<HeartbeatResponse> r = core_->Heartbeat(Beat("worker-1"));
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->state(), RUNNING);
  EXPECT_TRUE(Find(core_->Status(), "worker-1")->alive());
  EXPECT_EQ(Find(core_->Status(), "worker-1")->down_since_unix_ms(), 0);
  EXPECT_EQ(core_->StateMessage(), "");
}

TEST_F(SchedulerCoreTest, ReplacementTakesADeadSlot) {
  Assemble(/*dp=*/2, /*shards=*/2);
  // Everyone but worker-1 and server-1 keeps heartbeating.
  clock_.Advance(absl::Seconds(8));
  ASSERT_TRUE(core_->Heartbeat(Beat("worker-0", 40)).ok());
  ASSERT_TRUE(core_->Heartbeat(Beat("server-0", 40)).ok());
  // Before the lease expires every slot is held by a live node.
  EXPECT_EQ(core_->Register(Worker("host-new")).status().code(),
            absl::StatusCode::kResourceExhausted);
  clock_.Advance(absl::Seconds(3));
  core_->Tick();

  absl::StatusOr<RegisterResponse> r = core_->Register(Worker("host-new"));
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->node_id(), "worker-1");
  absl::StatusOr<Assignment> a =
      core_->GetAssignment("worker-1", absl::InfiniteFuture());
  ASSERT_TRUE(a.ok()) << a.status();
  EXPECT_EQ(a->dp_rank(), 1);
  EXPECT_TRUE(Logged("worker-1 (host host-new) replaces worker-1 (host "
                     "host-1), whose lease had expired"));
  bool replaced = false;
  const JobStatus after = core_->Status();
  for (const NodeEvent& e : after.events()) {
    if (e.node_id() == "worker-1" &&
        absl::StrContains(e.event(), "whose lease had expired") &&
        e.action() == "given the slot's assignment") {
      replaced = true;
    }
  }
  EXPECT_TRUE(replaced) << after.DebugString();

  JobStatus status = core_->Status();
  EXPECT_EQ(status.state(), RUNNING);
  const NodeStatus* w1 = Find(status, "worker-1");
  EXPECT_TRUE(w1->alive());
  EXPECT_EQ(w1->step(), 0);
  EXPECT_EQ(w1->heartbeat_age_ms(), 0);

  // A new server process taking the dead shard (as Kubernetes restarts a
  // lost shard's pod) means that shard lost its state after its checkpoint:
  // the job fails so that every node stops and the restarted job resumes
  // from the latest checkpoint everywhere.
  r = core_->Register(Server("127.0.0.1:5001", /*requested=*/-1));
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->node_id(), "server-1");
  status = core_->Status();
  EXPECT_EQ(status.state(), FAILED);
  EXPECT_TRUE(absl::StrContains(status.message(), "shard 1 restarted"))
      << status.message();
  EXPECT_TRUE(absl::StrContains(status.message(), "latest checkpoint"))
      << status.message();
  EXPECT_EQ(core_->Heartbeat(Beat("worker-0"))->state(), FAILED);
  EXPECT_EQ(core_->GetAssignment("server-1", absl::InfiniteFuture()).status().code(),
            absl::StatusCode::kFailedPrecondition);
}


}  // namespace
}  // namespace scheduler_test
}  // namespace lmps
