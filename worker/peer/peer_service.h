// WorkerPeerService: the gRPC adapter (callback API) of one worker's
// PeerMailbox. It holds no logic of its own:
//
//   Send   ServerReadReactor over raw byte buffers (gRPC's raw callback
//          method; PeerMessage's wire format, read in place by
//          common/wire/chunk_wire.h): collects the client stream (at most
//          max_stream_bytes serialized bytes in total, else
//          RESOURCE_EXHAUSTED without touching the mailbox), then
//          PeerMailbox::Deliver, and finishes with its status converted
//          (common/rpc/status_util.h); PeerAck.elements on success.
//
// A malformed stream fails that call only (INVALID_ARGUMENT); the service
// keeps serving. Deliver never waits for the receiver, so the reactor runs
// it on gRPC's callback thread.
//
// Thread-safety: thread-safe. Shutdown order: PeerMailbox::Shutdown(),
// grpc::Server::Shutdown(), then destroy this service, then the mailbox.
#ifndef LMPS_WORKER_PEER_PEER_SERVICE_H_
#define LMPS_WORKER_PEER_PEER_SERVICE_H_

#include <grpcpp/grpcpp.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "common/shm/shared_region.h"
#include "proto/lmps.grpc.pb.h"
#include "worker/peer/mailbox.h"

namespace lmps {

struct WorkerPeerServiceOptions {
  // Cap on the serialized bytes of one Send stream.
  int64_t max_stream_bytes = int64_t{1} << 30;
  // Receives a line for every refused stream; empty: nothing is logged.
  std::function<void(const std::string&)> log;
  // Map the shared-memory regions of senders on this host whose payloads
  // lie there (PeerMessage.shm); false: refuse them (the senders fall back
  // to the socket).
  bool shared_memory = true;
};

class WorkerPeerService final
    : public WorkerPeer::WithRawCallbackMethod_Send<
          WorkerPeer::CallbackService> {
 public:
  // `mailbox` is not owned and must outlive the service. InvalidArgument
  // when it is null or max_stream_bytes <= 0.
  static absl::StatusOr<std::unique_ptr<WorkerPeerService>> Create(
      PeerMailbox* mailbox, WorkerPeerServiceOptions options);

  // The stream's messages are serialized PeerMessages, `response` a
  // serialized PeerAck.
  grpc::ServerReadReactor<grpc::ByteBuffer>* Send(
      grpc::CallbackServerContext* context,
      grpc::ByteBuffer* response) override;

 private:
  class SendReactor;

  WorkerPeerService(PeerMailbox* mailbox, WorkerPeerServiceOptions options);
  void Log(const std::string& line) const;

  PeerMailbox* const mailbox_;
  const WorkerPeerServiceOptions options_;
  // Senders' shared-memory regions (thread-safe).
  mutable RegionCache regions_;
};

}  // namespace lmps

#endif  // LMPS_WORKER_PEER_PEER_SERVICE_H_
