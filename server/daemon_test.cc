// Runs the daemon in-process against a fake scheduler.
#include "server/daemon.h"

#include <cstdlib>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/model/job_spec.h"
#include "common/model/partition.h"
#include "common/rpc/grpc_server.h"
#include "absl/synchronization/notification.h"
#include "gtest/gtest.h"
#include "proto/lmps.grpc.pb.h"
#include "server/checkpoint.h"
#include "tests/testing/fake_scheduler.h"

namespace lmps {
namespace {

JobSpec Spec() {
  JobSpec spec;
  ModelConfig* m = spec.mutable_model();
  m->set_n_layer(1);
  m->set_n_head(2);
  m->set_n_embd(8);
  m->set_block_size(4);
  m->set_vocab_size(16);
  spec.mutable_train()->set_steps(2);
  spec.mutable_train()->set_checkpoint_interval(1);
  spec.mutable_optimizer()->set_type(SGD);
  spec.set_max_chunk_bytes(256);
  ApplyJobSpecDefaults(&spec);
  return spec;
}

std::string TestDir(const std::string& name) {
  const char* tmp = std::getenv("TEST_TMPDIR");
  std::string dir = std::string(tmp ? tmp : "/tmp") + "/" + name;
  EXPECT_EQ(std::system(("rm -rf '" + dir + "'").c_str()), 0);
  return dir;
}

class DaemonTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const JobSpec spec = Spec();
    {
      absl::MutexLock lock(&fake_.mu_);
      fake_.assignment_.set_role(SERVER);
      fake_.assignment_.set_shard(0);
      *fake_.assignment_.mutable_spec() = spec;
      *fake_.assignment_.mutable_partition() =
          *ComputePartition(spec.model(), 1, spec.max_chunk_bytes());
    }
    GrpcServerOptions go;
    go.listen_address = "127.0.0.1:0";
    auto started = StartGrpcServer(go, {&fake_});
    ASSERT_TRUE(started.ok());
    scheduler_ = std::move(started->server);
    options_.scheduler = absl::StrCat("127.0.0.1:", started->port);
    options_.listen = "127.0.0.1:0";
    options_.shard = 0;
    options_.assemble_timeout = absl::Seconds(5);
    options_.log = [this](const std::string& line) {
      absl::MutexLock lock(&log_mu_);
      log_.push_back(line);
    };
  }

  void TearDown() override {
    stop_.Stop();
    if (daemon_.joinable()) daemon_.join();
    scheduler_->Shutdown(std::chrono::system_clock::now());
  }

  void Start() {
    daemon_ =
        std::thread([this] { result_ = RunParameterServer(options_, &stop_); });
  }

  // Waits until the daemon heartbeats (it serves by then).
  bool WaitForHeartbeat() {
    return fake_.AwaitHeartbeat([](const HeartbeatRequest&) { return true; },
                                absl::Seconds(10));
  }

  std::string Log() {
    absl::MutexLock lock(&log_mu_);
    return absl::StrJoin(log_, "\n");
  }

  // Polls until the daemon logged `line` (or 10 s passed; the failure
  // names the line).
  ::testing::AssertionResult WaitForLogLine(const std::string& line) {
    const absl::Time deadline = absl::Now() + absl::Seconds(10);
    while (Log().find(line) == std::string::npos) {
      if (absl::Now() > deadline) {
        return ::testing::AssertionFailure()
               << "timed out waiting for the log line '" << line
               << "'; the log:\n"
               << Log();
      }
      absl::SleepFor(absl::Milliseconds(5));
    }
    return ::testing::AssertionSuccess();
  }

  ::lmps::testing::FakeScheduler fake_{"server-0"};
  std::unique_ptr<grpc::Server> scheduler_;
  DaemonOptions options_;
  StopSignal stop_;
  std::thread daemon_;
  absl::Status result_;
  absl::Mutex log_mu_;
  std::vector<std::string> log_;
};

TEST_F(DaemonTest, ServesUntilFinishedAndWritesTheLastCheckpoint) {
  options_.checkpoint_dir = TestDir("finished");
  Start();
  ASSERT_TRUE(WaitForHeartbeat()) << Log();
  std::string address;
  {
    absl::MutexLock lock(&fake_.mu_);
    address = fake_.registered_.address();
    EXPECT_EQ(fake_.registered_.role(), SERVER);
    EXPECT_EQ(fake_.registered_.requested_rank(), 0);
    EXPECT_EQ(fake_.heartbeats_[0].node_id(), "server-0");
    EXPECT_EQ(fake_.heartbeats_[0].step(), 0);
  }
  EXPECT_EQ(address.rfind("127.0.0.1:", 0), 0u) << address;

  // A worker runs both steps against the daemon.
  auto stub = ParameterServer::NewStub(MakeChannel(address));
  const PartitionMap map = fake_.assignment_.partition();
  for (int step = 0; step < 2; ++step) {
    PushRequest msg;
    msg.set_step(step);
    msg.set_partition_version(map.version());
    for (const ChunkDesc& c : map.chunks()) {
      ChunkSlice* s = msg.add_slices();
      s->set_tensor(c.tensor());
      s->set_chunk(c.index());
      s->set_dtype(F32);
      s->set_data(std::string(4 * (c.end() - c.begin()), '\0'));
    }
    grpc::ClientContext pctx;
    PushResponse presp;
    auto writer = stub->Push(&pctx, &presp);
    ASSERT_TRUE(writer->Write(msg));
    writer->WritesDone();
    ASSERT_TRUE(writer->Finish().ok());
    grpc::ClientContext gctx;
    GradNormRequest greq;
    greq.set_step(step);
    GradNormResponse gresp;
    ASSERT_TRUE(stub->GradNorm(&gctx, greq, &gresp).ok());
    grpc::ClientContext actx;
    ApplyRequest areq;
    areq.set_step(step);
    ApplyResponse aresp;
    ASSERT_TRUE(stub->Apply(&actx, areq, &aresp).ok());
    EXPECT_EQ(aresp.version(), step + 1);
  }
  {
    absl::MutexLock lock(&fake_.mu_);
    fake_.heartbeat_state_ = FINISHED;
  }
  daemon_.join();
  EXPECT_TRUE(result_.ok()) << result_;
  EXPECT_EQ(*ListCompleteCheckpointSteps(options_.checkpoint_dir, 0),
            (std::vector<int64_t>{1, 2}));
  EXPECT_NE(Log().find("[server-0]"), std::string::npos);
  EXPECT_NE(Log().find("job finished at version 2"), std::string::npos)
      << Log();

  // A restarted daemon reports its checkpoints and resumes from the
  // assigned step.
  {
    absl::MutexLock lock(&fake_.mu_);
    fake_.heartbeat_state_ = RUNNING;
    fake_.heartbeats_.clear();
    fake_.assignment_.set_start_step(2);
  }
  Start();
  ASSERT_TRUE(WaitForHeartbeat()) << Log();
  {
    absl::MutexLock lock(&fake_.mu_);
    EXPECT_EQ(fake_.registered_.checkpoint_steps_size(), 2);
    EXPECT_EQ(fake_.registered_.checkpoint_partition_version(),
              fake_.assignment_.partition().version());
    EXPECT_EQ(fake_.heartbeats_[0].step(), 2);
  }
  stop_.Stop();  // as SIGTERM would
  daemon_.join();
  EXPECT_TRUE(result_.ok()) << result_;
}

// A shard whose creation takes longer than its lease (300 ms here; a
// large model's initialisation) keeps the lease with heartbeats meanwhile:
// the scheduler does not declare it dead. The 1 s delay is the slowness
// under test, injected.
TEST_F(DaemonTest, HeartbeatsWhileTheShardIsCreated) {
  absl::Notification creating;
  options_.before_create_shard = [&creating] {
    creating.Notify();
    absl::SleepFor(absl::Seconds(1));
  };
  int during = -1;
  options_.log = [this, &during](const std::string& line) {
    if (line.find("serving shard") != std::string::npos && during < 0) {
      absl::MutexLock lock(&fake_.mu_);
      during = static_cast<int>(fake_.heartbeats_.size());
    }
    absl::MutexLock lock(&log_mu_);
    log_.push_back(line);
  };
  Start();
  ASSERT_TRUE(creating.WaitForNotificationWithTimeout(absl::Seconds(10)));
  ASSERT_TRUE(WaitForLogLine("serving shard"));
  // Every 100 ms (lease / 3) for 1 s; a loaded machine sends fewer.
  EXPECT_GE(during, 3) << Log();
  // Marked `starting` (a replicated job's scheduler reads no role from
  // them), the serving heartbeats not.
  absl::MutexLock lock(&fake_.mu_);
  auto serving_beat = [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(fake_.mu_) {
    return !fake_.heartbeats_.empty() && !fake_.heartbeats_.back().starting();
  };
  ASSERT_TRUE(fake_.mu_.AwaitWithTimeout(absl::Condition(&serving_beat),
                                         absl::Seconds(20)))
      << "no heartbeat after the shard serves";
  for (int i = 0; i < during; ++i) {
    EXPECT_TRUE(fake_.heartbeats_[i].starting()) << i;
  }
}

TEST_F(DaemonTest, JobFailedEndsWithError) {
  {
    absl::MutexLock lock(&fake_.mu_);
    fake_.heartbeat_state_ = FAILED;
    fake_.message_ = "worker-1 crashed";
  }
  Start();
  daemon_.join();
  EXPECT_EQ(result_.code(), absl::StatusCode::kAborted);
  EXPECT_NE(result_.message().find("worker-1 crashed"), std::string::npos);
}

TEST_F(DaemonTest, BadResumeIsReportedToTheScheduler) {
  options_.checkpoint_dir = TestDir("nothing");
  {
    absl::MutexLock lock(&fake_.mu_);
    fake_.assignment_.set_start_step(50);
  }
  Start();
  daemon_.join();
  EXPECT_EQ(result_.code(), absl::StatusCode::kNotFound) << result_;
  absl::MutexLock lock(&fake_.mu_);
  ASSERT_EQ(fake_.heartbeats_.size(), 1u);
  EXPECT_NE(fake_.heartbeats_[0].error().find("step_00000050"),
            std::string::npos)
      << fake_.heartbeats_[0].error();
}

TEST_F(DaemonTest, UnreachableSchedulerGivesUpNamingIt) {
  options_.scheduler = "127.0.0.1:1";  // nothing listens there
  options_.assemble_timeout = absl::Milliseconds(700);
  const absl::Time start = absl::Now();
  Start();
  daemon_.join();
  EXPECT_FALSE(result_.ok());
  EXPECT_NE(result_.message().find("127.0.0.1:1"), std::string::npos)
      << result_;
  EXPECT_LT(absl::Now() - start, absl::Seconds(5));
}

// Unreachable for longer than the grace (and the lease): give up naming it.
// (A scheduler that comes back in time is rejoined: tests/fault_tolerance_test.)
TEST_F(DaemonTest, SchedulerLostForLongerThanTheGrace) {
  options_.scheduler_grace = absl::Milliseconds(300);
  Start();
  ASSERT_TRUE(WaitForHeartbeat()) << Log();
  scheduler_->Shutdown(std::chrono::system_clock::now());
  daemon_.join();
  EXPECT_EQ(result_.code(), absl::StatusCode::kUnavailable) << result_;
  EXPECT_NE(result_.message().find("unreachable"), std::string::npos);
  EXPECT_NE(result_.message().find("--scheduler_grace_s"), std::string::npos)
      << result_;
}

// A restarted scheduler answers heartbeats NOT_FOUND: the daemon registers
// again as the shard it serves (a refused rejoin is logged and tried again
// at the next heartbeat), and serves on.
TEST_F(DaemonTest, RejoinsARestartedScheduler) {
  Start();
  ASSERT_TRUE(WaitForHeartbeat()) << Log();
  {
    absl::MutexLock lock(&fake_.mu_);
    fake_.forgotten_ = true;
    fake_.refuse_rejoin_ =
        absl::FailedPreconditionError("not yet");
  }
  ASSERT_TRUE(
      WaitForLogLine("rejoining after a scheduler restart: not yet"));
  {
    absl::MutexLock lock(&fake_.mu_);
    fake_.refuse_rejoin_ = absl::OkStatus();
  }
  ASSERT_TRUE(WaitForLogLine(absl::StrCat("the scheduler at ",
                                          options_.scheduler,
                                          " restarted; rejoined as server-0 "
                                          "at step 0")));
  {
    absl::MutexLock lock(&fake_.mu_);
    EXPECT_TRUE(fake_.registered_.rejoin());
    EXPECT_EQ(fake_.registered_.role(), SERVER);
    EXPECT_EQ(fake_.registered_.requested_rank(), 0);
    EXPECT_FALSE(fake_.registered_.backup());
    EXPECT_EQ(fake_.registered_.step(), 0);
  }
  EXPECT_EQ(Log().find("is unreachable"), std::string::npos) << Log();
  stop_.Stop();
  daemon_.join();
  EXPECT_TRUE(result_.ok()) << result_;
}

TEST_F(DaemonTest, StopWhileWaitingForTheScheduler) {
  options_.scheduler = "127.0.0.1:1";
  options_.assemble_timeout = absl::Seconds(60);
  Start();
  absl::SleepFor(absl::Milliseconds(200));
  stop_.Stop();
  daemon_.join();
  EXPECT_TRUE(result_.ok()) << result_;
}

}  // namespace
}  // namespace lmps
