#include "worker/peer/peer_endpoint.h"

#include <chrono>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/rpc/grpc_server.h"
#include "common/rpc/status_util.h"

namespace lmps {

absl::StatusOr<std::unique_ptr<PeerEndpoint>> PeerEndpoint::Start(
    const PeerEndpointOptions& options) {
  auto peer = std::unique_ptr<PeerEndpoint>(new PeerEndpoint);
  LMPS_ASSIGN_OR_RETURN(peer->mailbox_,
                        PeerMailbox::Create(PeerMailboxOptions()));
  LMPS_ASSIGN_OR_RETURN(
      peer->service_, WorkerPeerService::Create(peer->mailbox_.get(),
                                                WorkerPeerServiceOptions()));
  GrpcServerOptions server_options;
  server_options.listen_address = options.listen;
  server_options.rpc_metrics = options.rpc;
  server_options.security = options.security;
  if (options.peer_security.has_value()) {
    LMPS_ASSIGN_OR_RETURN(server_options.security,
                          Security::Load(*options.peer_security));
  }
  server_options.metrics = options.metrics;
  absl::StatusOr<StartedServer> started =
      StartGrpcServer(server_options, {peer->service_.get()});
  if (!started.ok()) {
    if (options.warn) {
      options.warn(absl::StrCat(
          "warning: no WorkerPeer service (pipeline and tensor-parallel jobs "
          "need it): ",
          started.status().ToString()));
    }
    return peer;
  }
  peer->server_ = std::move(started->server);
  SetServing(peer->server_.get(), true);
  peer->address_ = absl::StrCat(options.advertise_host, ":", started->port);
  return peer;
}

PeerEndpoint::~PeerEndpoint() {
  if (mailbox_ != nullptr) mailbox_->Shutdown();
  if (server_ != nullptr) {
    server_->Shutdown(std::chrono::system_clock::now() +
                      std::chrono::seconds(2));
  }
}

}  // namespace lmps
