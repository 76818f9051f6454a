// PeerNetwork: one worker's view of the other workers of the job, for the
// point-to-point transfers of pipeline and tensor parallelism.
//
//   Send(to, key, data, n)   streams data[0..n) to worker `to` as
//                            PeerMessages of at most max_message_bytes of
//                            payload in one client-streaming WorkerPeer.Send
//                            call (deadline: options.timeout), tagged with
//                            `key` and sender = self_id. Returns once the
//                            receiver's mailbox stored the whole transfer
//                            (it never waits for the receiver to claim it),
//                            so sending before receiving cannot deadlock.
//                            A send to this worker itself goes straight to
//                            the local mailbox.
//   Receive(from, key)       waits (at most options.timeout) for the
//                            transfer `key` from worker `from` in the local
//                            mailbox and returns it; with `stop`, returns
//                            early with stop()'s status once it is not OK
//                            (PeerMailbox::Receive; WakeReceivers makes
//                            waiting receives check it).
//
// Errors name the peer and keep the code: "sending ACTIVATION of step 3
// micro-batch 1 to worker-2 (dp 0, pp 1, tp 0) at 127.0.0.1:4567:
// UNAVAILABLE: ..."; "timed out after 60s waiting for ... from worker-2
// (...) at ... (nothing arrived)". Nothing is retried.
//
// Stubs are created lazily (first send to a peer) and cached.
//
// Thread-safety: thread-safe; sends and receives may run concurrently on
// several threads.
#ifndef LMPS_WORKER_PEER_PEER_NETWORK_H_
#define LMPS_WORKER_PEER_PEER_NETWORK_H_

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include <grpcpp/channel.h>
#include <grpcpp/generic/generic_stub.h>

#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "common/shm/shared_region.h"
#include "proto/lmps.grpc.pb.h"
#include "worker/peer/mailbox.h"

namespace lmps {

struct PeerNetworkOptions {
  std::string self_id;  // this worker's node id (= workers[self_rank])
  int self_rank = 0;    // this worker's rank
  int64_t max_message_bytes = 4 << 20;  // payload per PeerMessage
  absl::Duration timeout = absl::Seconds(60);  // per send and per receive
  // JobSpec.shared_memory AUTO: a transfer that fits a window (8 MiB: a
  // ring piece) goes through a shared-memory region per peer
  // (docs/parameter-shard.md, same-host payloads) when the peer can map
  // it, else through the socket; false: always the socket.
  bool shared_memory = false;
  int64_t shared_window_bytes = 0;  // 0: 8 MiB plus alignment
  // A line for the worker's log (the fall-back to the socket); may be empty.
  std::function<void(const std::string&)> log;
};

// Makes the channel to the WorkerPeer service at `address`. Sends are raw
// (common/wire/chunk_wire.h: the payload encoded once into the slice gRPC
// sends; PeerMessage's wire format, unchanged).
using PeerChannelFactory = std::function<std::shared_ptr<grpc::Channel>(
    const std::string& address)>;

class PeerNetwork {
 public:
  // `workers[r]` is worker rank r. `mailbox` (not owned) is this worker's,
  // served by its WorkerPeerService; it must outlive the network. From
  // now on it accepts transfers only from these workers
  // (PeerMailbox::SetSenders).
  // InvalidArgument for: no workers, self_rank out of range, self_id not
  // workers[self_rank].node_id, an empty or repeated node id, a null
  // mailbox or channel_factory, max_message_bytes < 4, timeout <= 0.
  static absl::StatusOr<std::unique_ptr<PeerNetwork>> Create(
      PeerNetworkOptions options, std::vector<PeerInfo> workers,
      PeerMailbox* mailbox, PeerChannelFactory channel_factory);

  PeerNetwork(const PeerNetwork&) = delete;
  PeerNetwork& operator=(const PeerNetwork&) = delete;
  ~PeerNetwork();

  // `key_without_sender.sender` is ignored (self_id is sent).
  // InvalidArgument for a rank out of range or data == nullptr with n > 0.
  absl::Status Send(int to_rank, const TransferKey& key_without_sender,
                    const float* data, size_t n);
  // `key_without_sender.sender` is set to workers[from_rank].node_id.
  absl::StatusOr<std::vector<float>> Receive(
      int from_rank, TransferKey key_without_sender,
      const std::function<absl::Status()>& stop = nullptr);
  void WakeReceivers() { mailbox_->WakeReceivers(); }
  // Hands a received buffer back for reuse (PeerMailbox::Recycle).
  void Recycle(std::vector<float> buffer) {
    mailbox_->Recycle(std::move(buffer));
  }

  // "worker-2 (dp 0, pp 1, tp 0) at 127.0.0.1:4567"; "worker rank 7 (out
  // of range)" for a bad rank.
  std::string Describe(int rank) const;

  int self_rank() const { return options_.self_rank; }
  const std::string& self_id() const { return options_.self_id; }
  int num_workers() const { return static_cast<int>(workers_.size()); }
  const PeerInfo& worker(int rank) const { return workers_[rank]; }
  const PeerNetworkOptions& options() const { return options_; }

  // Payload bytes of completed sends, and of those through shared memory.
  int64_t bytes_sent() const { return bytes_sent_.load(); }
  int64_t bytes_shared() const { return bytes_shared_.load(); }

 private:
  PeerNetwork(PeerNetworkOptions options, std::vector<PeerInfo> workers,
              PeerMailbox* mailbox, PeerChannelFactory channel_factory);
  grpc::GenericStub* Stub(int rank);
  // A transfer to this worker itself: views of data[0, n) in messages of
  // at most max_message_bytes (copied once, by the mailbox).
  std::vector<PeerMessageView> LocalMessages(const TransferKey& key,
                                             const float* data,
                                             size_t n) const;
  absl::Status SendRemote(int to_rank, const TransferKey& key,
                          const float* data, size_t n);
  // Shared memory to worker `rank`: its window pool (created on first use),
  // or nullptr when off for it (the option, its refusal, no memfd).
  WindowPool* SharedWindows(int rank);

  const PeerNetworkOptions options_;
  const std::vector<PeerInfo> workers_;
  PeerMailbox* const mailbox_;
  const PeerChannelFactory channel_factory_;
  absl::Mutex mu_;
  // Index = rank; null until the first send there.
  std::vector<std::unique_ptr<grpc::GenericStub>> stubs_
      ABSL_GUARDED_BY(mu_);
  std::atomic<int64_t> bytes_sent_{0};
  std::atomic<int64_t> bytes_shared_{0};
  PeerWindowPools shm_;  // by rank
};

}  // namespace lmps

#endif  // LMPS_WORKER_PEER_PEER_NETWORK_H_
