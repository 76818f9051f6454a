#include "server/scheduler/scheduler_core.h"

#include <cmath>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/synchronization/mutex.h"
#include "common/model/job_spec.h"
#include "common/model/partition.h"
#include "common/rpc/status_util.h"
#include "gtest/gtest.h"
#include "server/scheduler/clock.h"

namespace lmps {
namespace {

JobSpec Spec(int dp, int shards) {
  absl::StatusOr<JobSpec> spec = ParseJobSpec(R"pb(
    model { n_layer: 2 n_head: 2 n_embd: 32 block_size: 16 }
    max_chunk_bytes: 2048
  )pb");
  EXPECT_TRUE(spec.ok()) << spec.status();
  spec->mutable_layout()->set_dp(dp);
  spec->mutable_layout()->set_num_shards(shards);
  return *spec;
}

RegisterRequest Server(const std::string& address, int requested = -1,
                       std::vector<int64_t> steps = {},
                       uint64_t version = 0) {
  RegisterRequest r;
  r.set_role(SERVER);
  r.set_address(address);
  r.set_requested_rank(requested);
  for (int64_t s : steps) r.add_checkpoint_steps(s);
  r.set_checkpoint_partition_version(version);
  return r;
}

RegisterRequest Worker(const std::string& hostname) {
  RegisterRequest r;
  r.set_role(WORKER);
  r.set_hostname(hostname);
  r.set_requested_rank(-1);
  return r;
}

HeartbeatRequest Beat(const std::string& id, int64_t step = 0) {
  HeartbeatRequest h;
  h.set_node_id(id);
  h.set_step(step);
  h.set_loss(2.5f);
  h.set_eval_loss(NAN);
  h.set_tokens_per_second(1000);
  return h;
}

// Captures the result of GetAssignmentAsync.
struct Captured {
  absl::Mutex mu;
  std::optional<absl::StatusOr<Assignment>> result ABSL_GUARDED_BY(mu);

  SchedulerCore::AssignmentCallback Callback() {
    return [this](absl::StatusOr<Assignment> r) {
      absl::MutexLock lock(&mu);
      EXPECT_FALSE(result.has_value()) << "callback called twice";
      result = std::move(r);
    };
  }
  bool has() {
    absl::MutexLock lock(&mu);
    return result.has_value();
  }
  absl::StatusOr<Assignment> get() {
    absl::MutexLock lock(&mu);
    return *result;
  }
};

class SchedulerCoreTest : public ::testing::Test {
 protected:
  void Start(int dp, int shards, absl::Duration assemble = absl::Seconds(120),
             absl::Duration lease = absl::Seconds(10), int backups = 0,
             ElasticOptions elastic = {}, int pp = 1) {
    SchedulerOptions options;
    options.elastic = elastic;
    options.spec = Spec(dp, shards);
    options.spec.mutable_layout()->set_pp(pp);
    // Elastic tests resize between dp 1 and 3: a batch all of them divide.
    if (elastic.max_dp > 0 || pp > 1) {
      options.spec.mutable_train()->set_batch_size(12);
      options.spec.mutable_train()->set_micro_batches(2);
    }
    options.spec.mutable_layout()->set_shard_backups(backups);
    options.assemble_timeout = assemble;
    options.lease = lease;
    options.log = [this](absl::string_view line) {
      absl::MutexLock lock(&log_mu_);
      log_.emplace_back(line);
    };
    auto core = SchedulerCore::Create(options, &clock_);
    ASSERT_TRUE(core.ok()) << core.status();
    core_ = std::move(*core);
  }

  std::string Id(const RegisterRequest& r) {
    absl::StatusOr<RegisterResponse> resp = core_->Register(r);
    EXPECT_TRUE(resp.ok()) << resp.status();
    return resp.ok() ? resp->node_id() : "";
  }

  // Registers servers 127.0.0.1:4000+i and workers host-i: a running job.
  void Assemble(int dp, int shards) {
    Start(dp, shards);
    for (int i = 0; i < shards; ++i) {
      Id(Server(absl::StrCat("127.0.0.1:", 4000 + i)));
    }
    for (int i = 0; i < dp; ++i) Id(Worker(absl::StrCat("host-", i)));
    ASSERT_EQ(core_->CurrentState(), RUNNING);
  }

  // A replicated job of one shard (primary p:1, backup b:1) and a worker.
  void StartReplicatedJob() {
    Start(/*dp=*/1, /*shards=*/1, absl::Seconds(120), absl::Seconds(10),
          /*backups=*/1);
    RegisterRequest backup = Server("b:1", 0);
    backup.set_backup(true);
    Id(backup);
    Id(Server("p:1", 0));
    Id(Worker("host-0"));
  }

  // The primary stops heartbeating until its lease expired; meanwhile the
  // backup sends `backup_beat` and the worker beats.
  void PrimaryMissesItsLease(const HeartbeatRequest& backup_beat) {
    clock_.Advance(absl::Seconds(8));
    ASSERT_TRUE(core_->Heartbeat(backup_beat).ok());
    ASSERT_TRUE(core_->Heartbeat(Beat("worker-0")).ok());
    clock_.Advance(absl::Seconds(3));
    core_->Tick();
  }

  const NodeStatus* Find(const JobStatus& s, const std::string& id) {
    for (const NodeStatus& n : s.nodes()) {
      if (n.node_id() == id) return &n;
    }
    return nullptr;
  }

  bool Logged(absl::string_view needle) {
    absl::MutexLock lock(&log_mu_);
    for (const std::string& line : log_) {
      if (absl::StrContains(line, needle)) return true;
    }
    return false;
  }

  std::string Log() {
    absl::MutexLock lock(&log_mu_);
    return absl::StrJoin(log_, "\n");
  }

  FakeClock clock_;
  std::unique_ptr<SchedulerCore> core_;
  absl::Mutex log_mu_;
  std::vector<std::string> log_ ABSL_GUARDED_BY(log_mu_);
};

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

// A server's heartbeat as a replicated node reports it (server/replication.h
// FillHeartbeat).
HeartbeatRequest ReplicaBeat(const std::string& id, bool serving,
                             int64_t epoch, bool awaiting = false) {
  HeartbeatRequest h = Beat(id);
  h.set_serving_primary(serving);
  h.set_epoch(epoch);
  h.set_awaiting_snapshot(awaiting);
  return h;
}

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
  Start(/*dp=*/1, /*shards=*/1, absl::Seconds(120), absl::Seconds(10), 0, {},
        /*pp=*/2);
  auto worker = [](const std::string& address, int rank) {
    RegisterRequest r = Worker("host");
    r.set_address(address);
    r.set_requested_rank(rank);
    return r;
  };
  Id(Server("s:1", 0));
  const std::string first = Id(worker("h0:1", 0));
  Id(worker("h1:1", 1));
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
  const RegisterRequest replacement = worker("h9:1", 1);
  EXPECT_EQ(core_->Register(replacement).status().code(),
            absl::StatusCode::kResourceExhausted);  // not while regrouping

  core_->ResizeStopped(7);
  HeartbeatRequest stopped = Beat(first, 7);
  stopped.set_stopped_for_resize(true);
  ASSERT_TRUE(core_->Heartbeat(stopped).ok());
  EXPECT_EQ(core_->CurrentState(), ASSEMBLING);
  EXPECT_TRUE(Logged("regroup: every worker stopped at step 7; re-assembling "
                     "with dp 1 (was 1)"))
      << Log();
  EXPECT_TRUE(core_->Heartbeat(Beat("server-0", 7))->reassemble());
  Id(Server("s:1", 0, {7}, core_->partition().version()));
  Id(worker("h0:1", 0));
  const std::string replaced = Id(replacement);
  ASSERT_EQ(core_->CurrentState(), RUNNING);
  absl::StatusOr<Assignment> a =
      core_->GetAssignment(replaced, absl::InfiniteFuture());
  ASSERT_TRUE(a.ok()) << a.status();
  EXPECT_EQ(a->pp_rank(), 1);
  EXPECT_EQ(a->start_step(), 7);
  EXPECT_FALSE(core_->Heartbeat(Beat(replaced, 7))->peers_lost());
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
}  // namespace lmps
