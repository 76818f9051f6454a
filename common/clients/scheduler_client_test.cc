// Drives SchedulerClient against a fake scheduler served in-process by gRPC.
#include "common/clients/scheduler_client.h"

#include <grpcpp/grpcpp.h>

#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "common/rpc/grpc_server.h"
#include "common/rpc/status_util.h"
#include "gtest/gtest.h"
#include "proto/lmps.grpc.pb.h"

namespace lmps {
namespace {

// Polls `done` until it holds or `timeout` passes; the failure names `what`.
::testing::AssertionResult WaitUntil(
    const std::function<bool()>& done, const std::string& what,
    absl::Duration timeout = absl::Seconds(10)) {
  const absl::Time deadline = absl::Now() + timeout;
  while (!done()) {
    if (absl::Now() > deadline) {
      return ::testing::AssertionFailure()
             << "timed out after " << absl::FormatDuration(timeout)
             << " waiting for " << what;
    }
    absl::SleepFor(absl::Milliseconds(5));
  }
  return ::testing::AssertionSuccess();
}

// Registers every node (ids "node-<n>"), answering Register with the queued
// statuses first; answers heartbeats of unknown ids NOT_FOUND, as a
// restarted scheduler does (Restart()).
class FakeScheduler final : public Scheduler::Service {
 public:
  grpc::Status Register(grpc::ServerContext*, const RegisterRequest* req,
                        RegisterResponse* resp) override {
    absl::MutexLock lock(&mu);
    registers.push_back(*req);
    register_times.push_back(absl::Now());
    if (!register_answers.empty()) {
      const grpc::Status answer = register_answers.front();
      register_answers.pop_front();
      if (!answer.ok()) return answer;
    }
    if (!refuse_registers.ok()) return refuse_registers;
    const std::string id = absl::StrCat("node-", ++last_id);
    known[id] = last_id * 10;
    resp->set_node_id(id);
    resp->set_incarnation(last_id * 10);
    resp->set_lease_ms(900);
    resp->set_backup_slot(req->backup());
    return grpc::Status::OK;
  }

  grpc::Status GetAssignment(grpc::ServerContext* context,
                             const GetAssignmentRequest* req,
                             Assignment* resp) override {
    bool block;
    {
      absl::MutexLock lock(&mu);
      ++assignment_calls;
      if (unavailable_assignments > 0) {
        --unavailable_assignments;
        return grpc::Status(grpc::StatusCode::UNAVAILABLE, "restarting");
      }
      block = block_assignment;
    }
    if (block) {
      // Until the client gives up on the call.
      while (!context->IsCancelled()) absl::SleepFor(absl::Milliseconds(5));
      absl::MutexLock lock(&mu);
      assignment_cancelled = true;
      return grpc::Status(grpc::StatusCode::CANCELLED, "cancelled");
    }
    resp->set_node_id(req->node_id());
    resp->set_shard(3);
    return grpc::Status::OK;
  }

  grpc::Status Heartbeat(grpc::ServerContext*, const HeartbeatRequest* req,
                         HeartbeatResponse* resp) override {
    absl::MutexLock lock(&mu);
    heartbeats.push_back(*req);
    if (known.count(req->node_id()) == 0) {
      return grpc::Status(grpc::StatusCode::NOT_FOUND,
                          absl::StrCat("unknown node id '", req->node_id(),
                                       "'; Register first"));
    }
    resp->set_state(RUNNING);
    return grpc::Status::OK;
  }

  grpc::Status GetStatus(grpc::ServerContext*, const GetStatusRequest*,
                         JobStatus*) override {
    return grpc::Status(grpc::StatusCode::UNIMPLEMENTED, "");
  }

  // Forgets every node, as a scheduler restarted from scratch.
  void Restart() {
    absl::MutexLock lock(&mu);
    known.clear();
  }

  int num_registers() {
    absl::MutexLock lock(&mu);
    return static_cast<int>(registers.size());
  }
  int num_heartbeats() {
    absl::MutexLock lock(&mu);
    return static_cast<int>(heartbeats.size());
  }

  absl::Mutex mu;
  std::deque<grpc::Status> register_answers ABSL_GUARDED_BY(mu);
  // Once the queue is empty: every Register answered this (OK: accepted).
  grpc::Status refuse_registers ABSL_GUARDED_BY(mu);
  std::vector<RegisterRequest> registers ABSL_GUARDED_BY(mu);
  std::vector<absl::Time> register_times ABSL_GUARDED_BY(mu);
  std::vector<HeartbeatRequest> heartbeats ABSL_GUARDED_BY(mu);
  std::map<std::string, int64_t> known
      ABSL_GUARDED_BY(mu);  // id -> incarnation
  int64_t last_id ABSL_GUARDED_BY(mu) = 0;
  int unavailable_assignments ABSL_GUARDED_BY(mu) = 0;
  bool block_assignment ABSL_GUARDED_BY(mu) = false;
  int assignment_calls ABSL_GUARDED_BY(mu) = 0;
  bool assignment_cancelled ABSL_GUARDED_BY(mu) = false;
};

class SchedulerClientTest : public ::testing::Test {
 protected:
  void SetUp() override {
    GrpcServerOptions options;
    options.listen_address = "127.0.0.1:0";
    absl::StatusOr<StartedServer> started = StartGrpcServer(options, {&fake_});
    ASSERT_TRUE(started.ok()) << started.status();
    server_ = std::move(started->server);
    address_ = absl::StrCat("127.0.0.1:", started->port);
  }

  void TearDown() override {
    server_->Shutdown(absl::ToChronoTime(absl::Now() + absl::Seconds(2)));
  }

  std::unique_ptr<SchedulerClient> NewClient() {
    return std::make_unique<SchedulerClient>(
        Scheduler::NewStub(MakeChannel(address_)), address_);
  }

  static RegisterRequest ServerRequest(bool backup = false) {
    RegisterRequest req;
    req.set_role(SERVER);
    req.set_requested_rank(1);
    req.set_backup(backup);
    req.set_hostname("test");
    return req;
  }

  FakeScheduler fake_;
  std::unique_ptr<grpc::Server> server_;
  std::string address_;
};

TEST_F(SchedulerClientTest, RegisterRetriesWithBackoffUntilAccepted) {
  {
    absl::MutexLock lock(&fake_.mu);
    fake_.register_answers = {
        grpc::Status(grpc::StatusCode::UNAVAILABLE, "not up yet"),
        grpc::Status(grpc::StatusCode::UNAVAILABLE, "not up yet"),
        grpc::Status(grpc::StatusCode::RESOURCE_EXHAUSTED, "no free slot")};
  }
  auto client = NewClient();
  client->set_backoff(absl::Milliseconds(50), absl::Milliseconds(100));
  absl::StatusOr<RegisterResponse> r =
      client->Register(ServerRequest(/*backup=*/true), absl::Seconds(30));
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(client->node_id(), "node-1");
  EXPECT_EQ(client->lease(), absl::Milliseconds(900));
  EXPECT_TRUE(client->backup_slot());
  absl::MutexLock lock(&fake_.mu);
  ASSERT_EQ(fake_.register_times.size(), 4u);
  // The waits double from 50 ms (lower bounds only: a loaded machine only
  // makes them longer).
  const std::vector<absl::Duration> at_least = {
      absl::Milliseconds(50), absl::Milliseconds(100), absl::Milliseconds(100)};
  for (size_t i = 0; i < at_least.size(); ++i) {
    EXPECT_GE(fake_.register_times[i + 1] - fake_.register_times[i],
              at_least[i])
        << "wait " << i;
  }
}

TEST_F(SchedulerClientTest, CancelEndsRegisterRetriesPromptly) {
  {
    absl::MutexLock lock(&fake_.mu);
    fake_.refuse_registers =
        grpc::Status(grpc::StatusCode::UNAVAILABLE, "not up yet");
  }
  auto client = NewClient();
  // Without the cancellation the first wait alone would last a minute.
  client->set_backoff(absl::Seconds(60), absl::Seconds(60));
  absl::StatusOr<RegisterResponse> r;
  std::thread registering(
      [&] { r = client->Register(ServerRequest(), absl::Minutes(5)); });
  ASSERT_TRUE(WaitUntil([&] { return fake_.num_registers() >= 1; },
                        "the first Register attempt"));
  // A round trip of its own to the scheduler, so that the client has most
  // likely taken the answer and waits for the next attempt (cancelled while
  // the call is still in flight, it must end at once as well).
  {
    grpc::ClientContext context;
    JobStatus status;
    Scheduler::NewStub(MakeChannel(address_))
        ->GetStatus(&context, GetStatusRequest(), &status)
        .IgnoreError();
  }
  const absl::Time cancelled_at = absl::Now();
  client->Cancel();
  registering.join();
  EXPECT_LT(absl::Now() - cancelled_at, absl::Seconds(5));
  EXPECT_EQ(r.status().code(), absl::StatusCode::kCancelled) << r.status();
  EXPECT_TRUE(client->cancelled());

  // Later calls fail at once without reaching the scheduler.
  const int attempts = fake_.num_registers();
  EXPECT_EQ(client->Register(ServerRequest(), absl::Minutes(5)).status().code(),
            absl::StatusCode::kCancelled);
  EXPECT_EQ(client->WaitForAssignment(absl::Minutes(5)).status().code(),
            absl::StatusCode::kCancelled);
  EXPECT_EQ(fake_.num_registers(), attempts);
}

TEST_F(SchedulerClientTest, CancelEndsTheCallInFlight) {
  auto client = NewClient();
  ASSERT_TRUE(client->Register(ServerRequest(), absl::Seconds(30)).ok());
  {
    absl::MutexLock lock(&fake_.mu);
    fake_.block_assignment = true;
  }
  absl::StatusOr<Assignment> a;
  std::thread waiting([&] { a = client->WaitForAssignment(absl::Minutes(5)); });
  ASSERT_TRUE(WaitUntil(
      [&] {
        absl::MutexLock lock(&fake_.mu);
        return fake_.assignment_calls >= 1;
      },
      "the GetAssignment call to reach the scheduler"));
  const absl::Time cancelled_at = absl::Now();
  client->Cancel();
  waiting.join();
  EXPECT_LT(absl::Now() - cancelled_at, absl::Seconds(5));
  EXPECT_EQ(a.status().code(), absl::StatusCode::kCancelled) << a.status();
  EXPECT_TRUE(WaitUntil(
      [&] {
        absl::MutexLock lock(&fake_.mu);
        return fake_.assignment_cancelled;
      },
      "the scheduler to see GetAssignment cancelled"));
}

TEST_F(SchedulerClientTest, WaitForAssignmentRetriesUnavailable) {
  auto client = NewClient();
  client->set_backoff(absl::Milliseconds(10), absl::Milliseconds(20));
  ASSERT_TRUE(client->Register(ServerRequest(), absl::Seconds(30)).ok());
  {
    absl::MutexLock lock(&fake_.mu);
    fake_.unavailable_assignments = 2;
  }
  absl::StatusOr<Assignment> a = client->WaitForAssignment(absl::Seconds(30));
  ASSERT_TRUE(a.ok()) << a.status();
  EXPECT_EQ(a->node_id(), "node-1");
  EXPECT_EQ(a->shard(), 3);
  absl::MutexLock lock(&fake_.mu);
  EXPECT_EQ(fake_.assignment_calls, 3);
}

TEST_F(SchedulerClientTest, JobFinishedIsReturnedAtOnceWithItsReason) {
  const absl::Status finished =
      WithReason(absl::FailedPreconditionError(
                     "cannot register: the job is already FINISHED"),
                 JOB_FINISHED);
  for (const bool raw : {false, true}) {
    SCOPED_TRACE(raw ? "raw errors" : "worded errors");
    {
      absl::MutexLock lock(&fake_.mu);
      fake_.registers.clear();
      fake_.refuse_registers = ToGrpcStatus(finished);
    }
    auto client = NewClient();
    client->set_raw_errors(raw);
    absl::StatusOr<RegisterResponse> r =
        client->Register(ServerRequest(), absl::Seconds(30));
    EXPECT_EQ(r.status().code(), absl::StatusCode::kFailedPrecondition)
        << r.status();
    EXPECT_EQ(ReasonOf(r.status()), JOB_FINISHED) << r.status();
    EXPECT_TRUE(
        absl::StrContains(r.status().message(), "the job is already FINISHED"))
        << r.status();
    EXPECT_EQ(absl::StrContains(r.status().message(), address_), !raw)
        << r.status();
    EXPECT_EQ(fake_.num_registers(), 1) << "not retried";
  }
}

TEST_F(SchedulerClientTest, RawErrorsAreTheSchedulersAnswers) {
  {
    absl::MutexLock lock(&fake_.mu);
    fake_.refuse_registers =
        grpc::Status(grpc::StatusCode::UNAVAILABLE, "not up yet");
  }
  auto worded = NewClient();
  worded->set_backoff(absl::Milliseconds(10), absl::Milliseconds(10));
  absl::StatusOr<RegisterResponse> r =
      worded->Register(ServerRequest(), absl::Seconds(2));
  EXPECT_EQ(r.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_TRUE(absl::StrContains(
      r.status().message(),
      absl::StrCat("scheduler at ", address_, " unreachable after 2s: not up yet")))
      << r.status();

  auto raw = NewClient();
  raw->set_backoff(absl::Milliseconds(10), absl::Milliseconds(10));
  raw->set_raw_errors(true);
  // 2 s leaves many attempts; the last is cut short by the deadline, and
  // its DEADLINE_EXCEEDED must not hide the scheduler's answer.
  r = raw->Register(ServerRequest(), absl::Seconds(2));
  EXPECT_EQ(r.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_EQ(r.status().message(), "not up yet");
  EXPECT_TRUE(SchedulerClient::IsRetryable(r.status()));
}

TEST_F(SchedulerClientTest, RejoinHookFieldsReachTheScheduler) {
  auto client = NewClient();
  ASSERT_TRUE(
      client->Register(ServerRequest(/*backup=*/true), absl::Seconds(30)).ok());
  EXPECT_EQ(client->node_id(), "node-1");
  int64_t step_seen_by_fill = -1;
  std::vector<std::string> rejoined_as;
  RejoinOptions options;
  options.fill = [&](RegisterRequest* req) {
    step_seen_by_fill = req->step();
    req->set_step(43);
    req->set_epoch(7);
    req->set_serving_primary(true);
    req->set_backup(client->backup_slot());  // the hook may call the client
  };
  options.done = [&](const RegisterRequest& req,
                     const absl::StatusOr<RegisterResponse>& resp) {
    EXPECT_EQ(req.epoch(), 7);
    ASSERT_TRUE(resp.ok()) << resp.status();
    rejoined_as.push_back(resp->node_id());
  };
  client->EnableRejoin(ServerRequest(), std::move(options));

  fake_.Restart();
  HeartbeatRequest hb;
  hb.set_step(42);
  absl::StatusOr<HeartbeatResponse> r = client->Heartbeat(hb, absl::Seconds(5));
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->state(), RUNNING);
  EXPECT_EQ(step_seen_by_fill, 42);
  EXPECT_EQ(rejoined_as, std::vector<std::string>{"node-2"});
  EXPECT_EQ(client->node_id(), "node-2");

  absl::MutexLock lock(&fake_.mu);
  ASSERT_EQ(fake_.registers.size(), 2u);
  const RegisterRequest& rejoin = fake_.registers[1];
  EXPECT_TRUE(rejoin.rejoin());
  EXPECT_EQ(rejoin.role(), SERVER);
  EXPECT_EQ(rejoin.requested_rank(), 1);
  EXPECT_EQ(rejoin.step(), 43);
  EXPECT_EQ(rejoin.epoch(), 7);
  EXPECT_TRUE(rejoin.serving_primary());
  EXPECT_TRUE(rejoin.backup());
  // The heartbeat was repeated under the new registration.
  ASSERT_EQ(fake_.heartbeats.size(), 2u);
  EXPECT_EQ(fake_.heartbeats[0].node_id(), "node-1");
  EXPECT_EQ(fake_.heartbeats[0].incarnation(), 10);
  EXPECT_EQ(fake_.heartbeats[1].node_id(), "node-2");
  EXPECT_EQ(fake_.heartbeats[1].incarnation(), 20);
  EXPECT_EQ(fake_.heartbeats[1].step(), 42);
}

TEST_F(SchedulerClientTest, FailedRejoinIsToldToTheHookAndReturned) {
  for (const bool raw : {false, true}) {
    SCOPED_TRACE(raw ? "raw errors" : "worded errors");
    {
      absl::MutexLock lock(&fake_.mu);
      fake_.refuse_registers = grpc::Status::OK;
    }
    auto client = NewClient();
    client->set_raw_errors(raw);
    ASSERT_TRUE(client->Register(ServerRequest(), absl::Seconds(30)).ok());
    std::vector<absl::Status> told;
    RejoinOptions options;
    options.done = [&](const RegisterRequest&,
                       const absl::StatusOr<RegisterResponse>& resp) {
      told.push_back(resp.status());
    };
    client->EnableRejoin(ServerRequest(), std::move(options));
    fake_.Restart();
    {
      absl::MutexLock lock(&fake_.mu);
      fake_.refuse_registers =
          grpc::Status(grpc::StatusCode::FAILED_PRECONDITION, "rejoin refused");
    }
    absl::StatusOr<HeartbeatResponse> r =
        client->Heartbeat(HeartbeatRequest(), absl::Seconds(5));
    ASSERT_EQ(told.size(), 1u);
    EXPECT_EQ(told[0].code(), absl::StatusCode::kFailedPrecondition);
    EXPECT_EQ(r.status().code(), absl::StatusCode::kFailedPrecondition)
        << r.status();
    if (raw) {
      EXPECT_EQ(r.status().message(), "rejoin refused");
    } else {
      EXPECT_TRUE(absl::StrContains(
          r.status().message(),
          absl::StrCat("heartbeat to scheduler ", address_,
                       ": rejoining after a scheduler restart: ")))
          << r.status();
    }
  }
}

TEST_F(SchedulerClientTest, ReportErrorIsSentAfterCancelAndNeverRejoins) {
  auto unregistered = NewClient();
  EXPECT_EQ(unregistered->ReportError("boom", absl::Seconds(5)).code(),
            absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(fake_.num_heartbeats(), 0);

  auto client = NewClient();
  ASSERT_TRUE(client->Register(ServerRequest(), absl::Seconds(30)).ok());
  client->EnableRejoin(ServerRequest());
  client->Cancel();
  EXPECT_EQ(
      client->Heartbeat(HeartbeatRequest(), absl::Seconds(5)).status().code(),
      absl::StatusCode::kCancelled);
  EXPECT_EQ(fake_.num_heartbeats(), 0);
  EXPECT_TRUE(client->ReportError("boom", absl::Seconds(5)).ok());
  {
    absl::MutexLock lock(&fake_.mu);
    ASSERT_EQ(fake_.heartbeats.size(), 1u);
    EXPECT_EQ(fake_.heartbeats[0].error(), "boom");
    EXPECT_EQ(fake_.heartbeats[0].node_id(), "node-1");
    EXPECT_EQ(fake_.heartbeats[0].incarnation(), 10);
  }

  // A scheduler that does not know the node: the report is lost, and no
  // rejoin is attempted.
  fake_.Restart();
  EXPECT_EQ(client->ReportError("boom", absl::Seconds(5)).code(),
            absl::StatusCode::kNotFound);
  EXPECT_EQ(fake_.num_registers(), 1);
}

}  // namespace
}  // namespace lmps
