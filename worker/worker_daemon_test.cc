// Runs the worker daemon in-process against a fake scheduler and, to train,
// in-process shards: joining (a spare, an elastic standby, a finished job),
// training to the end, the stop signal, and a failed job. Resizes, pipelines
// and replacements run in the multi-process tests of tests/.
#include "worker/worker_daemon.h"

#include <cstdio>
#include <cstdlib>
#include <deque>
#include <fstream>
#include <functional>
#include <sstream>
#include <thread>

#include <sys/stat.h>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/synchronization/mutex.h"
#include "common/model/job_spec.h"
#include "common/rpc/grpc_server.h"
#include "common/rpc/status_util.h"
#include "gtest/gtest.h"
#include "proto/lmps.grpc.pb.h"
#include "tests/testing/fake_scheduler.h"
#include "tests/testing/ps_cluster.h"
#include "worker/backend_factory.h"

namespace lmps {
namespace {

absl::Status Finished() {
  return WithReason(
      absl::FailedPreconditionError("cannot register: the job is already "
                                    "FINISHED"),
      JOB_FINISHED);
}

absl::Status Surplus() {
  return WithReason(absl::ResourceExhaustedError("too many workers; elastic"),
                    ELASTIC_SURPLUS);
}

class WorkerDaemonTest : public ::testing::Test {
 protected:
  void SetUp() override {
    GrpcServerOptions go;
    go.listen_address = "127.0.0.1:0";
    auto started = StartGrpcServer(go, {&fake_});
    ASSERT_TRUE(started.ok()) << started.status();
    scheduler_ = std::move(started->server);
    options_.scheduler = absl::StrCat("127.0.0.1:", started->port);
    options_.backend_factory = CreateBackend;
    options_.threads = 1;
    options_.peer_listen = "127.0.0.1:0";
    options_.assemble_timeout = absl::Seconds(1);
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
    daemon_ = std::thread([this] {
      absl::Status result = RunWorkerDaemon(options_, &stop_);
      absl::MutexLock lock(&log_mu_);
      result_ = std::move(result);
      done_ = true;
    });
  }

  // The daemon's result, or DeadlineExceeded if it runs on after `timeout`.
  absl::Status Result(absl::Duration timeout = absl::Seconds(20)) {
    absl::MutexLock lock(&log_mu_);
    if (!log_mu_.AwaitWithTimeout(absl::Condition(&done_), timeout)) {
      return absl::DeadlineExceededError("the daemon still runs");
    }
    return result_;
  }

  // Waits until a log line contains `text`.
  bool WaitForLine(const std::string& text) {
    absl::MutexLock lock(&log_mu_);
    auto logged = [&] {
      for (const std::string& line : log_) {
        if (absl::StrContains(line, text)) return true;
      }
      return false;
    };
    const absl::Time give_up = absl::Now() + absl::Seconds(20);
    while (!logged()) {
      if (done_ || absl::Now() > give_up) return false;
      log_mu_.AwaitWithTimeout(absl::Condition(&done_), absl::Milliseconds(50));
    }
    return true;
  }

  std::vector<std::string> Lines() {
    absl::MutexLock lock(&log_mu_);
    return log_;
  }

  std::string Log() { return absl::StrJoin(Lines(), "\n"); }

  ::lmps::testing::FakeScheduler fake_{"worker-0"};
  std::unique_ptr<grpc::Server> scheduler_;
  WorkerDaemonOptions options_;
  StopSignal stop_;
  std::thread daemon_;
  absl::Mutex log_mu_;
  std::vector<std::string> log_ ABSL_GUARDED_BY(log_mu_);
  absl::Status result_ ABSL_GUARDED_BY(log_mu_);
  bool done_ ABSL_GUARDED_BY(log_mu_) = false;
};

TEST_F(WorkerDaemonTest, RequiresScheduler) {
  options_.scheduler.clear();
  const absl::Status status = RunWorkerDaemon(options_, &stop_);
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << status;
  EXPECT_EQ(status.message(), "--scheduler=host:port is required");
}

TEST_F(WorkerDaemonTest, LateWorkerOfFinishedJobExitsOk) {
  {
    absl::MutexLock lock(&fake_.mu_);
    fake_.register_answers_ = {Finished()};
  }
  Start();
  ASSERT_TRUE(Result().ok()) << Result() << "\n" << Log();
  // The lines tests and tools read, byte for byte.
  const std::vector<std::string> lines = Lines();
  ASSERT_EQ(lines.size(), 2u) << Log();
  EXPECT_TRUE(absl::StartsWith(
      lines[0], "[worker] backend cpu (--backend=cpu): 1 threads, OpenBLAS "))
      << lines[0];
  EXPECT_EQ(lines[1], "[worker] the job finished without needing this worker");
  absl::MutexLock lock(&fake_.mu_);
  EXPECT_EQ(fake_.registered_.role(), WORKER);
  EXPECT_EQ(fake_.registered_.requested_rank(), -1);
  // The WorkerPeer service's advertised address.
  EXPECT_TRUE(absl::StartsWith(fake_.registered_.address(), "127.0.0.1:"))
      << fake_.registered_.address();
}

TEST_F(WorkerDaemonTest, SurplusWorkerStandsByUntilTheJobFinishes) {
  {
    absl::MutexLock lock(&fake_.mu_);
    fake_.register_answers_ = {Surplus(), Surplus(), Surplus(),
                               Surplus(), Surplus(), Surplus(),
                               Surplus(), Surplus(), Finished()};
  }
  Start();
  ASSERT_TRUE(Result().ok()) << Result() << "\n" << Log();
  const std::string standby =
      "[worker] surplus worker of an elastic job: standing by until dp grows "
      "or a worker's slot is free";
  int said = 0;
  for (const std::string& line : Lines()) said += line == standby;
  EXPECT_EQ(said, 1) << Log();
  EXPECT_EQ(Lines().back(),
            "[worker] the job finished without needing this worker");
  absl::MutexLock lock(&fake_.mu_);
  EXPECT_EQ(fake_.registers_, 9);
}

TEST_F(WorkerDaemonTest, StopEndsTheStandby) {
  {
    absl::MutexLock lock(&fake_.mu_);
    fake_.register_answers_ = {Surplus()};
  }
  Start();
  ASSERT_TRUE(WaitForLine("standing by")) << Log();
  stop_.Stop();
  // Within the registration in progress (assemble_timeout).
  const absl::Status status = Result(absl::Seconds(10));
  EXPECT_EQ(status.code(), absl::StatusCode::kCancelled) << status;
}

TEST_F(WorkerDaemonTest, SpareExitsOkWhenTheJobFinishesFirst) {
  options_.spare = true;
  Start();
  ASSERT_TRUE(WaitForLine("backend cpu")) << Log();
  {
    absl::MutexLock lock(&fake_.mu_);
    fake_.status_state_ = FINISHED;
  }
  ASSERT_TRUE(Result().ok()) << Result() << "\n" << Log();
  EXPECT_EQ(Lines().back(),
            "[worker] spare: the job finished without needing this spare");
  absl::MutexLock lock(&fake_.mu_);
  EXPECT_EQ(fake_.registers_, 0);  // never took a first worker's slot
}

TEST_F(WorkerDaemonTest, SpareFailsWithTheJob) {
  options_.spare = true;
  {
    absl::MutexLock lock(&fake_.mu_);
    fake_.status_state_ = FAILED;
    fake_.message_ = "server-1 lost";
  }
  Start();
  const absl::Status status = Result();
  EXPECT_EQ(status.code(), absl::StatusCode::kAborted) << status;
  EXPECT_EQ(status.message(), "spare: the job FAILED: server-1 lost");
}

TEST_F(WorkerDaemonTest, SpareRegistersOnceTheJobRuns) {
  options_.spare = true;
  {
    absl::MutexLock lock(&fake_.mu_);
    fake_.status_state_ = RUNNING;
    fake_.register_answers_ = {Finished()};
  }
  Start();
  ASSERT_TRUE(Result().ok()) << Result() << "\n" << Log();
  EXPECT_TRUE(absl::StrContains(
      Log(),
      "[worker] spare: waiting for a slot of the running job (a worker "
      "whose lease expired)"))
      << Log();
  absl::MutexLock lock(&fake_.mu_);
  EXPECT_EQ(fake_.registers_, 1);
}

TEST_F(WorkerDaemonTest, StopEndsTheSparesWait) {
  options_.spare = true;
  Start();
  ASSERT_TRUE(WaitForLine("backend cpu")) << Log();
  stop_.Stop();
  const absl::Status status = Result(absl::Seconds(10));
  EXPECT_EQ(status.code(), absl::StatusCode::kCancelled) << status;
}

TEST_F(WorkerDaemonTest, RegistrationErrorIsReturned) {
  {
    absl::MutexLock lock(&fake_.mu_);
    fake_.register_answers_ = {absl::PermissionDeniedError("no")};
  }
  Start();
  const absl::Status status = Result();
  EXPECT_EQ(status.code(), absl::StatusCode::kPermissionDenied) << status;
}

// Joined, then the data file is missing: the error of a step before
// training is returned, after the join's log lines.
TEST_F(WorkerDaemonTest, JoinsThenFailsOnMissingData) {
  options_.data = "/nonexistent/data.txt";
  {
    absl::MutexLock lock(&fake_.mu_);
    JobSpec* spec = fake_.assignment_.mutable_spec();
    spec->mutable_layout()->set_dp(1);
    fake_.assignment_.add_shard_addresses("127.0.0.1:1");
  }
  Start();
  const absl::Status status = Result();
  EXPECT_FALSE(status.ok());
  EXPECT_TRUE(absl::StrContains(status.message(), "/nonexistent/data.txt"))
      << status;
  const std::vector<std::string> lines = Lines();
  ASSERT_EQ(lines.size(), 3u) << Log();
  EXPECT_TRUE(absl::StartsWith(
      lines[1], absl::StrCat("[worker-0] registered with scheduler ",
                             options_.scheduler, " (")))
      << lines[1];
  EXPECT_TRUE(absl::EndsWith(lines[1], "); waiting for the job to assemble"))
      << lines[1];
  EXPECT_EQ(lines[2],
            "[worker-0] assigned dp rank 0 of 1, 1 shards, resume step 0, "
            "backend cpu with 1 threads");
}

// A tiny data-parallel job on one in-process shard, assigned by the fake
// scheduler; `steps` training steps.
class WorkerDaemonTrainingTest : public WorkerDaemonTest {
 protected:
  void Assign(int steps, int sample_tokens = 0) {
    JobSpec spec;
    ModelConfig* m = spec.mutable_model();
    m->set_n_layer(1);
    m->set_n_head(2);
    m->set_n_embd(16);
    m->set_block_size(8);
    m->set_vocab_size(256);
    spec.mutable_layout()->set_dp(1);
    spec.mutable_layout()->set_num_shards(1);
    TrainConfig* t = spec.mutable_train();
    t->set_batch_size(4);
    t->set_micro_batches(1);
    t->set_steps(steps);
    t->set_eval_interval(0);
    t->set_sample_tokens(sample_tokens);
    t->set_checkpoint_interval(1000000);
    spec.mutable_optimizer()->set_type(SGD);
    spec.mutable_optimizer()->set_lr(0.01f);
    ApplyJobSpecDefaults(&spec);
    ASSERT_TRUE(cluster_.Start(spec).ok());
    options_.data = TestFile("data.txt");
    std::ofstream data(options_.data);
    for (int i = 0; i < 200; ++i) {
      data << "the quick brown fox " << i << " jumps over it. ";
    }
    ASSERT_TRUE(data.good());
    absl::MutexLock lock(&fake_.mu_);
    *fake_.assignment_.mutable_spec() = spec;
    *fake_.assignment_.mutable_partition() = cluster_.map();
    for (const std::string& a : cluster_.addresses()) {
      fake_.assignment_.add_shard_addresses(a);
    }
  }

  static std::string TestFile(const std::string& name) {
    const char* dir = std::getenv("TEST_TMPDIR");
    return absl::StrCat(dir != nullptr ? dir : "/tmp", "/", name);
  }

  ::lmps::testing::Cluster cluster_;
};

TEST_F(WorkerDaemonTrainingTest, TrainsSamplesAndReportsDone) {
  Assign(/*steps=*/3, /*sample_tokens=*/5);
  options_.sample_out = TestFile("sample.txt");
  options_.step_log = TestFile("steps.jsonl");
  std::remove(options_.step_log.c_str());
  Start();
  ASSERT_TRUE(Result(absl::Seconds(60)).ok()) << Result() << "\n" << Log();
  const std::string log = Log();
  EXPECT_TRUE(absl::StrContains(log, "[worker-0] sample after step 3:\nThe "))
      << log;
  EXPECT_TRUE(absl::StrContains(log, "[worker-0] done: step 3 loss ")) << log;
  // One pull per step, one for the final evaluation, one for the sample.
  EXPECT_TRUE(absl::StrContains(log, "[worker-0] transfer: pulls=5 ")) << log;
  std::ifstream sample(options_.sample_out);
  std::stringstream written;
  written << sample.rdbuf();
  EXPECT_TRUE(absl::StartsWith(written.str(), "The ")) << written.str();
  // The step log: steps 0, 1, 2, then step 2 again with the final
  // evaluation's loss.
  std::ifstream steps(options_.step_log);
  std::vector<std::string> lines;
  for (std::string line; std::getline(steps, line);) lines.push_back(line);
  ASSERT_EQ(lines.size(), 4u) << absl::StrJoin(lines, "\n");
  for (int i = 0; i < 3; ++i) {
    EXPECT_TRUE(absl::StartsWith(lines[i], absl::StrCat("{\"step\":", i, ",")))
        << lines[i];
    EXPECT_TRUE(absl::StrContains(lines[i], "\"node\":\"worker-0\""))
        << lines[i];
    EXPECT_TRUE(absl::StrContains(lines[i], "\"grad_norm\":")) << lines[i];
    EXPECT_FALSE(absl::StrContains(lines[i], "eval_loss")) << lines[i];
  }
  EXPECT_TRUE(absl::StrContains(lines[3], "\"eval_loss\":")) << lines[3];
  EXPECT_TRUE(absl::StartsWith(lines[3], "{\"step\":2,")) << lines[3];
  absl::MutexLock lock(&fake_.mu_);
  ASSERT_FALSE(fake_.heartbeats_.empty());
  EXPECT_TRUE(fake_.heartbeats_.back().done());
  EXPECT_EQ(fake_.heartbeats_.back().step(), 3);
  EXPECT_EQ(fake_.heartbeats_.back().error(), "");
}

TEST_F(WorkerDaemonTrainingTest, StopEndsTrainingWithoutAReport) {
  Assign(/*steps=*/1000000);
  Start();
  ASSERT_TRUE(fake_.AwaitHeartbeat([](const HeartbeatRequest& hb) {
    return hb.step() >= 2;
  })) << Log();
  stop_.Stop();
  const absl::Status status = Result(absl::Seconds(20));
  EXPECT_EQ(status.code(), absl::StatusCode::kCancelled) << status;
  EXPECT_EQ(Lines().back(),
            "[worker-0] stopped; not reporting to the scheduler");
  absl::MutexLock lock(&fake_.mu_);
  for (const HeartbeatRequest& hb : fake_.heartbeats_) {
    EXPECT_FALSE(hb.done());
    EXPECT_EQ(hb.error(), "");
  }
}

TEST_F(WorkerDaemonTrainingTest, FailedJobCancelsTraining) {
  Assign(/*steps=*/1000000);
  Start();
  ASSERT_TRUE(fake_.AwaitHeartbeat([](const HeartbeatRequest& hb) {
    return hb.step() >= 1;
  })) << Log();
  {
    absl::MutexLock lock(&fake_.mu_);
    fake_.heartbeat_state_ = FAILED;
    fake_.message_ = "server-0 lost";
  }
  const absl::Status status = Result(absl::Seconds(20));
  EXPECT_FALSE(status.ok());
  EXPECT_TRUE(absl::StrContains(
      Log(), "[worker-0] the job failed: server-0 lost; stopping"))
      << Log();
  absl::MutexLock lock(&fake_.mu_);
  // The final report carries this worker's error.
  EXPECT_EQ(fake_.heartbeats_.back().error(), status.message());
}

// The steps between the assignment and training (here the dataset, whose
// file is a FIFO that blocks the worker's read until the test writes it)
// may outlast the lease (300 ms): the worker heartbeats through them, so
// the scheduler does not take its slot, and then trains as usual.
TEST_F(WorkerDaemonTrainingTest, HeartbeatsWhileSettingUp) {
  Assign(/*steps=*/2);
  std::ifstream text_file(options_.data);
  std::stringstream text;
  text << text_file.rdbuf();
  const std::string fifo = TestFile("data.fifo");
  std::remove(fifo.c_str());
  ASSERT_EQ(mkfifo(fifo.c_str(), 0600), 0) << fifo;
  options_.data = fifo;
  Start();
  ASSERT_TRUE(WaitForLine("assigned dp rank 0")) << Log();
  // Three leases' worth of heartbeats while the dataset's read is blocked.
  bool beat;
  {
    absl::MutexLock lock(&fake_.mu_);
    auto beats = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(fake_.mu_) {
      return fake_.heartbeats_.size() >= 10;
    };
    beat = fake_.mu_.AwaitWithTimeout(absl::Condition(&beats),
                                      absl::Seconds(20));
  }
  {
    // Unblock the read (on failure too, so that the daemon can end).
    std::ofstream writer(fifo);
    writer << text.str();
  }
  EXPECT_TRUE(beat) << "no heartbeats while setting up:\n" << Log();
  {
    absl::MutexLock lock(&fake_.mu_);
    for (const HeartbeatRequest& hb : fake_.heartbeats_) {
      EXPECT_EQ(hb.error(), "");
    }
  }
  ASSERT_TRUE(Result(absl::Seconds(60)).ok()) << Result() << "\n" << Log();
  EXPECT_TRUE(absl::StrContains(Log(), "[worker-0] done: step 2 loss "))
      << Log();
}

// A job resumed at its last step trains nothing and says so (not a NaN
// loss and 0 tokens/s).
TEST_F(WorkerDaemonTrainingTest, ResumedAtTheLastStepSaysNothingToTrain) {
  Assign(/*steps=*/2);
  Start();  // trains steps 0 and 1: the shard is at version 2
  ASSERT_TRUE(Result(absl::Seconds(60)).ok()) << Result() << "\n" << Log();
  daemon_.join();
  {
    absl::MutexLock lock(&log_mu_);
    done_ = false;
    log_.clear();
  }
  {
    absl::MutexLock lock(&fake_.mu_);
    fake_.assignment_.set_start_step(2);
  }
  Start();
  ASSERT_TRUE(Result(absl::Seconds(60)).ok()) << Result() << "\n" << Log();
  EXPECT_TRUE(absl::StrContains(
      Log(), "[worker-0] done: step 2: nothing to train (the job resumed at "
             "its last step)"))
      << Log();
}

TEST_F(WorkerDaemonTest, MissingBackendFactoryIsInvalid) {
  options_.backend_factory = nullptr;
  const absl::Status status = RunWorkerDaemon(options_, &stop_);
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << status;
}

}  // namespace
}  // namespace lmps
