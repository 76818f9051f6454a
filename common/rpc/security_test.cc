// Transport security: loading and checking the files, the token check on its
// own, and in-process servers made by StartGrpcServer reached through
// MakeChannel: plaintext + token, mutual TLS + token, a client without a
// certificate or with one from another CA, the health exemption, the
// rejection counter, and the message-size limit.
#include "common/rpc/security.h"

#include <stdlib.h>

#include <chrono>
#include <cstdlib>
#include <fstream>
#include <future>
#include <memory>
#include <string>
#include <vector>

#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/grpcpp.h>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "common/rpc/grpc_server.h"
#include "common/rpc/health_check_test_util.h"
#include "common/rpc/metrics.h"
#include "gtest/gtest.h"
#include "proto/lmps.grpc.pb.h"

namespace lmps {
namespace {

std::string TmpDir() {
  const char* dir = std::getenv("TEST_TMPDIR");
  return dir != nullptr ? dir : "/tmp";
}

void WriteFile(const std::string& path, const std::string& text) {
  std::ofstream(path) << text;
}

// Certificates from scripts/make_test_certs.sh: `dir` (the job's CA) and
// `other` (another CA, for a client the job must not trust).
struct Certs {
  std::string dir;
  std::string other;
  std::string token;
};

const Certs& TestCerts() {
  static const Certs* certs = [] {
    auto* c = new Certs;
    c->dir = TmpDir() + "/certs";
    c->other = TmpDir() + "/other_certs";
    for (const std::string& d : {c->dir, c->other}) {
      const std::string cmd =
          absl::StrCat("scripts/make_test_certs.sh ", d, " >/dev/null");
      EXPECT_EQ(std::system(cmd.c_str()), 0) << cmd;
    }
    std::ifstream in(c->dir + "/token");
    std::getline(in, c->token);
    return c;
  }();
  return *certs;
}

SecurityOptions Mtls(const std::string& dir, const std::string& name) {
  SecurityOptions o;
  o.ca_cert = dir + "/ca.crt";
  o.cert = absl::StrCat(dir, "/", name, ".crt");
  o.key = absl::StrCat(dir, "/", name, ".key");
  return o;
}

Security MustLoad(const SecurityOptions& options) {
  absl::StatusOr<Security> s = Security::Load(options);
  EXPECT_TRUE(s.ok()) << s.status();
  return s.ok() ? *s : Security();
}

// ---------------------------------------------------------------- Load

TEST(SecurityLoadTest, DefaultIsPlaintextWithoutToken) {
  Security s = MustLoad({});
  EXPECT_FALSE(s.tls());
  EXPECT_FALSE(s.has_token());
  EXPECT_EQ(s.Describe(), "plaintext, no authentication");
}

TEST(SecurityLoadTest, MutualTlsWithToken) {
  SecurityOptions o = Mtls(TestCerts().dir, "server");
  o.token_file = TestCerts().dir + "/token";
  Security s = MustLoad(o);
  EXPECT_TRUE(s.tls());
  EXPECT_TRUE(s.has_certificate());
  EXPECT_TRUE(s.requires_client_cert());
  EXPECT_EQ(s.token(), TestCerts().token);
  EXPECT_EQ(s.Describe(), "TLS with client certificates (mutual) + token");
}

// Security::Load refuses `o` with InvalidArgument and a message containing
// `needle` (the flag and what to do).
void ExpectLoadError(const SecurityOptions& o, const std::string& needle) {
  absl::StatusOr<Security> s = Security::Load(o);
  ASSERT_FALSE(s.ok()) << "want an error containing: " << needle;
  EXPECT_EQ(s.status().code(), absl::StatusCode::kInvalidArgument) << s.status();
  EXPECT_TRUE(absl::StrContains(s.status().message(), needle))
      << s.status() << "; want: " << needle;
}

TEST(SecurityLoadTest, CertWithoutKeyIsAnError) {
  SecurityOptions o;
  o.cert = TestCerts().dir + "/server.crt";
  ExpectLoadError(o, "--tls_cert and --tls_key go together");
}

TEST(SecurityLoadTest, MissingFileNamesFlagAndPath) {
  SecurityOptions o;
  o.ca_cert = "/nonexistent/ca.crt";
  ExpectLoadError(o, "cannot read the ");
  ExpectLoadError(o, "(--tls_ca=/nonexistent/ca.crt): No such file or directory");
}

TEST(SecurityLoadTest, KeyThatIsNotAKeyIsAnError) {
  SecurityOptions o = Mtls(TestCerts().dir, "server");
  o.key = o.cert;  // a certificate, not a key
  ExpectLoadError(o, "is not a PEM file with a ");
  ExpectLoadError(o, "PRIVATE KEY");
}

TEST(SecurityLoadTest, TokenChecks) {
  const std::string path = TmpDir() + "/token_check";
  SecurityOptions o;
  o.token_file = path;
  WriteFile(path, "  0123456789abcdef0123\n");
  absl::StatusOr<Security> s = Security::Load(o);
  ASSERT_TRUE(s.ok()) << s.status();
  EXPECT_EQ(s->token(), "0123456789abcdef0123");  // whitespace stripped
  EXPECT_EQ(s->Describe(), "plaintext + token (the token travels unencrypted)");

  WriteFile(path, "short\n");
  ExpectLoadError(o, "the token has 5 characters; use at least 16");
  WriteFile(path, "0123456789 abcdef0123\n");
  ExpectLoadError(o, "the token must be printable ASCII without spaces");
  WriteFile(path, "\n");
  ExpectLoadError(o, "is empty");
}

TEST(SecurityLoadTest, ServerNameNeedsTls) {
  SecurityOptions o;
  o.server_name = "lmps";
  ExpectLoadError(o, "--tls_server_name needs TLS");
}

TEST(SecurityLoadTest, ServingTlsNeedsACertificate) {
  SecurityOptions o;
  o.ca_cert = TestCerts().dir + "/ca.crt";
  auto creds = MakeServerCredentials(MustLoad(o), nullptr);
  ASSERT_FALSE(creds.ok());
  EXPECT_EQ(creds.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_TRUE(absl::StrContains(creds.status().message(),
                                "serving TLS needs this server's certificate and key"))
      << creds.status();
}

// ------------------------------------------------------- token check

TEST(TokenEqualsTest, Compares) {
  EXPECT_TRUE(TokenEquals("abc", "abc"));
  EXPECT_FALSE(TokenEquals("abc", "abd"));
  EXPECT_FALSE(TokenEquals("abc", "ab"));
  EXPECT_FALSE(TokenEquals("abc", "abcd"));
  EXPECT_FALSE(TokenEquals("abc", ""));
  EXPECT_TRUE(TokenEquals("", ""));
}

class TokenAuthProcessorTest : public ::testing::Test {
 protected:
  void SetUp() override {
    MetricsOptions mo;
    mo.daemon = "test";
    mo.node_id = "test-0";
    auto m = Metrics::Create(mo);
    ASSERT_TRUE(m.ok()) << m.status();
    metrics_ = std::move(*m);
    TokenAuthProcessor::Options o;
    o.token = "0123456789abcdef";
    o.metrics = metrics_.get();
    o.log = [this](const std::string& line) { log_.push_back(line); };
    processor_ = std::make_unique<TokenAuthProcessor>(o);
  }

  grpc::Status Call(const std::string& path,
                    const std::vector<std::string>& authorization) {
    keep_.clear();
    keep_.push_back(path);
    for (const std::string& a : authorization) keep_.push_back(a);
    grpc::AuthMetadataProcessor::InputMetadata in;
    in.emplace(":path", keep_[0]);
    for (size_t i = 1; i < keep_.size(); ++i) in.emplace("authorization", keep_[i]);
    consumed_.clear();
    grpc::AuthMetadataProcessor::OutputMetadata response;
    return processor_->Process(in, nullptr, &consumed_, &response);
  }

  double Counter(const std::string& reason) {
    auto c = metrics_->Counter("lmps_unauthenticated_total", "",
                               {{"reason", reason}});
    return c.ok() ? (*c)->Value() : -1;
  }

  std::unique_ptr<Metrics> metrics_;
  std::unique_ptr<TokenAuthProcessor> processor_;
  std::vector<std::string> log_;
  std::vector<std::string> keep_;
  grpc::AuthMetadataProcessor::OutputMetadata consumed_;
};

TEST_F(TokenAuthProcessorTest, AcceptsTheTokenAndConsumesIt) {
  grpc::Status s = Call("/lmps.Scheduler/Register", {"Bearer 0123456789abcdef"});
  EXPECT_TRUE(s.ok()) << s.error_message();
  ASSERT_EQ(consumed_.size(), 1u);
  EXPECT_EQ(consumed_.begin()->first, "authorization");
  EXPECT_TRUE(Call("/x/y", {"bearer 0123456789abcdef"}).ok());  // any case
  EXPECT_EQ(processor_->rejected(), 0);
  EXPECT_EQ(Counter("missing_token"), 0);  // exported from the start
  EXPECT_EQ(Counter("wrong_token"), 0);
}

TEST_F(TokenAuthProcessorTest, RejectsMissingAndWrongTokens) {
  grpc::Status s = Call("/lmps.Scheduler/Register", {});
  EXPECT_EQ(s.error_code(), grpc::StatusCode::UNAUTHENTICATED);
  EXPECT_TRUE(absl::StrContains(s.error_message(), "--auth_token_file"));
  for (const std::vector<std::string>& bad : std::vector<std::vector<std::string>>{
           {"Bearer 0123456789abcdeX"},
           {"Bearer 0123456789abcde"},
           {"Bearer 0123456789abcdef0"},
           {"0123456789abcdef"},
           {"Basic 0123456789abcdef"},
           {"Bearer "},
           {"Bearer 0123456789abcdef", "Bearer 0123456789abcdef"}}) {
    s = Call("/lmps.ParameterServer/Push", bad);
    EXPECT_EQ(s.error_code(), grpc::StatusCode::UNAUTHENTICATED) << bad[0];
    EXPECT_TRUE(absl::StrContains(s.error_message(), "wrong token"));
  }
  EXPECT_EQ(processor_->rejected(), 8);
  EXPECT_EQ(Counter("missing_token"), 1);
  EXPECT_EQ(Counter("wrong_token"), 7);
  // One summary line within the log interval, naming the method.
  ASSERT_EQ(log_.size(), 1u);
  EXPECT_TRUE(absl::StrContains(log_[0], "/lmps.Scheduler/Register")) << log_[0];
  EXPECT_TRUE(absl::StrContains(metrics_->Serialize(),
                                "lmps_unauthenticated_total{"));
}

TEST_F(TokenAuthProcessorTest, HealthNeedsNoToken) {
  EXPECT_TRUE(Call("/grpc.health.v1.Health/Check", {}).ok());
  EXPECT_TRUE(Call("/grpc.health.v1.Health/Watch", {"Bearer nope"}).ok());
  // Only the exact service: a look-alike prefix is not exempt.
  EXPECT_FALSE(Call("/grpc.health.v1.HealthX/Check", {}).ok());
  EXPECT_FALSE(Call("/grpc.reflection.v1alpha.ServerReflection/"
                    "ServerReflectionInfo", {}).ok());
}

// ------------------------------------------------ in-process servers

// A Scheduler service whose handlers count their calls.
class FakeScheduler final : public Scheduler::Service {
 public:
  grpc::Status Register(grpc::ServerContext* context, const RegisterRequest*,
                        RegisterResponse* response) override {
    ++calls;
    // The token never reaches the application.
    if (context->client_metadata().count("authorization") != 0) {
      return grpc::Status(grpc::StatusCode::INTERNAL, "token visible");
    }
    response->set_node_id("node");
    return grpc::Status::OK;
  }
  std::atomic<int> calls{0};
};

class SecureServerTest : public ::testing::Test {
 protected:
  void StartServer(const SecurityOptions& options, int max_message_bytes =
                                                        kDefaultMaxMessageBytes) {
    MetricsOptions mo;
    mo.daemon = "test";
    mo.node_id = "test-0";
    auto m = Metrics::Create(mo);
    ASSERT_TRUE(m.ok()) << m.status();
    metrics_ = std::move(*m);
    GrpcServerOptions go;
    go.listen_address = "127.0.0.1:0";
    go.security = MustLoad(options);
    go.metrics = metrics_.get();
    go.max_message_bytes = max_message_bytes;
    go.log = [](const std::string&) {};
    auto started = StartGrpcServer(go, {&service_});
    ASSERT_TRUE(started.ok()) << started.status();
    server_ = std::move(started->server);
    port_ = started->port;
    SetServing(server_.get(), true);
  }

  void TearDown() override {
    if (server_) server_->Shutdown(absl::ToChronoTime(absl::Now() + absl::Seconds(1)));
  }

  grpc::Status Register(const SecurityOptions& client,
                        const std::string& host = "127.0.0.1",
                        const std::string& hostname = "h") {
    auto channel = MakeChannel(absl::StrCat(host, ":", port_), nullptr,
                               MustLoad(client));
    grpc::ClientContext ctx;
    ctx.set_deadline(absl::ToChronoTime(absl::Now() + absl::Seconds(5)));
    RegisterRequest req;
    req.set_hostname(hostname);
    RegisterResponse resp;
    return Scheduler::NewStub(channel)->Register(&ctx, req, &resp);
  }

  // grpc.health.v1.Health/Check for "" through a generic stub; the
  // HealthCheckResponse bytes (08 01 = SERVING) or "error: ...".
  std::string Health(const SecurityOptions& client) {
    return HealthCheckBytes(MakeChannel(absl::StrCat("127.0.0.1:", port_),
                                        nullptr, MustLoad(client)),
                            absl::Seconds(5));
  }

  double Counter(const std::string& reason) {
    auto c = metrics_->Counter("lmps_unauthenticated_total", "",
                               {{"reason", reason}});
    return c.ok() ? (*c)->Value() : -1;
  }

  FakeScheduler service_;
  std::unique_ptr<Metrics> metrics_;
  std::unique_ptr<grpc::Server> server_;
  int port_ = 0;
};

const std::string kServing("\x08\x01", 2);

TEST_F(SecureServerTest, PlaintextWithToken) {
  const std::string token = TestCerts().dir + "/token";
  SecurityOptions server;
  server.token_file = token;
  StartServer(server);

  SecurityOptions good;
  good.token_file = token;
  grpc::Status s = Register(good);
  EXPECT_TRUE(s.ok()) << s.error_message();
  EXPECT_EQ(service_.calls, 1);

  const std::string wrong_file = TmpDir() + "/wrong_token";
  WriteFile(wrong_file, "ffffffffffffffffffffffffffffffff\n");
  SecurityOptions wrong;
  wrong.token_file = wrong_file;
  s = Register(wrong);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::UNAUTHENTICATED) << s.error_message();
  EXPECT_TRUE(absl::StrContains(s.error_message(), "wrong token"));
  s = Register({});
  EXPECT_EQ(s.error_code(), grpc::StatusCode::UNAUTHENTICATED) << s.error_message();
  EXPECT_EQ(service_.calls, 1);  // no handler ran for the rejected calls
  EXPECT_EQ(Counter("wrong_token"), 1);
  EXPECT_EQ(Counter("missing_token"), 1);

  EXPECT_EQ(Health({}), kServing);  // no token needed
  EXPECT_EQ(Counter("missing_token"), 1);
}

TEST_F(SecureServerTest, MutualTlsWithToken) {
  const Certs& certs = TestCerts();
  SecurityOptions server = Mtls(certs.dir, "server");
  server.token_file = certs.dir + "/token";
  StartServer(server);

  SecurityOptions client = Mtls(certs.dir, "client");
  client.token_file = certs.dir + "/token";
  grpc::Status s = Register(client);
  EXPECT_TRUE(s.ok()) << s.error_message();
  s = Register(client, "localhost");  // the other name in the certificate
  EXPECT_TRUE(s.ok()) << s.error_message();
  EXPECT_EQ(service_.calls, 2);

  // A client certificate but no token: rejected and counted.
  SecurityOptions no_token = Mtls(certs.dir, "client");
  s = Register(no_token);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::UNAUTHENTICATED) << s.error_message();
  EXPECT_EQ(Counter("missing_token"), 1);
  // ... but the health service answers it.
  EXPECT_EQ(Health(no_token), kServing);

  // The token but no client certificate: refused by the TLS handshake.
  SecurityOptions no_cert;
  no_cert.ca_cert = certs.dir + "/ca.crt";
  no_cert.token_file = certs.dir + "/token";
  s = Register(no_cert);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::UNAVAILABLE) << s.error_message();
  EXPECT_TRUE(absl::StartsWith(Health(no_cert), "error:"));

  // A certificate from another CA: refused by the TLS handshake.
  SecurityOptions other = Mtls(certs.other, "client");
  other.ca_cert = certs.dir + "/ca.crt";
  other.token_file = certs.dir + "/token";
  s = Register(other);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::UNAVAILABLE) << s.error_message();

  // Plaintext against TLS: no connection.
  SecurityOptions plaintext;
  plaintext.token_file = certs.dir + "/token";
  s = Register(plaintext);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::UNAVAILABLE) << s.error_message();

  // A client that does not trust the server's CA refuses the server.
  SecurityOptions distrust = Mtls(certs.dir, "client");
  distrust.ca_cert = certs.other + "/ca.crt";
  distrust.token_file = certs.dir + "/token";
  s = Register(distrust);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::UNAVAILABLE) << s.error_message();

  EXPECT_EQ(service_.calls, 2);
}

TEST_F(SecureServerTest, ServerNameIsVerified) {
  const Certs& certs = TestCerts();
  StartServer(Mtls(certs.dir, "server"));
  SecurityOptions client = Mtls(certs.dir, "client");
  client.server_name = "localhost";  // in the certificate
  EXPECT_TRUE(Register(client).ok());
  client.server_name = "not-in-the-certificate.example";
  EXPECT_EQ(Register(client).error_code(), grpc::StatusCode::UNAVAILABLE);
}

TEST_F(SecureServerTest, ClientCertificateOptional) {
  const Certs& certs = TestCerts();
  SecurityOptions server = Mtls(certs.dir, "server");
  server.require_client_cert = false;
  server.token_file = certs.dir + "/token";
  StartServer(server);
  SecurityOptions no_cert;
  no_cert.ca_cert = certs.dir + "/ca.crt";
  no_cert.token_file = certs.dir + "/token";
  grpc::Status s = Register(no_cert);
  EXPECT_TRUE(s.ok()) << s.error_message();
  // A presented certificate must still verify.
  SecurityOptions other = Mtls(certs.other, "client");
  other.ca_cert = certs.dir + "/ca.crt";
  other.token_file = certs.dir + "/token";
  EXPECT_EQ(Register(other).error_code(), grpc::StatusCode::UNAVAILABLE);
}

TEST_F(SecureServerTest, OversizeMessageIsRejectedAndServerKeepsServing) {
  const Certs& certs = TestCerts();
  SecurityOptions server = Mtls(certs.dir, "server");
  server.token_file = certs.dir + "/token";
  StartServer(server, /*max_message_bytes=*/1 << 20);
  SecurityOptions client = Mtls(certs.dir, "client");
  client.token_file = certs.dir + "/token";
  grpc::Status s = Register(client, "127.0.0.1", std::string(2 << 20, 'x'));
  EXPECT_EQ(s.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED)
      << s.error_message();
  EXPECT_EQ(service_.calls, 0);
  s = Register(client, "127.0.0.1", std::string((1 << 20) - 100, 'x'));
  EXPECT_TRUE(s.ok()) << s.error_message();
  EXPECT_EQ(service_.calls, 1);
  EXPECT_EQ(Health(client), kServing);
}

}  // namespace
}  // namespace lmps
