// RingAllReduce: TpComm (worker/model/tp_comm.h) over PeerNetwork, a
// chunked ring all-reduce among the workers of one tensor-parallel group.
//
// AllReduceSum(backend, data, n) works on data in place when the backend's
// memory is host memory (Backend::memory_is_host: the CPU backends) and on
// a host copy otherwise (copied back at the end), splits it into
// size() contiguous segments (segment i = [i*n/size, (i+1)*n/size), some
// empty when n < size) and runs, with next = the following rank of the
// group and prev = the preceding one (cyclically):
//   reduce-scatter, rounds k = 0 .. size-2: send segment (rank - k) mod size
//     to next, receive segment (rank - k - 1) mod size from prev and add it
//     to the local one. Rank r then holds the total of segment
//     (r + 1) mod size.
//   all-gather, rounds k = 0 .. size-2 (tagged round size-1+k): send segment
//     (rank + 1 - k) mod size to next, receive segment (rank - k) mod size
//     from prev and copy it.
// and copies the result back to the backend.
// ReduceScatterSum(backend, in, out, n) (n % size() == 0) runs only the
// reduce-scatter, shifted by one segment so that rank r ends with segment r:
// rounds k = 0 .. size-2 send segment (rank - k - 1) mod size and receive
// and add segment (rank - k - 2) mod size; out = segment rank.
// AllGather(backend, in, out, n) (n % size() == 0) places `in` as segment
// rank and runs only the all-gather from there: rounds k = 0 .. size-2
// send segment (rank - k) mod size and receive segment (rank - k - 1) mod
// size.
//
// Pipelining: every round's segment travels as pieces of at most
// options.piece_bytes, each its own ALL_REDUCE transfer (micro_batch = the
// piece's index within the segment). Sends run on options.sends_in_flight
// threads of their own (per collective), taking pieces in order; the
// calling thread receives piece p of round k, combines it and queues piece
// p of round k + 1 (the segment a round sends is the one the previous
// round received). So piece p + 1 of a round is in flight while piece p is
// being added, and round k + 1 starts before round k ends. A collective
// whose segments are all one piece (small tensors) sends on the calling
// thread, without starting threads: send, receive, combine, round by
// round. The per-element arithmetic and its order are those
// of the unpipelined ring: results are bitwise the same for every piece
// size. Each segment's sum is computed once, on one rank, in ring order,
// and then copied: the result is bitwise identical on every rank. Messages
// are ALL_REDUCE transfers tagged with the (step, eval) of SetStep, seq =
// the number of collectives since then, the round and the piece. A send
// returns once the receiver's mailbox stored it, so sends never wait for
// receives and the ring cannot deadlock.
//
// size() == 1 and n == 0 are no-ops (no communication; seq still advances).
// Errors come from PeerNetwork and name the peer; a piece of the wrong
// length (ranks disagreeing on n or piece_bytes) is FailedPrecondition.
// A failed send stops the receiving at once (the collective returns the
// send's error); after a failed receive the queued sends are dropped. After
// an error the output (for AllReduceSum in host memory: data) holds
// unspecified values and the step should be failed (PeerMailbox::DropBefore
// discards leftovers).
//
// Thread-safety: as TpComm, one thread at a time; the byte counters may be
// read from any thread.
#ifndef LMPS_WORKER_PEER_RING_ALLREDUCE_H_
#define LMPS_WORKER_PEER_RING_ALLREDUCE_H_

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "worker/backend/backend.h"
#include "worker/model/tp_comm.h"
#include "worker/peer/peer_network.h"

namespace lmps {

struct RingAllReduceOptions {
  // Payload bytes per piece of a round's segment (rounded down to whole
  // elements), and pieces sent concurrently (each send is one
  // WorkerPeer.Send call, which returns once the receiver stored the
  // piece). Chosen with bench/allreduce_bench (docs/benchmarks.md): on
  // 2 cores over loopback the ring is CPU-bound and pieces of 8 MiB, 2 in
  // flight, match the unpipelined ring; pieces under 2 MiB cost more CPU
  // per byte (a call each). The overlap pays where the link, not the CPU,
  // is the bottleneck.
  int64_t piece_bytes = int64_t{8} << 20;
  int sends_in_flight = 2;
};

class RingAllReduce final : public TpComm {
 public:
  // `network` (not owned) must outlive this object. `group` holds the
  // worker ranks of the tp group in tp-rank order; group[index] must be
  // network->self_rank(). InvalidArgument otherwise, or for a null network,
  // an empty group, a rank out of range or repeated, piece_bytes < 4 or
  // sends_in_flight < 1.
  // Every rank of the group must use the same piece_bytes.
  static absl::StatusOr<std::unique_ptr<RingAllReduce>> Create(
      PeerNetwork* network, std::vector<int> group, int index,
      const RingAllReduceOptions& options = {});

  int size() const override { return static_cast<int>(group_.size()); }
  int rank() const override { return index_; }
  void SetStep(int64_t step, bool eval) override;
  absl::Status AllReduceSum(Backend* backend, float* data, size_t n) override;
  absl::Status ReduceScatterSum(Backend* backend, const float* in, float* out,
                                size_t n) override;
  absl::Status AllGather(Backend* backend, const float* in, float* out,
                         size_t n) override;

  // Payload bytes this rank sent and received in collectives.
  int64_t bytes_sent() const { return bytes_sent_.load(); }
  int64_t bytes_received() const { return bytes_received_.load(); }
  // Collectives (all three kinds) that completed.
  int64_t collectives() const { return collectives_.load(); }

 private:
  RingAllReduce(PeerNetwork* network, std::vector<int> group, int index,
                const RingAllReduceOptions& options);
  enum class Phase { kAllReduce, kReduceScatterToOwn, kGatherFromOwn };
  // One ring round: send segment `out` to next, receive segment `in` from
  // prev and add it to the local one (add) or copy it over it.
  struct RoundPlan {
    int out = 0;
    int in = 0;
    bool add = false;
  };
  // The rounds of `phase` for this rank (see the top comment); in every
  // phase rounds[k + 1].out == rounds[k].in.
  std::vector<RoundPlan> Rounds(Phase phase) const;
  // host[0, n): the collective's buffer in host memory.
  absl::Status Ring(float* host, size_t n, int32_t seq, Phase phase);
  // A host buffer of at least n floats, kept between collectives (fresh
  // pages and zeroing cost as much as a copy): the largest collective's
  // size stays allocated.
  float* Scratch(size_t n);

  PeerNetwork* const network_;
  const std::vector<int> group_;
  const int index_;
  const RingAllReduceOptions options_;
  int64_t step_ = 0;
  bool eval_ = false;
  int32_t seq_ = 0;
  std::atomic<int64_t> bytes_sent_{0};
  std::atomic<int64_t> bytes_received_{0};
  std::atomic<int64_t> collectives_{0};
  std::vector<float> scratch_;
};

}  // namespace lmps

#endif  // LMPS_WORKER_PEER_RING_ALLREDUCE_H_
