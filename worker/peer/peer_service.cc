#include "worker/peer/peer_service.h"

#include <utility>
#include <vector>

#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "common/rpc/status_util.h"
#include "common/shm/payloads.h"
#include "common/wire/chunk_wire.h"

namespace lmps {

// Reads the whole stream, then delivers it to the mailbox, which copies each
// payload from gRPC's buffers into its transfer (the messages are read in
// place: common/wire/chunk_wire.h).
class WorkerPeerService::SendReactor
    : public grpc::ServerReadReactor<grpc::ByteBuffer> {
 public:
  SendReactor(const WorkerPeerService* service,
              grpc::CallbackServerContext* context,
              grpc::ByteBuffer* response)
      : service_(service), context_(context), response_(response) {
    StartRead(&incoming_);
  }

  void OnReadDone(bool ok) override {
    if (!ok) {  // the client closed its side (or the call broke)
      if (context_->IsCancelled()) {
        Finish(grpc::Status(grpc::StatusCode::CANCELLED,
                            "peer send cancelled before the end of the "
                            "stream; nothing was stored"));
        return;
      }
      Deliver();
      return;
    }
    bytes_ += static_cast<int64_t>(incoming_.Length());
    PeerMessageView message;
    absl::Status parsed = ParsePeerMessage(incoming_, &message);
    if (parsed.ok()) parsed = AttachShared(&message);
    if (!parsed.ok()) {
      service_->Log(absl::StrCat("peer send from ", context_->peer(),
                                 " refused: ", parsed.ToString()));
      Finish(ToGrpcStatus(parsed));
      return;
    }
    if (bytes_ > service_->options_.max_stream_bytes) {
      // A hostile client may send a sender id of megabytes: cut it.
      const std::string& sender = message.header.sender;
      const std::string shown =
          sender.size() <= 64
              ? absl::CHexEscape(sender)
              : absl::StrCat(absl::CHexEscape(sender.substr(0, 64)), "...");
      const std::string msg = absl::StrCat(
          "peer stream from ", shown, " (", context_->peer(),
          ") exceeds ", service_->options_.max_stream_bytes,
          " bytes; nothing was stored");
      service_->Log(msg);
      Finish(ToGrpcStatus(absl::ResourceExhaustedError(msg)));
      return;
    }
    stream_.push_back(std::move(message));
    incoming_ = grpc::ByteBuffer();
    StartRead(&incoming_);
  }

  void OnDone() override { delete this; }

 private:
  // A payload in the sender's shared memory (PeerMessage.shm): the
  // message's data points at it, the region stays mapped until delivered.
  absl::Status AttachShared(PeerMessageView* message) {
    PeerHeader& h = message->header;
    if (h.shm_bytes <= 0) return absl::OkStatus();
    if (!message->data.empty() || h.shm.empty()) {
      return absl::InvalidArgumentError(
          "a peer message names shared memory but has its payload inline "
          "or names no region");
    }
    if (!service_->options_.shared_memory) {
      return SharedMemoryRefusal("this worker maps no peer memory");
    }
    SharedRegionDesc desc;
    if (!desc.ParseFromString(h.shm)) {
      return absl::InvalidArgumentError(
          "a peer message names a malformed shm region");
    }
    absl::StatusOr<std::shared_ptr<const SharedRegion>> region =
        service_->regions_.Get(desc);
    if (!region.ok()) return region.status();
    LMPS_RETURN_IF_ERROR(
        AttachSharedBytes(**region, h.shm_offset, h.shm_bytes, &message->data));
    bytes_ += h.shm_bytes;
    held_.push_back(*std::move(region));
    return absl::OkStatus();
  }

  void Deliver() {
    absl::StatusOr<int64_t> result = service_->mailbox_->Deliver(stream_);
    stream_.clear();
    stream_.shrink_to_fit();
    held_.clear();
    if (result.ok()) {
      PeerAck ack;
      ack.set_elements(*result);
      *response_ = SerializeProto(ack);
    } else {
      service_->Log(absl::StrCat("peer send from ", context_->peer(),
                                 " refused: ", result.status().ToString()));
    }
    Finish(ToGrpcStatus(result.status()));
  }

  const WorkerPeerService* const service_;
  grpc::CallbackServerContext* const context_;
  grpc::ByteBuffer* const response_;
  int64_t bytes_ = 0;
  grpc::ByteBuffer incoming_;
  std::vector<PeerMessageView> stream_;
  std::vector<std::shared_ptr<const SharedRegion>> held_;
};

absl::StatusOr<std::unique_ptr<WorkerPeerService>> WorkerPeerService::Create(
    PeerMailbox* mailbox, WorkerPeerServiceOptions options) {
  if (mailbox == nullptr) {
    return absl::InvalidArgumentError("WorkerPeerService: null mailbox");
  }
  if (options.max_stream_bytes <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("WorkerPeerService: max_stream_bytes must be positive, "
                     "got ",
                     options.max_stream_bytes));
  }
  return std::unique_ptr<WorkerPeerService>(
      new WorkerPeerService(mailbox, std::move(options)));
}

WorkerPeerService::WorkerPeerService(PeerMailbox* mailbox,
                                     WorkerPeerServiceOptions options)
    : mailbox_(mailbox), options_(std::move(options)) {}

void WorkerPeerService::Log(const std::string& line) const {
  if (options_.log) options_.log(line);
}

grpc::ServerReadReactor<grpc::ByteBuffer>* WorkerPeerService::Send(
    grpc::CallbackServerContext* context, grpc::ByteBuffer* response) {
  return new SendReactor(this, context, response);
}

}  // namespace lmps
