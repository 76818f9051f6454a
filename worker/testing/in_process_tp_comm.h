// InProcessTpGroup / InProcessTpComm: a TpComm (worker/model/tp_comm.h)
// whose ranks are threads of one process, for unit tests and benchmarks of
// tensor-parallel models without a network.
//
// Every collective is a barrier: each rank deposits a host copy of its
// input; the last to arrive combines them (sums in rank order 0, 1, ...,
// so the result is bitwise identical on every rank and independent of the
// arrival order) and every rank copies its part of the result back.
// A rank that waits longer than the group's deadline (60 s) aborts the
// group with DeadlineExceeded; Abort() unblocks the others (a rank that
// failed calls it so its peers do not wait for it).
//
// Thread-safety: InProcessTpGroup is thread-safe; each InProcessTpComm is
// used by one thread (its rank's).
#ifndef LMPS_WORKER_TESTING_IN_PROCESS_TP_COMM_H_
#define LMPS_WORKER_TESTING_IN_PROCESS_TP_COMM_H_

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "worker/backend/backend.h"
#include "worker/model/tp_comm.h"

namespace lmps {

class InProcessTpGroup {
 public:
  enum class Op { kAllReduce, kReduceScatter, kAllGather };

  explicit InProcessTpGroup(int size) : size_(size), deposits_(size) {}

  // One collective of `rank`: `in` (n_in floats of backend memory) is its
  // contribution; writes n_out floats to `out`.
  absl::Status Run(Op op, int rank, Backend* backend, const float* in,
                   size_t n_in, float* out, size_t n_out) {
    std::vector<float> host(n_in);
    if (absl::Status s = backend->CopyToHost(host.data(), in, n_in); !s.ok()) {
      return s;
    }
    std::unique_lock<std::mutex> lock(mu_);
    if (aborted_) return absl::AbortedError("tp group aborted");
    deposits_[rank] = std::move(host);
    ops_.push_back(op);
    const int64_t generation = generation_;
    if (++arrived_ == size_) {
      Combine();
      arrived_ = 0;
      ++generation_;
      counts_[static_cast<int>(op)]++;
      cv_.notify_all();
    } else if (!cv_.wait_for(lock, std::chrono::seconds(60), [&] {
                 return generation_ != generation || aborted_;
               })) {
      aborted_ = true;
      cv_.notify_all();
      return absl::DeadlineExceededError(
          absl::StrCat("tp group: rank ", rank,
                       " waited 60 s for its peers' collective"));
    }
    if (generation_ == generation) return absl::AbortedError("tp aborted");
    if (!error_.ok()) return error_;
    const float* src = result_.data();
    if (op == Op::kReduceScatter) src += rank * n_out;
    if (src + n_out > result_.data() + result_.size()) {
      return absl::InternalError("tp group: result too short");
    }
    std::vector<float> mine(src, src + n_out);
    lock.unlock();
    return backend->CopyToBackend(out, mine.data(), n_out);
  }

  void Abort() {
    std::lock_guard<std::mutex> lock(mu_);
    aborted_ = true;
    cv_.notify_all();
  }

  // Completed collectives of each kind.
  int64_t count(Op op) {
    std::lock_guard<std::mutex> lock(mu_);
    return counts_[static_cast<int>(op)];
  }
  int64_t collectives() {
    std::lock_guard<std::mutex> lock(mu_);
    return generation_;
  }

 private:
  void Combine() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    error_ = absl::OkStatus();
    for (size_t i = 1; i < ops_.size(); ++i) {
      if (ops_[i] != ops_[0]) {
        error_ = absl::InvalidArgumentError("tp group: ranks run different "
                                            "collectives");
      }
    }
    const Op op = ops_[0];
    ops_.clear();
    for (int r = 1; r < size_; ++r) {
      if (deposits_[r].size() != deposits_[0].size()) {
        error_ = absl::InvalidArgumentError("tp group: sizes differ");
      }
    }
    if (!error_.ok()) return;
    if (op == Op::kAllGather) {
      result_.clear();
      for (int r = 0; r < size_; ++r) {
        result_.insert(result_.end(), deposits_[r].begin(),
                       deposits_[r].end());
      }
      return;
    }
    result_ = deposits_[0];
    for (int r = 1; r < size_; ++r) {
      for (size_t i = 0; i < result_.size(); ++i) {
        result_[i] += deposits_[r][i];
      }
    }
  }

  const int size_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::vector<std::vector<float>> deposits_ ABSL_GUARDED_BY(mu_);
  std::vector<Op> ops_ ABSL_GUARDED_BY(mu_);
  std::vector<float> result_ ABSL_GUARDED_BY(mu_);
  absl::Status error_ ABSL_GUARDED_BY(mu_);
  int arrived_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t generation_ ABSL_GUARDED_BY(mu_) = 0;  // completed collectives
  int64_t counts_[3] ABSL_GUARDED_BY(mu_) = {0, 0, 0};
  bool aborted_ ABSL_GUARDED_BY(mu_) = false;
};

class InProcessTpComm : public TpComm {
 public:
  InProcessTpComm(InProcessTpGroup* group, int size, int rank)
      : group_(group), size_(size), rank_(rank) {}
  int size() const override { return size_; }
  int rank() const override { return rank_; }
  void SetStep(int64_t, bool) override {}
  absl::Status AllReduceSum(Backend* backend, float* data,
                            size_t n) override {
    return group_->Run(InProcessTpGroup::Op::kAllReduce, rank_, backend, data,
                       n, data, n);
  }
  absl::Status ReduceScatterSum(Backend* backend, const float* in, float* out,
                                size_t n) override {
    if (n % size_ != 0) return Indivisible("reduce-scatter", n);
    return group_->Run(InProcessTpGroup::Op::kReduceScatter, rank_, backend,
                       in, n, out, n / size_);
  }
  absl::Status AllGather(Backend* backend, const float* in, float* out,
                         size_t n) override {
    if (n % size_ != 0) return Indivisible("all-gather", n);
    return group_->Run(InProcessTpGroup::Op::kAllGather, rank_, backend, in,
                       n / size_, out, n);
  }

 private:
  absl::Status Indivisible(const char* what, size_t n) const {
    return absl::InvalidArgumentError(absl::StrCat(
        "tp: ", what, " of ", n, " elements is not divisible by ", size_));
  }
  InProcessTpGroup* const group_;
  const int size_, rank_;
};

}  // namespace lmps

#endif  // LMPS_WORKER_TESTING_IN_PROCESS_TP_COMM_H_
