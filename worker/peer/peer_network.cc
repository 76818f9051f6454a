#include "worker/peer/peer_network.h"

#include <algorithm>
#include <chrono>
#include <cstring>
#include <optional>
#include <set>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/cleanup/cleanup.h"
#include "common/rpc/status_util.h"
#include "common/shm/payloads.h"
#include "common/wire/chunk_wire.h"
#include "common/wire/raw_call.h"

namespace lmps {
namespace {

const char kSendMethod[] = "/lmps.WorkerPeer/Send";

}  // namespace

absl::StatusOr<std::unique_ptr<PeerNetwork>> PeerNetwork::Create(
    PeerNetworkOptions options, std::vector<PeerInfo> workers,
    PeerMailbox* mailbox, PeerChannelFactory channel_factory) {
  auto bad = [](const std::string& what) {
    return absl::InvalidArgumentError(absl::StrCat("PeerNetwork: ", what));
  };
  if (workers.empty()) return bad("no workers");
  if (options.self_rank < 0 ||
      options.self_rank >= static_cast<int>(workers.size())) {
    return bad(absl::StrCat("self_rank ", options.self_rank, " outside [0, ",
                            workers.size(), ")"));
  }
  std::set<std::string> ids;
  for (size_t r = 0; r < workers.size(); ++r) {
    const std::string& id = workers[r].node_id();
    if (id.empty()) return bad(absl::StrCat("worker rank ", r, " has no id"));
    if (!ids.insert(id).second) {
      return bad(absl::StrCat("node id ", id, " appears twice"));
    }
  }
  if (options.self_id != workers[options.self_rank].node_id()) {
    return bad(absl::StrCat("self_id \"", options.self_id,
                            "\" is not worker rank ", options.self_rank,
                            "'s id \"", workers[options.self_rank].node_id(),
                            "\""));
  }
  if (mailbox == nullptr) return bad("null mailbox");
  if (!channel_factory) return bad("no channel factory");
  if (options.max_message_bytes < 4) {
    return bad(absl::StrCat("max_message_bytes ", options.max_message_bytes,
                            " holds no fp32 value"));
  }
  if (options.timeout <= absl::ZeroDuration()) {
    return bad(absl::StrCat("timeout ", absl::FormatDuration(options.timeout),
                            " is not positive"));
  }
  mailbox->SetSenders(std::vector<std::string>(ids.begin(), ids.end()));
  return std::unique_ptr<PeerNetwork>(
      new PeerNetwork(std::move(options), std::move(workers), mailbox,
                      std::move(channel_factory)));
}

PeerNetwork::PeerNetwork(PeerNetworkOptions options,
                         std::vector<PeerInfo> workers, PeerMailbox* mailbox,
                         PeerChannelFactory channel_factory)
    : options_(std::move(options)),
      workers_(std::move(workers)),
      mailbox_(mailbox),
      channel_factory_(std::move(channel_factory)),
      stubs_(workers_.size()),
      shm_(workers_.size(), options_.shared_memory) {}

PeerNetwork::~PeerNetwork() = default;

std::string PeerNetwork::Describe(int rank) const {
  if (rank < 0 || rank >= num_workers()) {
    return absl::StrCat("worker rank ", rank, " (out of range)");
  }
  const PeerInfo& w = workers_[rank];
  return absl::StrCat(w.node_id(), " (dp ", w.dp_rank(), ", pp ", w.pp_rank(),
                      ", tp ", w.tp_rank(), ") at ", w.address());
}

grpc::GenericStub* PeerNetwork::Stub(int rank) {
  absl::MutexLock lock(&mu_);
  if (stubs_[rank] == nullptr) {
    std::shared_ptr<grpc::Channel> channel =
        channel_factory_(workers_[rank].address());
    if (channel == nullptr) return nullptr;
    stubs_[rank] = std::make_unique<grpc::GenericStub>(std::move(channel));
  }
  return stubs_[rank].get();
}

std::vector<PeerMessageView> PeerNetwork::LocalMessages(
    const TransferKey& key, const float* data, size_t n) const {
  const size_t per_message =
      static_cast<size_t>(options_.max_message_bytes / 4);
  const PeerHeader header = HeaderOf(key, static_cast<int64_t>(n));
  std::vector<PeerMessageView> messages;
  size_t offset = 0;
  do {
    const size_t count = std::min(per_message, n - offset);
    PeerMessageView& m = messages.emplace_back();
    m.header = header;
    m.header.offset = static_cast<int64_t>(offset);
    m.data.Append(absl::string_view(
        reinterpret_cast<const char*>(data + offset), count * 4));
    offset += count;
  } while (offset < n);
  return messages;
}

absl::Status PeerNetwork::SendRemote(int to_rank, const TransferKey& key,
                                     const float* data, size_t n) {
  grpc::GenericStub* stub = Stub(to_rank);
  if (stub == nullptr) {
    return absl::InternalError("the channel factory returned no channel");
  }
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() +
                       absl::ToChronoNanoseconds(options_.timeout));
  PeerHeader header = HeaderOf(key, static_cast<int64_t>(n));
  // Shared memory: the whole transfer in one window, if it fits, named by
  // one message (its payload is not in it).
  WindowPool* windows = SharedWindows(to_rank);
  std::optional<int64_t> window;
  if (windows != nullptr && SharedPayloadSpan(4 * static_cast<int64_t>(n)) <=
                                windows->window_bytes()) {
    window = windows->Acquire();
  }
  const size_t per_message =
      window.has_value()
          ? std::max<size_t>(n, 1)
          : static_cast<size_t>(options_.max_message_bytes / 4);
  absl::Cleanup release = [&] {
    if (window.has_value()) windows->Release(*window);
  };
  if (window.has_value()) {
    header.shm = windows->region().desc().SerializeAsString();
  }
  int64_t shm_at = window.value_or(0);
  // Message k: data[offset, + count) copied once into the slice gRPC sends
  // (or into the window, which the message names), while message k - 1 is
  // being written. An empty transfer is one message.
  size_t offset = 0;
  bool first = true;
  auto next = [&](grpc::ByteBuffer* out) -> absl::StatusOr<bool> {
    if (!first && offset >= n) return false;
    first = false;
    const size_t count = std::min(per_message, n - offset);
    grpc::Slice payload;
    if (window.has_value()) {
      header.shm_offset = shm_at;
      header.shm_bytes = static_cast<int64_t>(count * 4);
      if (count > 0) {
        std::memcpy(windows->region().data() + shm_at, data + offset,
                    count * 4);
      }
      shm_at += SharedPayloadSpan(header.shm_bytes);
    } else {
      payload = NewPayloadSlice(count * 4);
      if (count > 0) {
        std::memcpy(MutableBytes(&payload), data + offset, count * 4);
      }
    }
    header.offset = static_cast<int64_t>(offset);
    *out = SerializePeerMessage(header, payload);
    offset += count;
    return true;
  };
  grpc::ByteBuffer response;
  const absl::Status sent =
      ClientStreamingCall(stub, kSendMethod, &context, next, &response);
  if (window.has_value() && IsSharedMemoryRefusal(sent)) {
    // Refused before anything was stored: the transfer over the socket,
    // and every later one to this peer.
    std::move(release).Invoke();
    if (shm_.Disable(to_rank) && options_.log) {
      options_.log(absl::StrCat(Describe(to_rank),
                                " cannot map this worker's shared memory (",
                                sent.message(), "): sends go through the "
                                "socket"));
    }
    return SendRemote(to_rank, key, data, n);
  }
  LMPS_RETURN_IF_ERROR(sent);
  if (window.has_value()) bytes_shared_ += static_cast<int64_t>(4 * n);
  PeerAck ack;
  LMPS_RETURN_IF_ERROR(ParseProto(response, &ack));
  if (ack.elements() != static_cast<int64_t>(n)) {
    return absl::DataLossError(absl::StrCat(
        "the peer acknowledged ", ack.elements(), " of ", n, " elements"));
  }
  return absl::OkStatus();
}

WindowPool* PeerNetwork::SharedWindows(int rank) {
  // Concurrent sends to one peer: the ring's sends in flight, a pipeline's
  // activations and gradients.
  const int64_t bytes = options_.shared_window_bytes > 0
                            ? options_.shared_window_bytes
                            : (int64_t{8} << 20) + (64 << 10);
  absl::Status failure;
  WindowPool* pool = shm_.Get(rank, 4, bytes, &failure);
  if (!failure.ok() && options_.log) {
    options_.log(absl::StrCat("no shared memory for sends to ",
                              Describe(rank), " (", failure.ToString(), ")"));
  }
  return pool;
}

absl::Status PeerNetwork::Send(int to_rank,
                               const TransferKey& key_without_sender,
                               const float* data, size_t n) {
  TransferKey key = key_without_sender;
  key.sender = options_.self_id;
  auto annotate = [&](const absl::Status& status) {
    return absl::Status(
        status.code(),
        absl::StrCat("sending ", DescribeKey(key), " to ", Describe(to_rank),
                     ": ", absl::StatusCodeToString(status.code()), ": ",
                     status.message()));
  };
  if (to_rank < 0 || to_rank >= num_workers()) {
    return annotate(absl::InvalidArgumentError(absl::StrCat(
        "no such worker rank (the job has ", num_workers(), " workers)")));
  }
  if (data == nullptr && n > 0) {
    return annotate(absl::InvalidArgumentError("null data"));
  }
  absl::Status status;
  if (to_rank == options_.self_rank) {
    status = mailbox_->Deliver(LocalMessages(key, data, n)).status();
  } else {
    status = SendRemote(to_rank, key, data, n);
  }
  if (!status.ok()) return annotate(status);
  bytes_sent_ += static_cast<int64_t>(4 * n);
  return absl::OkStatus();
}

absl::StatusOr<std::vector<float>> PeerNetwork::Receive(
    int from_rank, TransferKey key_without_sender,
    const std::function<absl::Status()>& stop) {
  if (from_rank < 0 || from_rank >= num_workers()) {
    return absl::InvalidArgumentError(
        absl::StrCat("receiving ", DescribeKey(key_without_sender),
                     " from worker rank ", from_rank,
                     ": no such worker rank (the job has ", num_workers(),
                     " workers)"));
  }
  key_without_sender.sender = workers_[from_rank].node_id();
  return mailbox_->Receive(key_without_sender, options_.timeout,
                           Describe(from_rank), stop);
}

}  // namespace lmps
