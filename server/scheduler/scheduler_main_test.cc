// Runs the lmps_scheduler binary: exit codes, --port_file, and exiting after
// the job ends.
#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>
#include <fstream>
#include <future>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/grpcpp.h>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "common/rpc/grpc_server.h"
#include "common/rpc/health_check_test_util.h"
#include "gtest/gtest.h"
#include "proto/lmps.grpc.pb.h"

extern char** environ;

namespace lmps {
namespace {

std::string TmpDir() {
  const char* dir = std::getenv("TEST_TMPDIR");
  return dir != nullptr ? dir : "/tmp";
}

std::string ReadFile(const std::string& path) {
  std::ifstream in(path);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

// A running lmps_scheduler whose stderr goes to a file.
class Scheduler {
 public:
  Scheduler(const std::string& name, std::vector<std::string> args)
      : stderr_path_(absl::StrCat(TmpDir(), "/", name, ".stderr")) {
    args.insert(args.begin(), "server/scheduler/lmps_scheduler");
    std::vector<char*> argv;
    for (std::string& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);
    posix_spawn_file_actions_t actions;
    posix_spawn_file_actions_init(&actions);
    posix_spawn_file_actions_addopen(&actions, 2, stderr_path_.c_str(),
                                     O_WRONLY | O_CREAT | O_TRUNC, 0644);
    const int rc = posix_spawn(&pid_, argv[0], &actions, nullptr, argv.data(),
                               environ);
    posix_spawn_file_actions_destroy(&actions);
    EXPECT_EQ(rc, 0) << "cannot start " << argv[0];
    if (rc != 0) pid_ = -1;
  }

  ~Scheduler() {
    if (pid_ > 0) {
      kill(pid_, SIGKILL);
      waitpid(pid_, nullptr, 0);
    }
  }

  // The exit code, or -1 if it is still running after `timeout`.
  int Wait(absl::Duration timeout) {
    const absl::Time end = absl::Now() + timeout;
    while (pid_ > 0) {
      int status = 0;
      if (waitpid(pid_, &status, WNOHANG) == pid_) {
        pid_ = -1;
        return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
      }
      if (absl::Now() > end) return -1;
      absl::SleepFor(absl::Milliseconds(20));
    }
    return -1;
  }

  void Signal(int signo) {
    if (pid_ > 0) kill(pid_, signo);
  }

  std::string Stderr() const { return ReadFile(stderr_path_); }

 private:
  std::string stderr_path_;
  pid_t pid_ = -1;
};

int WaitForPort(const std::string& path, absl::Duration timeout) {
  const absl::Time end = absl::Now() + timeout;
  while (absl::Now() < end) {
    int port = 0;
    std::string text = ReadFile(path);
    if (!text.empty() && text.back() == '\n') text.pop_back();
    if (absl::SimpleAtoi(text, &port) && port > 0) return port;
    absl::SleepFor(absl::Milliseconds(20));
  }
  return 0;
}

// grpc.health.v1.Health/Check for "": the HealthCheckResponse bytes.
std::string HealthCheck(const std::shared_ptr<grpc::Channel>& channel) {
  return HealthCheckBytes(channel, absl::Seconds(5));
}

TEST(SchedulerMainTest, MalformedJobFileExits2) {
  const std::string job = absl::StrCat(TmpDir(), "/bad.textproto");
  std::ofstream(job) << "model { n_layer: banana }\n";
  Scheduler s("malformed", {absl::StrCat("--job=", job),
                            "--listen=127.0.0.1:0"});
  EXPECT_EQ(s.Wait(absl::Seconds(10)), 2);
  EXPECT_TRUE(absl::StrContains(s.Stderr(), "[scheduler] error: "))
      << s.Stderr();
  EXPECT_TRUE(absl::StrContains(s.Stderr(), "malformed job spec: line 1"))
      << s.Stderr();
}

TEST(SchedulerMainTest, InvalidOverrideExits2) {
  // Default batch_size 16 is not divisible by 3 workers.
  Scheduler s("override", {"--workers=3", "--listen=127.0.0.1:0"});
  EXPECT_EQ(s.Wait(absl::Seconds(10)), 2);
  EXPECT_TRUE(absl::StrContains(s.Stderr(), "train.batch_size")) << s.Stderr();
}

TEST(SchedulerMainTest, FinishedJobExits0AfterServersSawIt) {
  const std::string port_file = absl::StrCat(TmpDir(), "/finished.port");
  Scheduler s("finished",
              {"--workers=1", "--shards=1", "--steps=5",
               "--listen=127.0.0.1:0", absl::StrCat("--port_file=", port_file)});
  const int port = WaitForPort(port_file, absl::Seconds(10));
  ASSERT_GT(port, 0) << s.Stderr();
  auto channel = MakeChannel(absl::StrCat("127.0.0.1:", port));
  auto stub = lmps::Scheduler::NewStub(channel);
  // HealthCheckResponse{status: SERVING}.
  EXPECT_EQ(HealthCheck(channel), std::string("\x08\x01", 2));

  auto call_register = [&](Role role, const std::string& address) {
    grpc::ClientContext ctx;
    RegisterRequest req;
    req.set_role(role);
    req.set_address(address);
    req.set_requested_rank(-1);
    RegisterResponse resp;
    grpc::Status st = stub->Register(&ctx, req, &resp);
    EXPECT_TRUE(st.ok()) << st.error_message();
    return resp.node_id();
  };
  auto beat = [&](const std::string& id, bool done) {
    grpc::ClientContext ctx;
    HeartbeatRequest req;
    req.set_node_id(id);
    req.set_step(5);
    req.set_done(done);
    HeartbeatResponse resp;
    grpc::Status st = stub->Heartbeat(&ctx, req, &resp);
    EXPECT_TRUE(st.ok()) << st.error_message();
    return resp.state();
  };
  EXPECT_EQ(call_register(SERVER, "127.0.0.1:1"), "server-0");
  EXPECT_EQ(call_register(WORKER, ""), "worker-0");
  {
    grpc::ClientContext ctx;
    GetAssignmentRequest req;
    req.set_node_id("worker-0");
    Assignment a;
    grpc::Status st = stub->GetAssignment(&ctx, req, &a);
    ASSERT_TRUE(st.ok()) << st.error_message();
    EXPECT_EQ(a.spec().train().steps(), 5);
  }
  EXPECT_EQ(beat("worker-0", true), FINISHED);
  const absl::Time finished = absl::Now();
  EXPECT_EQ(beat("server-0", false), FINISHED);
  EXPECT_EQ(s.Wait(absl::Seconds(8)), 0) << s.Stderr();
  // kExitGrace (2 s) plus the server's shutdown (at most 0.5 s).
  EXPECT_LT(absl::Now() - finished, absl::Seconds(4));
  const std::string log = s.Stderr();
  EXPECT_TRUE(absl::StrContains(log, "[scheduler] server-0 (127.0.0.1:1) "
                                     "registered"))
      << log;
  EXPECT_TRUE(absl::StrContains(log, "[scheduler] job assembled")) << log;
  EXPECT_TRUE(absl::StrContains(log, "[scheduler] start_step = 0")) << log;
  EXPECT_TRUE(absl::StrContains(log, "RUNNING -> FINISHED")) << log;
}

TEST(SchedulerMainTest, AssemblyTimeoutExits1WithTheReason) {
  Scheduler s("timeout", {"--workers=2", "--shards=1",
                          "--assemble_timeout_s=0.5", "--listen=127.0.0.1:0"});
  EXPECT_EQ(s.Wait(absl::Seconds(8)), 1) << s.Stderr();
  EXPECT_TRUE(absl::StrContains(
      s.Stderr(),
      "[scheduler] job FAILED: job did not assemble within 0.5s: missing 2 of "
      "2 workers, 1 of 1 server: shard 0, worker rank 0 (dp 0, pp 0, tp 0), "
      "worker rank 1 (dp 1, pp 0, tp 0) (registered: none)"))
      << s.Stderr();
}

TEST(SchedulerMainTest, SigtermStops) {
  const std::string port_file = absl::StrCat(TmpDir(), "/sigterm.port");
  Scheduler s("sigterm", {"--listen=127.0.0.1:0",
                          absl::StrCat("--port_file=", port_file)});
  ASSERT_GT(WaitForPort(port_file, absl::Seconds(10)), 0) << s.Stderr();
  EXPECT_EQ(s.Wait(absl::Milliseconds(200)), -1);  // still serving
  s.Signal(SIGTERM);
  EXPECT_EQ(s.Wait(absl::Seconds(5)), 128 + SIGTERM) << s.Stderr();
  EXPECT_TRUE(absl::StrContains(s.Stderr(), "caught signal")) << s.Stderr();
}

}  // namespace
}  // namespace lmps
