// Starting a gRPC server the way every lmps daemon does: the given services,
// the standard health service (grpc.health.v1) and server reflection (so
// grpcurl works), message-size limits, and the port actually bound.
//
// Thread-safety: StartGrpcServer may be called from any thread; the returned
// server is gRPC's (thread-safe).
#ifndef LMPS_COMMON_GRPC_SERVER_H_
#define LMPS_COMMON_GRPC_SERVER_H_

#include <memory>
#include <string>
#include <vector>

#include <grpcpp/grpcpp.h>

#include "absl/status/statusor.h"

namespace lmps {

class RpcMetrics;

struct GrpcServerOptions {
  std::string listen_address = "0.0.0.0:0";  // port 0: pick a free port
  int max_message_bytes = 64 << 20;           // receive and send limit
  RpcMetrics* rpc_metrics = nullptr;  // records every RPC when set
};

struct StartedServer {
  std::unique_ptr<grpc::Server> server;
  int port = 0;  // the bound port
};

// Builds and starts a server hosting `services` plus health and reflection.
// The health service starts NOT_SERVING for "" until the caller sets it.
absl::StatusOr<StartedServer> StartGrpcServer(
    const GrpcServerOptions& options, const std::vector<grpc::Service*>& services);

// Sets the overall ("") health of `server`.
void SetServing(grpc::Server* server, bool serving);

// Channel arguments every lmps client uses (message size limits, keepalive).
grpc::ChannelArguments ClientChannelArgs(int max_message_bytes = 64 << 20);

// Insecure channel to `address` with ClientChannelArgs(); every RPC on it is
// recorded in `rpc_metrics` when set.
std::shared_ptr<grpc::Channel> MakeChannel(const std::string& address,
                                           RpcMetrics* rpc_metrics = nullptr);

}  // namespace lmps

#endif  // LMPS_COMMON_GRPC_SERVER_H_
