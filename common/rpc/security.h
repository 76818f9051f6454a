// Transport security of the lmps daemons: optional TLS on every gRPC server
// and channel (mutual, with client certificates, when a CA is given) and an
// optional shared bearer token checked on every RPC. Plaintext without a
// token stays the default.
//
// Every main() turns its flags (common/rpc/security_flags.h: --tls_ca,
// --tls_cert, --tls_key, --tls_require_client_cert, --tls_server_name,
// --auth_token_file) into SecurityOptions and loads them once with
// Security::Load, which reads and checks every file, so a missing file or a
// malformed token is an error at startup naming the flag and the path. The
// loaded Security is a small value passed down in the options structs
// (GrpcServerOptions, DaemonOptions) and to MakeChannel (common/rpc/grpc_server.h),
// which build the credentials from it with the functions below.
//
// What is enforced:
//   TLS           a process with a certificate serves TLS; one with TLS
//                 material connects with TLS, verifying the server's
//                 certificate against ca_cert (the system's roots when
//                 empty) and the host of the address (or server_name).
//   client certs  a server given ca_cert (and require_client_cert, the
//                 default) refuses, during the TLS handshake, every client
//                 that does not present a certificate signed by ca_cert
//                 (GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY).
//                 gRPC (1.51) offers no hook for failed handshakes, so these
//                 refusals are not counted in lmps_unauthenticated_total;
//                 gRPC logs each one ("Handshake failed ... peer did not
//                 return a certificate") and the client sees UNAVAILABLE.
//                 Any certificate signed by the CA is accepted: the CA is
//                 the job's identity (make one per job, or per trust domain).
//   token         with a token, clients send `authorization: Bearer <token>`
//                 on every call; servers reject a call whose token is
//                 missing or wrong with UNAUTHENTICATED before any handler
//                 runs (a grpc::AuthMetadataProcessor, TokenAuthProcessor),
//                 and count it in lmps_unauthenticated_total{reason}. The
//                 health service (grpc.health.v1.Health) is exempt so that
//                 probes need no secret: it reveals only SERVING/NOT_SERVING.
//                 The token is removed from the call's metadata before the
//                 application sees it. Without TLS the token travels in
//                 cleartext (it then only keeps nodes of other jobs out, not
//                 an eavesdropper); Describe() says so and the daemons log
//                 it.
// Kubernetes' built-in gRPC probes speak plaintext only: with TLS on, probe
// the servers with an exec probe (e.g. grpc_health_probe -tls ...) or a TCP
// probe instead.
//
// Thread-safety: Security is an immutable value after Load; its methods and
// the functions here are thread-safe. TokenAuthProcessor::Process is called
// concurrently by gRPC and is thread-safe.
#ifndef LMPS_COMMON_RPC_SECURITY_H_
#define LMPS_COMMON_RPC_SECURITY_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include <grpcpp/security/auth_metadata_processor.h>
#include <grpcpp/security/credentials.h>
#include <grpcpp/security/server_credentials.h>
#include <grpcpp/support/client_interceptor.h>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"

namespace prometheus {
class Counter;
}  // namespace prometheus

namespace lmps {

class Metrics;

// File paths (PEM) and switches, one per flag; every field empty: plaintext,
// no token.
struct SecurityOptions {
  // --tls_ca: the CA certificate(s) that sign the job's certificates.
  // Servers verify client certificates against it; clients verify servers'.
  std::string ca_cert;
  // --tls_cert / --tls_key: this process's certificate chain and private
  // key. Required to serve TLS; presented to servers as the client
  // certificate. Given together or not at all.
  std::string cert;
  std::string key;
  // --tls_require_client_cert: servers with ca_cert refuse clients without
  // a valid certificate (true), or accept them and verify only certificates
  // that are presented (false; then the token is the only check).
  bool require_client_cert = true;
  // --tls_server_name: clients expect this name in servers' certificates
  // instead of the host of the address they dial (useful when nodes are
  // reached by IP address and all carry a certificate for one name).
  std::string server_name;
  // --auth_token_file: a file holding the shared token (surrounding
  // whitespace is ignored; at least 16 printable ASCII characters without
  // spaces, e.g. `openssl rand -hex 32`).
  std::string token_file;
};

// Loaded security material. Default-constructed: plaintext, no token.
class Security {
 public:
  Security() = default;

  // Reads and checks every file named in `options`. InvalidArgument naming
  // the flag and the path for an unreadable or malformed file, a cert
  // without its key (or the reverse), or a bad token.
  static absl::StatusOr<Security> Load(const SecurityOptions& options);

  // Any TLS material given: servers serve TLS (they need cert and key),
  // channels use TLS.
  bool tls() const { return tls_; }
  // This process has a certificate and key (can serve TLS, and presents a
  // client certificate).
  bool has_certificate() const { return !cert_pem_.empty(); }
  // Servers demand a client certificate signed by the CA.
  bool requires_client_cert() const {
    return !ca_pem_.empty() && require_client_cert_;
  }
  bool has_token() const { return !token_.empty(); }
  const std::string& token() const { return token_; }
  const std::string& server_name() const { return server_name_; }

  // One line for logs, e.g. "TLS with client certificates + token" or
  // "plaintext + token (the token travels unencrypted)".
  std::string Describe() const;

 private:
  friend absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>>
  MakeServerCredentials(const Security& security,
                        std::shared_ptr<grpc::AuthMetadataProcessor> processor);
  friend std::shared_ptr<grpc::ChannelCredentials> MakeChannelCredentials(
      const Security& security);

  bool tls_ = false;
  bool require_client_cert_ = true;
  std::string ca_pem_;
  std::string cert_pem_;
  std::string key_pem_;
  std::string server_name_;
  std::string token_;
};

// Server credentials for `security`: TLS (client certificates requested and
// verified as documented above) or plaintext, with `processor` (may be null)
// run on every call before its handler. FailedPrecondition if TLS is on but
// there is no certificate and key to serve with.
absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> MakeServerCredentials(
    const Security& security,
    std::shared_ptr<grpc::AuthMetadataProcessor> processor);

// Channel credentials for `security`: TLS with the CA as roots and this
// process's certificate as client certificate, or plaintext. (The server
// name override is a channel argument: see MakeChannel.)
std::shared_ptr<grpc::ChannelCredentials> MakeChannelCredentials(
    const Security& security);

// A client interceptor adding `authorization: Bearer <token>` to every call.
std::unique_ptr<grpc::experimental::ClientInterceptorFactoryInterface>
MakeTokenInterceptorFactory(const std::string& token);

// The method path prefix exempt from the token check.
inline constexpr absl::string_view kHealthServicePrefix =
    "/grpc.health.v1.Health/";

// The server side of the token check. Accepts a call whose metadata holds
// exactly one `authorization` entry "Bearer <token>" (scheme
// case-insensitive) with the expected token (compared in constant time),
// and every call to the health service; rejects the others with
// UNAUTHENTICATED, counts them in lmps_unauthenticated_total{reason=
// "missing_token"|"wrong_token"} when `metrics` is given, and logs a summary
// at most once per `log_interval`. Consumes the authorization entry.
class TokenAuthProcessor : public grpc::AuthMetadataProcessor {
 public:
  struct Options {
    std::string token;          // must not be empty
    Metrics* metrics = nullptr;  // not owned; must outlive the processor
    // Receives the rejection summaries; empty: stderr.
    std::function<void(const std::string&)> log;
    absl::Duration log_interval = absl::Seconds(10);
  };

  explicit TokenAuthProcessor(Options options);

  // Runs inline on gRPC's thread: a comparison and a counter increment.
  bool IsBlocking() const override { return false; }

  // `context` may be null (plaintext servers); it is not used.
  grpc::Status Process(const InputMetadata& auth_metadata,
                       grpc::AuthContext* context,
                       OutputMetadata* consumed_auth_metadata,
                       OutputMetadata* response_metadata) override;

  // Calls rejected so far (also without metrics).
  int64_t rejected() const;

 private:
  void Reject(absl::string_view reason, absl::string_view method);

  const Options options_;
  prometheus::Counter* missing_ = nullptr;
  prometheus::Counter* wrong_ = nullptr;

  mutable absl::Mutex mu_;
  int64_t rejected_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t unlogged_ ABSL_GUARDED_BY(mu_) = 0;
  absl::Time last_log_ ABSL_GUARDED_BY(mu_) = absl::InfinitePast();
};

// Constant-time (in the length of `expected`) string comparison.
bool TokenEquals(absl::string_view expected, absl::string_view given);

}  // namespace lmps

#endif  // LMPS_COMMON_RPC_SECURITY_H_
