// Starting a gRPC server the way every lmps daemon does: the given services,
// the standard health service (grpc.health.v1) and server reflection (so
// grpcurl works), message-size limits, transport security (TLS, client
// certificates and the shared token: common/rpc/security.h), and the port
// actually bound. And the matching client channels.
//
// Message-size limits: a server refuses a received message larger than
// max_message_bytes with RESOURCE_EXHAUSTED ("Received message larger than
// max") before any handler sees it, and keeps serving; it also refuses to
// send a larger one. Channels apply the same limits on their side.
//
// Thread-safety: StartGrpcServer may be called from any thread; the returned
// server is gRPC's (thread-safe).
#ifndef LMPS_COMMON_RPC_GRPC_SERVER_H_
#define LMPS_COMMON_RPC_GRPC_SERVER_H_

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include <grpcpp/grpcpp.h>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "common/rpc/security.h"

namespace lmps {

class Metrics;
class RpcMetrics;

// Default message-size limit of servers and channels.
inline constexpr int kDefaultMaxMessageBytes = 64 << 20;

struct GrpcServerOptions {
  std::string listen_address = "0.0.0.0:0";  // port 0: pick a free port
  int max_message_bytes = kDefaultMaxMessageBytes;  // receive and send limit
  RpcMetrics* rpc_metrics = nullptr;  // records every RPC when set
  // TLS and the token check; default: plaintext, every call accepted.
  Security security;
  // Where lmps_unauthenticated_total is counted when the token check is on
  // (not owned; may be null; must outlive the server).
  Metrics* metrics = nullptr;
  // Receives security events (summaries of rejected calls, at most one line
  // per 10 s); empty: stderr.
  std::function<void(const std::string&)> log;
  // The shortest interval between a client's keepalive pings that the
  // server accepts while it sends no data (gRPC's default, 5 minutes, makes
  // a server answer lmps clients' 10 s keepalive pings during a long wait,
  // e.g. a pull waiting for the next version, with GOAWAY "too_many_pings",
  // which fails the waiting call). Pings without any call are allowed too.
  absl::Duration min_client_ping_interval = absl::Seconds(5);
};

struct StartedServer {
  std::unique_ptr<grpc::Server> server;
  int port = 0;  // the bound port
};

// Builds and starts a server hosting `services` plus health and reflection.
// The health service starts NOT_SERVING for "" until the caller sets it.
// Errors: FailedPrecondition for TLS without a certificate to serve;
// Unavailable when the address cannot be bound.
absl::StatusOr<StartedServer> StartGrpcServer(
    const GrpcServerOptions& options, const std::vector<grpc::Service*>& services);

// Sets the overall ("") health of `server`.
void SetServing(grpc::Server* server, bool serving);

// Channel arguments every lmps client uses (message size limits, keepalive).
grpc::ChannelArguments ClientChannelArgs(
    int max_message_bytes = kDefaultMaxMessageBytes);

// Channel to `address` with ClientChannelArgs(), secured by `security` (TLS
// with this process's certificate, the expected server name, the token on
// every call; the default is plaintext without a token). Every RPC on it is
// recorded in `rpc_metrics` when set.
std::shared_ptr<grpc::Channel> MakeChannel(const std::string& address,
                                           RpcMetrics* rpc_metrics = nullptr,
                                           const Security& security = {});

}  // namespace lmps

#endif  // LMPS_COMMON_RPC_GRPC_SERVER_H_
