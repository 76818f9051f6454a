// PeerMailbox: where a worker's WorkerPeer service stores the transfers
// other workers send it (activations, their gradients, ring all-reduce
// segments) until its training loop claims them. Free of gRPC, so it is
// unit-tested without a network (peer_service.h adapts it).
//
// A transfer is identified by its TransferKey (kind, eval, step,
// micro_batch, seq, round, sender) and holds total_elements fp32 values. It
// may arrive in pieces, over one or several streams, in any order; it is
// complete when every element arrived exactly once.
//
//   Deliver(stream)    validates the whole stream before storing anything:
//                      InvalidArgument for an unknown kind, an empty sender,
//                      total_elements < 0 or above max_pending_bytes / 4,
//                      data not a multiple of 4 bytes, a piece outside
//                      [0, total_elements), pieces of one transfer that
//                      disagree on total_elements (within the stream or
//                      with what is already stored), an element delivered
//                      twice, or a transfer that is already complete and
//                      waiting to be claimed; ResourceExhausted when the new
//                      transfers would take the pending bytes above
//                      max_pending_bytes; Unavailable after Shutdown. On
//                      error nothing is stored. Returns the number of
//                      elements received. Never blocks on the receiver.
//   Receive(key, ...)  waits until the transfer `key` is complete, removes
//                      it and returns its values. DeadlineExceeded after
//                      `timeout`, naming what was expected, from whom
//                      (`peer_description`) and how much had arrived;
//                      Unavailable after Shutdown. With `stop`, returns
//                      stop()'s status instead as soon as it is not OK
//                      (checked on entry and at every wake-up; whoever
//                      makes it fail calls WakeReceivers). `stop` runs
//                      under the mailbox's lock: it must not call into the
//                      mailbox.
//   DropBefore(step)   discards the training (non-eval) transfers of steps
//                      < step, complete or not (after a failed step). A
//                      piece of a dropped step arriving later is stored
//                      again.
//   Recycle(buffer)    hands back a buffer that Receive returned and whose
//                      values the caller no longer needs: a later transfer
//                      is stored in it instead of in a new vector (which
//                      is zero-filled first, and faulted in page by page
//                      where the allocator returned the memory to the
//                      kernel: as much as the copy itself). At most
//                      options.max_spare_bytes of capacity are kept; the
//                      rest is freed. Optional: buffers not handed back are
//                      simply freed by their owner.
//   SetSenders(ids)    the node ids of the job's workers (PeerNetwork::Create
//                      sets them): from then on Deliver refuses a stream
//                      with any other sender (PermissionDenied, nothing
//                      stored), and the transfers already stored from other
//                      senders are dropped. Until then every sender is
//                      accepted: a peer may send before this worker has its
//                      assignment. Without it, anyone able to reach the
//                      service could fill the mailbox with transfers nobody
//                      claims (up to max_pending_bytes: then the job's own
//                      transfers are refused) -- seen with
//                      tests/hostile_client_test.
//
// Memory: a transfer's buffer (4 * total_elements bytes) is allocated (or
// taken from the recycled spares) when its first piece arrives and counted
// as pending until it is claimed or dropped. Spares are not counted as
// pending.
//
// Thread-safety: thread-safe. Any number of threads may deliver and
// receive concurrently.
#ifndef LMPS_WORKER_PEER_MAILBOX_H_
#define LMPS_WORKER_PEER_MAILBOX_H_

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "common/wire/chunk_wire.h"
#include "proto/lmps.pb.h"

namespace lmps {

struct TransferKey {
  PeerKind kind = PEER_KIND_UNSPECIFIED;
  bool eval = false;
  int64_t step = 0;
  int32_t micro_batch = 0;  // ACTIVATION, ACTIVATION_GRAD; ALL_REDUCE: piece
  int32_t seq = 0;          // ALL_REDUCE: collective number within the step
  int32_t round = 0;        // ALL_REDUCE: ring round
  std::string sender;       // node id of the sending worker

  bool operator<(const TransferKey& other) const;
  bool operator==(const TransferKey& other) const;
};

// The key of a message (its header fields).
TransferKey KeyOf(const PeerMessage& message);
TransferKey KeyOf(const PeerHeader& message);
// The inverse: the header of a message of `key`'s transfer of
// total_elements (offset 0).
PeerHeader HeaderOf(const TransferKey& key, int64_t total_elements);

// "ACTIVATION of step 3 micro-batch 1", "ALL_REDUCE #2 round 1 of step 3",
// "ALL_REDUCE #2 round 1 piece 4 of step 3" (piece 0 is not named),
// prefixed by "eval " for an evaluation pass. The sender is not named.
std::string DescribeKey(const TransferKey& key);

struct PeerMailboxOptions {
  // Cap on the bytes of all stored transfers (complete or not).
  int64_t max_pending_bytes = int64_t{1} << 30;
  // Cap on the capacity of the buffers kept by Recycle for reuse (0: none
  // kept). Four ring pieces of the default 8 MiB.
  int64_t max_spare_bytes = int64_t{32} << 20;
};

class PeerMailbox {
 public:
  // InvalidArgument when max_pending_bytes <= 0.
  static absl::StatusOr<std::unique_ptr<PeerMailbox>> Create(
      const PeerMailboxOptions& options);

  PeerMailbox(const PeerMailbox&) = delete;
  PeerMailbox& operator=(const PeerMailbox&) = delete;
  ~PeerMailbox();

  absl::StatusOr<int64_t> Deliver(const std::vector<PeerMessage>& stream);
  // The same on messages read in place from gRPC's buffers
  // (common/wire/chunk_wire.h; WorkerPeerService's raw Send): each payload
  // is copied once, into the transfer.
  absl::StatusOr<int64_t> Deliver(const std::vector<PeerMessageView>& stream);
  absl::StatusOr<std::vector<float>> Receive(
      const TransferKey& key, absl::Duration timeout,
      const std::string& peer_description,
      const std::function<absl::Status()>& stop = nullptr);
  // Wakes every Receive now waiting to check its `stop` again.
  void WakeReceivers();
  // Wakes every waiter (they return Unavailable); later calls fail too.
  void Shutdown();
  void DropBefore(int64_t step);
  void Recycle(std::vector<float> buffer);
  void SetSenders(const std::vector<std::string>& ids);

  // Payload bytes stored so far (every accepted piece).
  int64_t bytes_received() const;
  // Transfers that became complete so far.
  int64_t transfers_completed() const;
  // Bytes of the transfers stored now.
  int64_t pending_bytes() const;
  // Transfers stored now (complete or not).
  int64_t pending_transfers() const;
  // Capacity in bytes of the recycled buffers kept for reuse.
  int64_t spare_bytes() const;

 private:
  struct Transfer {
    int64_t total = 0;
    int64_t received = 0;
    std::vector<float> data;
    // Received element ranges [begin, end), disjoint and coalesced.
    std::map<int64_t, int64_t> ranges;
    bool complete() const { return received == total; }
  };

  explicit PeerMailbox(const PeerMailboxOptions& options);
  // A buffer of n elements (unspecified values): the smallest spare whose
  // capacity suffices, else a new one.
  std::vector<float> TakeBuffer(size_t n) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const PeerMailboxOptions options_;
  mutable absl::Mutex mu_;
  absl::CondVar completed_cv_;  // signalled when a transfer completes
  bool shutdown_ ABSL_GUARDED_BY(mu_) = false;
  // The job's workers once known (SetSenders); unset: any sender.
  std::optional<std::set<std::string>> senders_ ABSL_GUARDED_BY(mu_);
  std::map<TransferKey, Transfer> transfers_ ABSL_GUARDED_BY(mu_);
  int64_t pending_bytes_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t bytes_received_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t transfers_completed_ ABSL_GUARDED_BY(mu_) = 0;
  std::vector<std::vector<float>> spares_ ABSL_GUARDED_BY(mu_);
  int64_t spare_bytes_ ABSL_GUARDED_BY(mu_) = 0;  // their capacity
};

}  // namespace lmps

#endif  // LMPS_WORKER_PEER_MAILBOX_H_
