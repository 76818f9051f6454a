#include "worker/peer/ring_allreduce.h"

#include <algorithm>
#include <deque>
#include <functional>
#include <set>
#include <thread>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "common/rpc/status_util.h"

namespace lmps {
namespace {

// Runs send(round, piece) for the queued pieces, in queue order, on
// `threads` threads of its own (so up to that many sends are in flight)
// until Finish; with threads == 0, inside Queue on the caller's thread.
// The first failed send stops it.
class PieceSender {
 public:
  using SendFn = std::function<absl::Status(int round, size_t piece)>;
  // `on_failure` runs (on the sender's thread) after a send failed.
  PieceSender(SendFn send, std::function<void()> on_failure, int threads)
      : send_(std::move(send)), on_failure_(std::move(on_failure)) {
    for (int i = 0; i < threads; ++i) threads_.emplace_back([this] { Run(); });
  }
  PieceSender(const PieceSender&) = delete;
  PieceSender& operator=(const PieceSender&) = delete;
  ~PieceSender() { Finish(absl::CancelledError("abandoned")).IgnoreError(); }

  // The first failed send's status (OK while none failed).
  absl::Status send_status() {
    absl::MutexLock lock(&mu_);
    return send_status_;
  }

  void Queue(int round, size_t piece) {
    if (threads_.empty()) {
      if (!send_status().ok()) return;
      absl::Status status = send_(round, piece);
      absl::MutexLock lock(&mu_);
      send_status_.Update(status);
      return;
    }
    absl::MutexLock lock(&mu_);
    queue_.emplace_back(round, piece);
  }

  // `receiving` is the receiving side's status. When it is OK, waits until
  // every queued piece was sent; otherwise drops what is still queued (a
  // send in progress ends at its deadline or when the peer answers). Then
  // joins the sending threads. Returns the first error: the sender's when
  // `receiving` is OK or is that same error (a receive stopped by it), the
  // receiving side's with the sender's appended when both failed, else
  // the receiving side's.
  absl::Status Finish(absl::Status receiving) {
    {
      absl::MutexLock lock(&mu_);
      if (finished_) return receiving;
      finished_ = true;
      if (!receiving.ok()) queue_.clear();
      done_ = true;
    }
    for (std::thread& t : threads_) t.join();
    absl::MutexLock lock(&mu_);
    if (receiving.ok()) return send_status_;
    if (send_status_.ok() || receiving == send_status_) return receiving;
    return absl::Status(receiving.code(),
                        absl::StrCat(receiving.message(), "; and earlier, ",
                                     send_status_.message()));
  }

 private:
  void Run() {
    while (true) {
      std::pair<int, size_t> item;
      {
        absl::MutexLock lock(&mu_);
        mu_.Await(absl::Condition(
            +[](PieceSender* self) ABSL_EXCLUSIVE_LOCKS_REQUIRED(self->mu_) {
              return !self->queue_.empty() || self->done_;
            },
            this));
        if (queue_.empty()) return;
        item = queue_.front();
        queue_.pop_front();
      }
      absl::Status status = send_(item.first, item.second);
      if (!status.ok()) {
        {
          absl::MutexLock lock(&mu_);
          if (send_status_.ok()) send_status_ = std::move(status);
          queue_.clear();
          done_ = true;
        }
        on_failure_();
        return;
      }
    }
  }

  const SendFn send_;
  const std::function<void()> on_failure_;
  absl::Mutex mu_;
  std::deque<std::pair<int, size_t>> queue_ ABSL_GUARDED_BY(mu_);
  bool done_ ABSL_GUARDED_BY(mu_) = false;  // no more pieces come
  bool finished_ ABSL_GUARDED_BY(mu_) = false;  // Finish ran
  absl::Status send_status_ ABSL_GUARDED_BY(mu_);
  std::vector<std::thread> threads_;
};

}  // namespace

absl::StatusOr<std::unique_ptr<RingAllReduce>> RingAllReduce::Create(
    PeerNetwork* network, std::vector<int> group, int index,
    const RingAllReduceOptions& options) {
  auto bad = [](const std::string& what) {
    return absl::InvalidArgumentError(absl::StrCat("RingAllReduce: ", what));
  };
  if (network == nullptr) return bad("null network");
  if (group.empty()) return bad("empty group");
  if (options.piece_bytes < 4) {
    return bad(absl::StrCat("piece_bytes must be at least 4, got ",
                            options.piece_bytes));
  }
  if (options.sends_in_flight < 1) {
    return bad(absl::StrCat("sends_in_flight must be at least 1, got ",
                            options.sends_in_flight));
  }
  if (index < 0 || index >= static_cast<int>(group.size())) {
    return bad(absl::StrCat("index ", index, " outside [0, ", group.size(),
                            ")"));
  }
  std::set<int> seen;
  for (int r : group) {
    if (r < 0 || r >= network->num_workers()) {
      return bad(absl::StrCat("worker rank ", r, " outside [0, ",
                              network->num_workers(), ")"));
    }
    if (!seen.insert(r).second) {
      return bad(absl::StrCat("worker rank ", r, " appears twice"));
    }
  }
  if (group[index] != network->self_rank()) {
    return bad(absl::StrCat("group[", index, "] = ", group[index],
                            " is not this worker's rank ",
                            network->self_rank()));
  }
  return std::unique_ptr<RingAllReduce>(
      new RingAllReduce(network, std::move(group), index, options));
}

RingAllReduce::RingAllReduce(PeerNetwork* network, std::vector<int> group,
                             int index, const RingAllReduceOptions& options)
    : network_(network),
      group_(std::move(group)),
      index_(index),
      options_(options) {}

void RingAllReduce::SetStep(int64_t step, bool eval) {
  step_ = step;
  eval_ = eval;
  seq_ = 0;
}

absl::Status RingAllReduce::AllReduceSum(Backend* backend, float* data,
                                         size_t n) {
  const int32_t seq = seq_++;
  if (size() == 1 || n == 0) {
    collectives_++;
    return absl::OkStatus();
  }
  if (backend->memory_is_host()) {
    // In place: two copies of the whole buffer fewer.
    LMPS_RETURN_IF_ERROR(Ring(data, n, seq, Phase::kAllReduce));
  } else {
    float* host = Scratch(n);
    LMPS_RETURN_IF_ERROR(backend->CopyToHost(host, data, n));
    LMPS_RETURN_IF_ERROR(Ring(host, n, seq, Phase::kAllReduce));
    LMPS_RETURN_IF_ERROR(backend->CopyToBackend(data, host, n));
  }
  collectives_++;
  return absl::OkStatus();
}

absl::Status RingAllReduce::ReduceScatterSum(Backend* backend,
                                             const float* in, float* out,
                                             size_t n) {
  const int32_t seq = seq_++;
  const size_t s = static_cast<size_t>(size());
  if (n % s != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "RingAllReduce: reduce-scatter of ", n,
        " elements is not divisible by the group size ", s));
  }
  if (n == 0) {
    collectives_++;
    return absl::OkStatus();
  }
  float* host = Scratch(n);
  LMPS_RETURN_IF_ERROR(backend->CopyToHost(host, in, n));
  if (s > 1) {
    LMPS_RETURN_IF_ERROR(Ring(host, n, seq, Phase::kReduceScatterToOwn));
  }
  LMPS_RETURN_IF_ERROR(
      backend->CopyToBackend(out, host + index_ * (n / s), n / s));
  collectives_++;
  return absl::OkStatus();
}

absl::Status RingAllReduce::AllGather(Backend* backend, const float* in,
                                      float* out, size_t n) {
  const int32_t seq = seq_++;
  const size_t s = static_cast<size_t>(size());
  if (n % s != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "RingAllReduce: all-gather of ", n,
        " elements is not divisible by the group size ", s));
  }
  if (n == 0) {
    collectives_++;
    return absl::OkStatus();
  }
  // Every other segment is received whole: the buffer's old values never
  // show. Host memory: gathered in `out` itself (unless `in` overlaps it
  // elsewhere than at its own segment).
  const bool in_place =
      backend->memory_is_host() &&
      (in == out + index_ * (n / s) || in + n / s <= out || out + n <= in);
  float* host = in_place ? out : Scratch(n);
  if (host + index_ * (n / s) != in) {
    LMPS_RETURN_IF_ERROR(
        backend->CopyToHost(host + index_ * (n / s), in, n / s));
  }
  if (s > 1) LMPS_RETURN_IF_ERROR(Ring(host, n, seq, Phase::kGatherFromOwn));
  if (!in_place) LMPS_RETURN_IF_ERROR(backend->CopyToBackend(out, host, n));
  collectives_++;
  return absl::OkStatus();
}

std::vector<RingAllReduce::RoundPlan> RingAllReduce::Rounds(
    Phase phase) const {
  const int s = size();
  auto mod = [&](int x) { return ((x % s) + s) % s; };
  std::vector<RoundPlan> rounds;
  switch (phase) {
    case Phase::kAllReduce:
      for (int k = 0; k < s - 1; ++k) {
        rounds.push_back({mod(index_ - k), mod(index_ - k - 1), true});
      }
      for (int k = 0; k < s - 1; ++k) {
        rounds.push_back({mod(index_ + 1 - k), mod(index_ - k), false});
      }
      break;
    case Phase::kReduceScatterToOwn:
      // Shifted by one against the all-reduce's first half, so that rank r
      // ends with the total of its own segment r.
      for (int k = 0; k < s - 1; ++k) {
        rounds.push_back({mod(index_ - k - 1), mod(index_ - k - 2), true});
      }
      break;
    case Phase::kGatherFromOwn:
      for (int k = 0; k < s - 1; ++k) {
        rounds.push_back({mod(index_ - k), mod(index_ - k - 1), false});
      }
      break;
  }
  return rounds;
}

float* RingAllReduce::Scratch(size_t n) {
  if (scratch_.size() < n) scratch_.resize(n);
  return scratch_.data();
}

absl::Status RingAllReduce::Ring(float* host, size_t n, int32_t seq,
                                 Phase phase) {
  const int s = size();
  const int next = group_[(index_ + 1) % s];
  const int prev = group_[(index_ + s - 1) % s];
  const std::vector<RoundPlan> rounds = Rounds(phase);
  // Piece p of segment i: elements [begin(i) + p * piece, + piece) clipped
  // to the segment; an empty segment is one empty piece.
  const size_t piece = static_cast<size_t>(options_.piece_bytes / 4);
  auto begin = [&](int segment) {
    return static_cast<size_t>(segment) * n / static_cast<size_t>(s);
  };
  auto pieces = [&](int segment) {
    const size_t len = begin(segment + 1) - begin(segment);
    return std::max<size_t>(1, (len + piece - 1) / piece);
  };
  auto range = [&](int segment, size_t p) {
    const size_t b = begin(segment) + p * piece;
    return std::make_pair(b, std::min(b + piece, begin(segment + 1)));
  };
  auto key = [&](int r, size_t p) {
    TransferKey k;
    k.kind = ALL_REDUCE;
    k.eval = eval_;
    k.step = step_;
    k.seq = seq;
    k.round = r;
    k.micro_batch = static_cast<int32_t>(p);
    return k;
  };
  auto send = [&](int r, size_t p) -> absl::Status {
    const auto [b, e] = range(rounds[r].out, p);
    LMPS_RETURN_IF_ERROR(network_->Send(next, key(r, p), host + b,
                                        e - b));
    bytes_sent_ += static_cast<int64_t>(4 * (e - b));
    return absl::OkStatus();
  };

  // Sends run on their own thread, in order; this thread receives piece p
  // of round r, combines it into the local segment and then queues piece p
  // of round r + 1, which is the same elements (rounds[r + 1].out ==
  // rounds[r].in). So piece p + 1 is in flight while piece p is reduced.
  // The sender reads host memory that this thread does not write
  // meanwhile: a segment is overwritten only by a piece received from
  // prev, and prev sends that piece only after everything this rank sent
  // of the segment reached its next neighbour (the ring's causality; a
  // send completes once the receiver stored it).
  // A failed send wakes the receive waiting here, which then stops. When
  // every segment is one piece there is nothing to overlap: the sends run
  // inline, with no thread (the many small tensor-parallel collectives).
  size_t most_pieces = 0;
  for (int i = 0; i < s; ++i) most_pieces = std::max(most_pieces, pieces(i));
  PieceSender sender(send, [this] { network_->WakeReceivers(); },
                     most_pieces == 1 ? 0 : options_.sends_in_flight);
  auto stop = [&sender] { return sender.send_status(); };
  for (size_t p = 0; p < pieces(rounds[0].out); ++p) sender.Queue(0, p);
  absl::Status status;
  for (size_t r = 0; r < rounds.size() && status.ok(); ++r) {
    const RoundPlan& round = rounds[r];
    for (size_t p = 0; p < pieces(round.in) && status.ok(); ++p) {
      const TransferKey k = key(static_cast<int>(r), p);
      absl::StatusOr<std::vector<float>> got = network_->Receive(prev, k, stop);
      if (!got.ok()) {
        status = got.status();
        break;
      }
      bytes_received_ += static_cast<int64_t>(4 * got->size());
      const auto [b, e] = range(round.in, p);
      if (got->size() != e - b) {
        status = absl::FailedPreconditionError(absl::StrCat(
            DescribeKey(k), " from ", network_->Describe(prev), " has ",
            got->size(), " elements, expected ", e - b,
            " (do all ranks of the group run the same collectives with the "
            "same sizes and piece size in the same order?)"));
        break;
      }
      float* local = host + b;
      if (round.add) {
        for (size_t i = 0; i < e - b; ++i) local[i] = (*got)[i] + local[i];
      } else {
        std::copy(got->begin(), got->end(), local);
      }
      network_->Recycle(*std::move(got));
      if (r + 1 < rounds.size()) sender.Queue(static_cast<int>(r + 1), p);
    }
  }
  return sender.Finish(std::move(status));
}

}  // namespace lmps
