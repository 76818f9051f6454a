// PeerEndpoint: a worker's WorkerPeer service (worker/peer/peer_service.h)
// on its own gRPC server, where its pipeline and tensor-parallel peers send
// activations, their gradients and all-reduce parts; received transfers
// wait in its mailbox.
//
// Start() never fails for want of a port: a data-parallel job does not need
// the service, so when the server cannot start it warns through `warn` and
// returns an endpoint with a mailbox and an empty address (the scheduler
// refuses a worker without an address in a pipeline or tensor-parallel
// job). It fails only when the mailbox, the service or the peer security
// cannot be made. The destructor shuts the mailbox down first (ending every
// wait) and then the server, with a 2 s grace, in the order
// peer_service.h asks for.
//
// Thread-safety: the accessors are thread-safe; the mailbox is.
#ifndef LMPS_WORKER_PEER_PEER_ENDPOINT_H_
#define LMPS_WORKER_PEER_PEER_ENDPOINT_H_

#include <functional>
#include <memory>
#include <optional>
#include <string>

#include "absl/status/statusor.h"
#include "common/rpc/metrics.h"
#include "common/rpc/security.h"
#include "grpcpp/grpcpp.h"
#include "worker/peer/mailbox.h"
#include "worker/peer/peer_service.h"

namespace lmps {

struct PeerEndpointOptions {
  std::string listen = "0.0.0.0:0";  // port 0: any
  std::string advertise_host = "127.0.0.1";
  Security security;  // the worker's own
  // When set, replaces `security` for this service (another certificate).
  std::optional<SecurityOptions> peer_security;
  Metrics* metrics = nullptr;     // not owned; may be null
  RpcMetrics* rpc = nullptr;      // not owned; may be null
  std::function<void(const std::string&)> warn;  // may be empty
};

class PeerEndpoint {
 public:
  static absl::StatusOr<std::unique_ptr<PeerEndpoint>> Start(
      const PeerEndpointOptions& options);
  ~PeerEndpoint();

  PeerMailbox* mailbox() const { return mailbox_.get(); }
  // "host:port" for peers; empty when the service could not start.
  const std::string& address() const { return address_; }

 private:
  PeerEndpoint() = default;

  std::unique_ptr<PeerMailbox> mailbox_;
  std::unique_ptr<WorkerPeerService> service_;
  std::unique_ptr<grpc::Server> server_;
  std::string address_;
};

}  // namespace lmps

#endif  // LMPS_WORKER_PEER_PEER_ENDPOINT_H_
