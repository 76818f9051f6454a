// Runs the real gRPC server in-process on 127.0.0.1:0 and drives it with a
// stub.
#include "server/scheduler/scheduler_service.h"

#include <chrono>
#include <future>
#include <memory>
#include <string>

#include <grpcpp/grpcpp.h>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "common/model/job_spec.h"
#include "common/rpc/grpc_server.h"
#include "gtest/gtest.h"
#include "proto/lmps.grpc.pb.h"
#include "server/scheduler/clock.h"
#include "server/scheduler/scheduler_core.h"

namespace lmps {
namespace {

class SchedulerServiceTest : public ::testing::Test {
 protected:
  void Start(int dp, int shards, absl::Duration assemble_timeout) {
    SchedulerOptions options;
    absl::StatusOr<JobSpec> spec = ParseJobSpec(
        "model { n_layer: 1 n_head: 2 n_embd: 16 block_size: 8 }");
    ASSERT_TRUE(spec.ok()) << spec.status();
    options.spec = *spec;
    options.spec.mutable_layout()->set_dp(dp);
    options.spec.mutable_layout()->set_num_shards(shards);
    options.assemble_timeout = assemble_timeout;
    auto core = SchedulerCore::Create(options, &clock_);
    ASSERT_TRUE(core.ok()) << core.status();
    core_ = std::move(*core);
    SchedulerServiceOptions service_options;
    service_options.tick_interval = absl::Milliseconds(20);
    auto service = SchedulerService::Create(core_.get(), service_options);
    ASSERT_TRUE(service.ok()) << service.status();
    service_ = std::move(*service);
    GrpcServerOptions server_options;
    server_options.listen_address = "127.0.0.1:0";
    auto server = StartGrpcServer(server_options, {service_.get()});
    ASSERT_TRUE(server.ok()) << server.status();
    server_ = std::move(server->server);
    SetServing(server_.get(), true);
    stub_ = Scheduler::NewStub(
        MakeChannel(absl::StrCat("127.0.0.1:", server->port)));
  }

  void TearDown() override {
    if (core_) core_->Shutdown();
    if (server_) {
      server_->Shutdown(std::chrono::system_clock::now() +
                        std::chrono::seconds(2));
    }
    service_.reset();
    core_.reset();
  }

  // Calls with a client deadline of `timeout`.
  grpc::Status Register(Role role, const std::string& address,
                        RegisterResponse* response,
                        absl::Duration timeout = absl::Seconds(5)) {
    grpc::ClientContext ctx;
    ctx.set_deadline(absl::ToChronoTime(absl::Now() + timeout));
    RegisterRequest req;
    req.set_role(role);
    req.set_address(address);
    req.set_hostname("test-host");
    req.set_requested_rank(-1);
    return stub_->Register(&ctx, req, response);
  }

  std::string MustRegister(Role role, const std::string& address) {
    RegisterResponse resp;
    grpc::Status st = Register(role, address, &resp);
    EXPECT_TRUE(st.ok()) << st.error_message();
    return resp.node_id();
  }

  grpc::Status GetAssignment(const std::string& node_id, Assignment* out,
                             absl::Duration timeout = absl::Seconds(10)) {
    grpc::ClientContext ctx;
    ctx.set_deadline(absl::ToChronoTime(absl::Now() + timeout));
    GetAssignmentRequest req;
    req.set_node_id(node_id);
    return stub_->GetAssignment(&ctx, req, out);
  }

  std::future<std::pair<grpc::Status, Assignment>> AsyncGetAssignment(
      const std::string& node_id) {
    return std::async(std::launch::async, [this, node_id] {
      Assignment a;
      grpc::Status st = GetAssignment(node_id, &a);
      return std::make_pair(st, a);
    });
  }

  grpc::Status GetStatus(JobStatus* status) {
    grpc::ClientContext ctx;
    ctx.set_deadline(absl::ToChronoTime(absl::Now() + absl::Seconds(5)));
    return stub_->GetStatus(&ctx, GetStatusRequest(), status);
  }

  RealClock clock_;
  std::unique_ptr<SchedulerCore> core_;
  std::unique_ptr<SchedulerService> service_;
  std::unique_ptr<grpc::Server> server_;
  std::unique_ptr<Scheduler::Stub> stub_;
};

TEST_F(SchedulerServiceTest, AssemblesOneServerAndTwoWorkers) {
  Start(/*dp=*/2, /*shards=*/1, absl::Seconds(30));
  EXPECT_EQ(MustRegister(WORKER, ""), "worker-0");
  EXPECT_EQ(MustRegister(SERVER, "127.0.0.1:4100"), "server-0");
  auto w0 = AsyncGetAssignment("worker-0");
  auto s0 = AsyncGetAssignment("server-0");
  EXPECT_EQ(w0.wait_for(std::chrono::milliseconds(300)),
            std::future_status::timeout);
  EXPECT_EQ(s0.wait_for(std::chrono::milliseconds(0)),
            std::future_status::timeout);
  EXPECT_EQ(MustRegister(WORKER, ""), "worker-1");

  auto [w0_status, w0_assignment] = w0.get();
  ASSERT_TRUE(w0_status.ok()) << w0_status.error_message();
  EXPECT_EQ(w0_assignment.node_id(), "worker-0");
  EXPECT_EQ(w0_assignment.dp_rank(), 0);
  ASSERT_EQ(w0_assignment.shard_addresses_size(), 1);
  EXPECT_EQ(w0_assignment.shard_addresses(0), "127.0.0.1:4100");
  EXPECT_EQ(w0_assignment.partition().version(), core_->partition().version());
  auto [s0_status, s0_assignment] = s0.get();
  ASSERT_TRUE(s0_status.ok()) << s0_status.error_message();
  EXPECT_EQ(s0_assignment.role(), SERVER);
  EXPECT_EQ(s0_assignment.shard(), 0);
  Assignment w1;
  grpc::Status st = GetAssignment("worker-1", &w1);
  ASSERT_TRUE(st.ok()) << st.error_message();
  EXPECT_EQ(w1.dp_rank(), 1);

  HeartbeatRequest hb;
  hb.set_node_id("worker-1");
  hb.set_step(3);
  hb.set_loss(4.5f);
  HeartbeatResponse hb_resp;
  grpc::ClientContext hb_ctx;
  st = stub_->Heartbeat(&hb_ctx, hb, &hb_resp);
  ASSERT_TRUE(st.ok()) << st.error_message();
  EXPECT_EQ(hb_resp.state(), RUNNING);

  JobStatus status;
  st = GetStatus(&status);
  ASSERT_TRUE(st.ok()) << st.error_message();
  EXPECT_EQ(status.state(), RUNNING);
  ASSERT_EQ(status.nodes_size(), 3);
  EXPECT_EQ(status.nodes(0).node_id(), "server-0");
  EXPECT_EQ(status.nodes(0).address(), "127.0.0.1:4100");
  EXPECT_EQ(status.nodes(1).node_id(), "worker-0");
  EXPECT_EQ(status.nodes(2).node_id(), "worker-1");
  EXPECT_EQ(status.nodes(2).step(), 3);
  EXPECT_FLOAT_EQ(status.nodes(2).loss(), 4.5f);
  EXPECT_EQ(status.expected_workers(), 2);
  EXPECT_EQ(status.expected_servers(), 1);
}

TEST_F(SchedulerServiceTest, NeverAssemblingIsDeadlineExceededNamingMissing) {
  Start(/*dp=*/1, /*shards=*/1, absl::Seconds(1));
  MustRegister(WORKER, "");
  const absl::Time start = absl::Now();
  Assignment a;
  grpc::Status st = GetAssignment("worker-0", &a, absl::Seconds(10));
  const absl::Duration took = absl::Now() - start;
  EXPECT_EQ(st.error_code(), grpc::StatusCode::DEADLINE_EXCEEDED);
  EXPECT_TRUE(absl::StrContains(
      st.error_message(),
      "job did not assemble within 1s: missing 0 of 1 worker, 1 of 1 server: "
      "shard 0 (registered: worker-0 at test-host)"))
      << st.error_message();
  EXPECT_LT(took, absl::Seconds(3));
  JobStatus status;
  ASSERT_TRUE(GetStatus(&status).ok());
  EXPECT_EQ(status.state(), FAILED);
}

TEST_F(SchedulerServiceTest, ClientDeadlineGetsTheSchedulersMessage) {
  Start(/*dp=*/1, /*shards=*/1, absl::Seconds(30));
  MustRegister(WORKER, "");
  Assignment a;
  grpc::Status st = GetAssignment("worker-0", &a, absl::Milliseconds(800));
  EXPECT_EQ(st.error_code(), grpc::StatusCode::DEADLINE_EXCEEDED);
  EXPECT_TRUE(absl::StrContains(st.error_message(), "1 of 1 server"))
      << st.error_message();
  // The job itself keeps assembling.
  MustRegister(SERVER, "127.0.0.1:4100");
  st = GetAssignment("worker-0", &a);
  EXPECT_TRUE(st.ok()) << st.error_message();
}

TEST_F(SchedulerServiceTest, GarbageRequestsFailAndTheServerKeepsServing) {
  Start(/*dp=*/1, /*shards=*/1, absl::Seconds(30));
  Assignment a;
  grpc::Status st = GetAssignment("worker-99", &a);
  EXPECT_EQ(st.error_code(), grpc::StatusCode::NOT_FOUND);
  st = GetAssignment("", &a);
  EXPECT_EQ(st.error_code(), grpc::StatusCode::NOT_FOUND);
  RegisterResponse r;
  st = Register(static_cast<Role>(42), "x:1", &r);
  EXPECT_EQ(st.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_TRUE(absl::StrContains(st.error_message(), "valid roles"));
  st = Register(SCHEDULER, "x:1", &r);
  EXPECT_EQ(st.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  st = Register(SERVER, "", &r);
  EXPECT_EQ(st.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  HeartbeatRequest hb;
  hb.set_node_id("server-5");
  HeartbeatResponse hb_resp;
  grpc::ClientContext ctx;
  st = stub_->Heartbeat(&ctx, hb, &hb_resp);
  EXPECT_EQ(st.error_code(), grpc::StatusCode::NOT_FOUND);

  // A cancelled wait is finished by the server too.
  MustRegister(WORKER, "");
  {
    grpc::ClientContext cancel_ctx;
    GetAssignmentRequest req;
    req.set_node_id("worker-0");
    Assignment out;
    std::promise<grpc::Status> done;
    stub_->async()->GetAssignment(
        &cancel_ctx, &req, &out,
        [&done](grpc::Status s) { done.set_value(std::move(s)); });
    absl::SleepFor(absl::Milliseconds(100));
    cancel_ctx.TryCancel();
    EXPECT_EQ(done.get_future().get().error_code(),
              grpc::StatusCode::CANCELLED);
  }

  JobStatus status;
  st = GetStatus(&status);
  ASSERT_TRUE(st.ok()) << st.error_message();
  EXPECT_EQ(status.state(), ASSEMBLING);
  ASSERT_EQ(status.nodes_size(), 1);
  EXPECT_EQ(MustRegister(SERVER, "127.0.0.1:4100"), "server-0");
  st = GetAssignment("worker-0", &a);
  EXPECT_TRUE(st.ok()) << st.error_message();
}

TEST_F(SchedulerServiceTest, ShutdownWithAParkedCallIsClean) {
  Start(/*dp=*/1, /*shards=*/1, absl::Seconds(30));
  MustRegister(WORKER, "");
  auto w0 = AsyncGetAssignment("worker-0");
  absl::SleepFor(absl::Milliseconds(200));
  core_->Shutdown();
  auto [st, a] = w0.get();
  EXPECT_EQ(st.error_code(), grpc::StatusCode::UNAVAILABLE);
}

}  // namespace
}  // namespace lmps
