// Transport security with the real binaries, using certificates from
// scripts/make_test_certs.sh:
//  - a whole local job over mutual TLS with the shared token, through the
//    launcher (--tls_dir, --auth_token_file), finishes and exports;
//  - a running lmps_scheduler (mutual TLS + token, --metrics_listen) refuses
//    a client without a certificate, answers a wrong or missing token with
//    UNAUTHENTICATED and counts it in lmps_unauthenticated_total (scraped
//    from /metrics), answers health checks without a token, refuses an
//    oversize message with RESOURCE_EXHAUSTED and keeps serving;
//  - a parameter server with the wrong token fails at once with a clear
//    error instead of retrying until the assemble timeout;
//  - bad security flags stop the daemons at startup with a message.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <future>
#include <memory>
#include <regex>
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
#include "common/rpc/security.h"
#include "gtest/gtest.h"
#include "proto/lmps.grpc.pb.h"
#include "tests/test_util.h"

namespace lmps::testing {
namespace {

namespace fs = std::filesystem;

// The job's certificates and token (made once).
const std::string& Certs() {
  static const std::string* dir = [] {
    auto* d = new std::string(TempDir("certs"));
    CommandResult r = RunCommand(
        {BinaryPath("scripts/make_test_certs.sh"), *d}, 60);
    EXPECT_EQ(r.exit_code, 0) << r.output;
    return d;
  }();
  return *dir;
}

SecurityOptions Client(bool cert, const std::string& token_file) {
  SecurityOptions o;
  o.ca_cert = Certs() + "/ca.crt";
  if (cert) {
    o.cert = Certs() + "/client.crt";
    o.key = Certs() + "/client.key";
  }
  o.token_file = token_file;
  return o;
}

std::vector<std::string> ServerTlsFlags() {
  return {"--tls_ca=" + Certs() + "/ca.crt",
          "--tls_cert=" + Certs() + "/server.crt",
          "--tls_key=" + Certs() + "/server.key",
          "--auth_token_file=" + Certs() + "/token"};
}

std::shared_ptr<grpc::Channel> Channel(int port, const SecurityOptions& o,
                                       int max_message_bytes =
                                           kDefaultMaxMessageBytes) {
  absl::StatusOr<Security> security = Security::Load(o);
  EXPECT_TRUE(security.ok()) << security.status();
  grpc::ChannelArguments args = ClientChannelArgs(max_message_bytes);
  std::vector<std::unique_ptr<
      grpc::experimental::ClientInterceptorFactoryInterface>>
      interceptors;
  if (security->has_token()) {
    interceptors.push_back(MakeTokenInterceptorFactory(security->token()));
  }
  return grpc::experimental::CreateCustomChannelWithInterceptors(
      absl::StrCat("127.0.0.1:", port), MakeChannelCredentials(*security),
      args, std::move(interceptors));
}

grpc::Status GetStatus(const std::shared_ptr<grpc::Channel>& channel) {
  grpc::ClientContext ctx;
  ctx.set_deadline(absl::ToChronoTime(absl::Now() + absl::Seconds(10)));
  JobStatus status;
  return Scheduler::NewStub(channel)->GetStatus(&ctx, GetStatusRequest(),
                                                &status);
}

// grpc.health.v1.Health/Check for "": the response bytes (08 01: SERVING)
// or "error: ...".
std::string Health(const std::shared_ptr<grpc::Channel>& channel) {
  return HealthCheckBytes(channel);
}

// A port that was free a moment ago.
int FreePort() {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = 0;
  bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr));
  socklen_t len = sizeof(addr);
  getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len);
  close(fd);
  return ntohs(addr.sin_port);
}

// GET http://127.0.0.1:port/metrics, the body ("" on failure).
std::string Scrape(int port) {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = htons(port);
  if (connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
    close(fd);
    return "";
  }
  const std::string request =
      "GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n";
  if (write(fd, request.data(), request.size()) !=
      static_cast<ssize_t>(request.size())) {
    close(fd);
    return "";
  }
  std::string out;
  char buf[65536];
  for (ssize_t n; (n = read(fd, buf, sizeof(buf))) > 0;) out.append(buf, n);
  close(fd);
  const size_t body = out.find("\r\n\r\n");
  return body == std::string::npos ? "" : out.substr(body + 4);
}

// The value of lmps_unauthenticated_total{...reason="<reason>"...}, or -1.
double Unauthenticated(const std::string& exposition, const std::string& reason) {
  const std::regex line("^lmps_unauthenticated_total\\{[^}]*reason=\"" + reason +
                            "\"[^}]*\\} ([0-9.e+]+)$",
                        std::regex::multiline);
  std::smatch m;
  if (!std::regex_search(exposition, m, line)) return -1;
  double v = -1;
  return absl::SimpleAtod(m[1].str(), &v) ? v : -1;
}

const std::string kServing("\x08\x01", 2);

TEST(SecurityTest, LocalJobOverMutualTlsWithToken) {
  const std::string dir = TempDir("job");
  WriteFile(dir + "/job.textproto", R"(
model { n_layer: 1 n_head: 2 n_embd: 16 block_size: 16 }
max_chunk_bytes: 1024
max_message_bytes: 1024
train { steps: 4 batch_size: 4 eval_interval: 2 checkpoint_interval: 2
        sample_tokens: 8 }
)");
  CommandResult r = RunCommand(
      {BinaryPath("launcher/lmps_local"), "--job=" + dir + "/job.textproto",
       "--run_dir=" + dir + "/run", "--workers=2", "--shards=2",
       // Tensor parallel: the workers' WorkerPeer channels are secured too.
       "--tp=2",
       "--tls_dir=" + Certs(), "--auth_token_file=" + Certs() + "/token"},
      240);
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_TRUE(absl::StrContains(
      r.output, "transport security: TLS with client certificates (mutual) + "
                "token"))
      << r.output;
  EXPECT_TRUE(fs::exists(dir + "/run/model.safetensors"));
  const std::string scheduler_log = ReadFile(dir + "/run/logs/scheduler.log");
  EXPECT_TRUE(absl::StrContains(scheduler_log,
                                "TLS with client certificates (mutual) + token"))
      << scheduler_log;
  EXPECT_TRUE(absl::StrContains(ReadFile(dir + "/run/logs/server-0.log"),
                                "TLS with client certificates (mutual)"));
  EXPECT_TRUE(absl::StrContains(ReadFile(dir + "/run/logs/worker-1.log"),
                                "TLS with client certificates (mutual)"));
}

TEST(SecurityTest, LauncherRejectsAnIncompleteTlsDir) {
  const std::string dir = TempDir("incomplete");
  fs::copy_file(Certs() + "/ca.crt", dir + "/ca.crt");
  CommandResult r = RunCommand(
      {BinaryPath("launcher/lmps_local"), "--run_dir=" + dir + "/run",
       "--tls_dir=" + dir, "--steps=1"},
      60);
  EXPECT_EQ(r.exit_code, 2) << r.output;
  EXPECT_TRUE(absl::StrContains(r.output, "server.crt")) << r.output;
  EXPECT_TRUE(absl::StrContains(r.output, "make_test_certs.sh")) << r.output;
}

class RunningSchedulerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = TempDir("scheduler");
    metrics_port_ = FreePort();
    std::vector<std::string> argv = {
        BinaryPath("server/scheduler/lmps_scheduler"),
        "--listen=127.0.0.1:0",
        "--port_file=" + dir_ + "/port",
        absl::StrCat("--metrics_listen=127.0.0.1:", metrics_port_),
        "--workers=1",
        "--shards=1",
        "--assemble_timeout_s=60"};
    for (const std::string& f : ServerTlsFlags()) argv.push_back(f);
    scheduler_ = std::make_unique<BackgroundProcess>(argv, dir_ + "/log");
    const std::string port = WaitForFile(dir_ + "/port", 30);
    ASSERT_TRUE(absl::SimpleAtoi(port.substr(0, port.find('\n')), &port_))
        << "no port file; log:\n" << ReadFile(dir_ + "/log");
  }

  std::string dir_;
  int port_ = 0;
  int metrics_port_ = 0;
  std::unique_ptr<BackgroundProcess> scheduler_;
};

TEST_F(RunningSchedulerTest, AuthenticationIsEnforcedAndCounted) {
  const std::string token = Certs() + "/token";
  // The job's client: served.
  grpc::Status s = GetStatus(Channel(port_, Client(true, token)));
  ASSERT_TRUE(s.ok()) << s.error_message() << "\n" << ReadFile(dir_ + "/log");
  EXPECT_EQ(Unauthenticated(Scrape(metrics_port_), "wrong_token"), 0);

  // No client certificate: refused by the TLS handshake.
  s = GetStatus(Channel(port_, Client(false, token)));
  EXPECT_EQ(s.error_code(), grpc::StatusCode::UNAVAILABLE) << s.error_message();

  // A wrong token, then none: UNAUTHENTICATED, counted.
  const std::string wrong = dir_ + "/wrong_token";
  WriteFile(wrong, "00000000000000000000000000000000\n");
  s = GetStatus(Channel(port_, Client(true, wrong)));
  EXPECT_EQ(s.error_code(), grpc::StatusCode::UNAUTHENTICATED)
      << s.error_message();
  EXPECT_TRUE(absl::StrContains(s.error_message(), "wrong token"));
  s = GetStatus(Channel(port_, Client(true, wrong)));
  EXPECT_EQ(s.error_code(), grpc::StatusCode::UNAUTHENTICATED);
  s = GetStatus(Channel(port_, Client(true, "")));
  EXPECT_EQ(s.error_code(), grpc::StatusCode::UNAUTHENTICATED)
      << s.error_message();
  const std::string metrics = Scrape(metrics_port_);
  EXPECT_EQ(Unauthenticated(metrics, "wrong_token"), 2) << metrics;
  EXPECT_EQ(Unauthenticated(metrics, "missing_token"), 1) << metrics;

  // Health needs no token (but still the TLS client certificate).
  EXPECT_EQ(Health(Channel(port_, Client(true, ""))), kServing);

  // The scheduler logged the rejections.
  EXPECT_TRUE(absl::StrContains(ReadFile(dir_ + "/log"),
                                "with UNAUTHENTICATED"))
      << ReadFile(dir_ + "/log");
}

TEST_F(RunningSchedulerTest, OversizeMessageIsRejectedAndTheDaemonServesOn) {
  const std::string token = Certs() + "/token";
  auto channel = Channel(port_, Client(true, token), 128 << 20);
  RegisterRequest req;
  req.set_role(WORKER);
  req.set_hostname(std::string(kDefaultMaxMessageBytes + 1024, 'x'));
  RegisterResponse resp;
  grpc::ClientContext ctx;
  ctx.set_deadline(absl::ToChronoTime(absl::Now() + absl::Seconds(30)));
  grpc::Status s = Scheduler::NewStub(channel)->Register(&ctx, req, &resp);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED)
      << s.error_message();
  // Still serving, on the same channel and on a new one.
  s = GetStatus(channel);
  EXPECT_TRUE(s.ok()) << s.error_message();
  EXPECT_EQ(Health(Channel(port_, Client(true, token))), kServing);
  // And nobody was registered by the oversize call.
  grpc::ClientContext ctx2;
  JobStatus status;
  ASSERT_TRUE(Scheduler::NewStub(channel)
                  ->GetStatus(&ctx2, GetStatusRequest(), &status)
                  .ok());
  EXPECT_EQ(status.nodes_size(), 0);
}

TEST_F(RunningSchedulerTest, ServerWithWrongTokenFailsFast) {
  const std::string wrong = dir_ + "/wrong_token";
  WriteFile(wrong, "11111111111111111111111111111111\n");
  const absl::Time start = absl::Now();
  CommandResult r = RunCommand(
      {BinaryPath("server/lmps_server"),
       absl::StrCat("--scheduler=127.0.0.1:", port_), "--listen=127.0.0.1:0",
       "--tls_ca=" + Certs() + "/ca.crt",
       "--tls_cert=" + Certs() + "/server.crt",
       "--tls_key=" + Certs() + "/server.key", "--auth_token_file=" + wrong,
       "--assemble_timeout_s=60"},
      60);
  EXPECT_EQ(r.exit_code, 1) << r.output;
  EXPECT_LT(absl::Now() - start, absl::Seconds(20));
  EXPECT_TRUE(absl::StrContains(r.output, "wrong token")) << r.output;
}

// Bad security flags stop each daemon at start-up with its exit status (2:
// a bad flag or file; 1: serving TLS without a certificate, found when the
// server starts) and a message naming the flag, the path and what is wrong.
TEST(SecurityTest, BadSecurityFlagsStopTheDaemonsAtStartup) {
  struct Case {
    std::string binary;
    std::vector<std::string> flags;
    int exit_code;
    std::string message;
  };
  const std::string dir = TempDir("flags");
  WriteFile(dir + "/short_token", "abc\n");
  const std::vector<Case> cases = {
      {"server/scheduler/lmps_scheduler",
       {"--tls_cert=" + Certs() + "/server.crt"},
       2,
       "[scheduler] error: --tls_cert and --tls_key go together"},
      {"server/scheduler/lmps_scheduler",
       {"--auth_token_file=" + dir + "/missing"},
       2,
       "cannot read the auth token file (--auth_token_file=" + dir +
           "/missing): No such file or directory"},
      {"server/lmps_server",
       {"--scheduler=127.0.0.1:1", "--auth_token_file=" + dir + "/short_token"},
       2,
       "the token has 3 characters; use at least 16"},
      {"worker/lmps_worker",
       {"--scheduler=127.0.0.1:1", "--tls_ca=" + dir + "/missing.crt"},
       2,
       "INVALID_ARGUMENT: cannot read the CA certificate (--tls_ca=" + dir +
           "/missing.crt): No such file or directory"},
      {"server/scheduler/lmps_scheduler",
       {"--listen=127.0.0.1:0", "--tls_ca=" + Certs() + "/ca.crt"},
       1,
       "serving TLS needs this server's certificate and key"},
  };
  for (const Case& c : cases) {
    std::vector<std::string> argv = {BinaryPath(c.binary)};
    for (const std::string& f : c.flags) argv.push_back(f);
    CommandResult r = RunCommand(argv, 30);
    EXPECT_EQ(r.exit_code, c.exit_code) << c.binary << " " << c.flags[0] << "\n" << r.output;
    EXPECT_FALSE(r.timed_out) << c.binary << " " << c.flags[0];
    EXPECT_TRUE(absl::StrContains(r.output, c.message))
        << c.binary << " " << c.flags[0] << "\n" << r.output << "\nwant: " << c.message;
  }
}

}  // namespace
}  // namespace lmps::testing
