#include "worker/peer/ring_allreduce.h"

#include <algorithm>
#include <set>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/rpc/status_util.h"

namespace lmps {

absl::StatusOr<std::unique_ptr<RingAllReduce>> RingAllReduce::Create(
    PeerNetwork* network, std::vector<int> group, int index) {
  auto bad = [](const std::string& what) {
    return absl::InvalidArgumentError(absl::StrCat("RingAllReduce: ", what));
  };
  if (network == nullptr) return bad("null network");
  if (group.empty()) return bad("empty group");
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
      new RingAllReduce(network, std::move(group), index));
}

RingAllReduce::RingAllReduce(PeerNetwork* network, std::vector<int> group,
                             int index)
    : network_(network), group_(std::move(group)), index_(index) {}

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
  std::vector<float> host(n);
  LMPS_RETURN_IF_ERROR(backend->CopyToHost(host.data(), data, n));
  LMPS_RETURN_IF_ERROR(Ring(host, seq, Phase::kAllReduce));
  LMPS_RETURN_IF_ERROR(backend->CopyToBackend(data, host.data(), n));
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
  std::vector<float> host(n);
  LMPS_RETURN_IF_ERROR(backend->CopyToHost(host.data(), in, n));
  if (s > 1) {
    LMPS_RETURN_IF_ERROR(Ring(host, seq, Phase::kReduceScatterToOwn));
  }
  LMPS_RETURN_IF_ERROR(
      backend->CopyToBackend(out, host.data() + index_ * (n / s), n / s));
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
  std::vector<float> host(n);
  LMPS_RETURN_IF_ERROR(
      backend->CopyToHost(host.data() + index_ * (n / s), in, n / s));
  if (s > 1) LMPS_RETURN_IF_ERROR(Ring(host, seq, Phase::kGatherFromOwn));
  LMPS_RETURN_IF_ERROR(backend->CopyToBackend(out, host.data(), n));
  collectives_++;
  return absl::OkStatus();
}

absl::Status RingAllReduce::Ring(std::vector<float>& host, int32_t seq,
                                 Phase phase) {
  const int s = size();
  const size_t n = host.size();
  const int next = group_[(index_ + 1) % s];
  const int prev = group_[(index_ + s - 1) % s];
  auto begin = [&](int segment) {
    return static_cast<size_t>(segment) * n / static_cast<size_t>(s);
  };
  auto mod = [&](int x) { return ((x % s) + s) % s; };
  TransferKey key;
  key.kind = ALL_REDUCE;
  key.eval = eval_;
  key.step = step_;
  key.seq = seq;
  // One round: send segment `out` to next, receive segment `in` from prev
  // and combine it into the local one.
  auto round = [&](int r, int out, int in, bool add) -> absl::Status {
    key.round = r;
    const size_t out_begin = begin(out);
    const size_t out_n = begin(out + 1) - out_begin;
    LMPS_RETURN_IF_ERROR(
        network_->Send(next, key, host.data() + out_begin, out_n));
    bytes_sent_ += static_cast<int64_t>(4 * out_n);
    LMPS_ASSIGN_OR_RETURN(std::vector<float> got, network_->Receive(prev, key));
    bytes_received_ += static_cast<int64_t>(4 * got.size());
    const size_t in_begin = begin(in);
    const size_t in_n = begin(in + 1) - in_begin;
    if (got.size() != in_n) {
      return absl::FailedPreconditionError(absl::StrCat(
          DescribeKey(key), " from ", network_->Describe(prev), " has ",
          got.size(), " elements, expected ", in_n,
          " (do all ranks of the tp group run the same collectives with the "
          "same sizes in the same order?)"));
    }
    float* local = host.data() + in_begin;
    if (add) {
      for (size_t i = 0; i < in_n; ++i) local[i] = got[i] + local[i];
    } else {
      std::copy(got.begin(), got.end(), local);
    }
    return absl::OkStatus();
  };
  switch (phase) {
    case Phase::kAllReduce:
      for (int k = 0; k < s - 1; ++k) {
        LMPS_RETURN_IF_ERROR(
            round(k, mod(index_ - k), mod(index_ - k - 1), /*add=*/true));
      }
      for (int k = 0; k < s - 1; ++k) {
        LMPS_RETURN_IF_ERROR(round(s - 1 + k, mod(index_ + 1 - k),
                                   mod(index_ - k), /*add=*/false));
      }
      break;
    case Phase::kReduceScatterToOwn:
      // Shifted by one against the all-reduce's first half, so that rank r
      // ends with the total of its own segment r.
      for (int k = 0; k < s - 1; ++k) {
        LMPS_RETURN_IF_ERROR(round(k, mod(index_ - k - 1),
                                   mod(index_ - k - 2), /*add=*/true));
      }
      break;
    case Phase::kGatherFromOwn:
      for (int k = 0; k < s - 1; ++k) {
        LMPS_RETURN_IF_ERROR(
            round(k, mod(index_ - k), mod(index_ - k - 1), /*add=*/false));
      }
      break;
  }
  return absl::OkStatus();
}

}  // namespace lmps
