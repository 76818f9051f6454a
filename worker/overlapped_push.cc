#include "worker/overlapped_push.h"

#include <algorithm>
#include <chrono>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "common/rpc/status_util.h"

namespace lmps {
namespace {

// Steady-clock microseconds (CLOCK_MONOTONIC: comparable between processes
// on one host), for trace lines.
int64_t NowMicros() {
  return std::chrono::duration_cast<std::chrono::microseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

}  // namespace

// Pushes a step's host gradient grads[0, n) on a background thread while the
// backward pass finishes it from the end: Ready(b, ticket) says grads[b, n)
// is final on host once the backend's asynchronous copy `ticket`
// (Backend::CopyToHostAsync; 0: none) has landed; the thread waits for that
// copy (Backend::WaitCopy), then pushes the chunks inside the finished
// suffix not pushed yet (PsClient::PushChunks with the previous suffix as
// `done`, so every chunk goes exactly once), coalescing the suffixes that
// became ready during a push. Finish(ticket) (all final) pushes the rest
// and waits; Abandon() (the backward pass failed) stops without pushing
// what is not final, and waits for the copies issued so far.
// Thread-safety: Ready, Finish and Abandon on one thread (the trainer's); the
// client is used by the pushing thread only until Finish/Abandon return.
class SuffixPusher {
 public:
  SuffixPusher(Backend* backend, PsClient* ps, int64_t step,
               const std::string& worker_id, int dp_rank, const float* grads,
               int64_t n)
      : backend_(backend),
        ps_(ps),
        step_(step),
        worker_id_(worker_id),
        dp_rank_(dp_rank),
        grads_(grads),
        n_(n),
        ready_begin_(n) {
    thread_ = std::thread([this] { Loop(); });
  }
  SuffixPusher(const SuffixPusher&) = delete;
  SuffixPusher& operator=(const SuffixPusher&) = delete;
  ~SuffixPusher() { Abandon(); }

  void Ready(int64_t begin, uint64_t ticket) {
    absl::MutexLock lock(&mu_);
    ready_begin_ = std::min(ready_begin_, begin);
    ready_ticket_ = std::max(ready_ticket_, ticket);
    cv_.Signal();
  }
  // The first copy or push error, or OK once every chunk was pushed.
  absl::Status Finish(uint64_t ticket) {
    Ready(0, ticket);
    thread_.join();
    // After a push error too, no copy may land in the buffer later.
    const absl::Status copied = backend_->WaitCopy(ticket);
    return status_.ok() ? copied : status_;
  }
  void Abandon() {
    uint64_t ticket = 0;
    {
      absl::MutexLock lock(&mu_);
      abandoned_ = true;
      ticket = ready_ticket_;
      cv_.Signal();
    }
    if (thread_.joinable()) {
      thread_.join();
      // No copy may land in the host buffer after this returns.
      backend_->WaitCopy(ticket).IgnoreError();
    }
  }
  // Steady-clock microseconds when the first stream started (0: none); read
  // after Finish.
  int64_t first_push_us() const { return first_push_us_; }

 private:
  void Loop() {
    ElementRange done{n_, n_};  // pushed: the chunks inside it
    while (done.begin > 0) {
      ElementRange range{0, n_};
      uint64_t ticket = 0;
      {
        absl::MutexLock lock(&mu_);
        while (!abandoned_ && ready_begin_ >= done.begin) cv_.Wait(&mu_);
        if (abandoned_) return;
        range.begin = ready_begin_;
        ticket = ready_ticket_;
      }
      status_ = backend_->WaitCopy(ticket);
      if (!status_.ok()) return;
      if (first_push_us_ == 0) first_push_us_ = NowMicros();
      status_ = ps_->PushChunks(step_, worker_id_, dp_rank_, grads_, range,
                                done);
      if (!status_.ok()) return;
      done = range;
    }
  }

  Backend* const backend_;
  PsClient* const ps_;
  const int64_t step_;
  const std::string worker_id_;
  const int dp_rank_;
  const float* const grads_;
  const int64_t n_;
  absl::Mutex mu_;
  absl::CondVar cv_;
  int64_t ready_begin_ ABSL_GUARDED_BY(mu_);
  uint64_t ready_ticket_ ABSL_GUARDED_BY(mu_) = 0;
  bool abandoned_ ABSL_GUARDED_BY(mu_) = false;
  // Written by the pushing thread, read after it is joined.
  absl::Status status_;
  int64_t first_push_us_ = 0;
  std::thread thread_;
};


OverlappedPush::OverlappedPush(Backend* backend, PsClient* ps, int64_t step,
                               const std::string& worker_id, int dp_rank,
                               const float* grads, float* host, int64_t n)
    : backend_(backend),
      ps_(ps),
      grads_(grads),
      host_(host),
      bytes_before_(ps->stats().bytes_pushed),
      pusher_(std::make_unique<SuffixPusher>(backend, ps, step, worker_id,
                                             dp_rank, host, n)),
      suffix_(n) {}

OverlappedPush::~OverlappedPush() { pusher_->Abandon(); }

absl::Status OverlappedPush::Ready(int64_t begin, int64_t end) {
  LMPS_ASSIGN_OR_RETURN(
      const uint64_t ticket,
      backend_->CopyToHostAsync(host_ + begin, grads_ + begin, end - begin));
  last_ticket_ = std::max(last_ticket_, ticket);
  overlapped_ = ps_->stats().bytes_pushed - bytes_before_;
  if (end == suffix_) {
    suffix_ = begin;
    pusher_->Ready(begin, last_ticket_);
  }
  return absl::OkStatus();
}

absl::Status OverlappedPush::Finish() {
  if (suffix_ > 0) {
    // Ranges that did not extend the suffix: copied again, all at once
    // (the pusher reads only host[suffix, n) until now).
    if (absl::Status s = backend_->CopyToHost(host_, grads_, suffix_);
        !s.ok()) {
      pusher_->Abandon();
      return s;
    }
  }
  return pusher_->Finish(last_ticket_);
}

int64_t OverlappedPush::first_push_us() const {
  return pusher_->first_push_us();
}

PinnedHostBuffers::PinnedHostBuffers(
    Backend* backend, std::vector<std::vector<float>*> buffers,
    const std::function<void(const std::string&)>& log)
    : backend_(backend) {
  for (std::vector<float>* buffer : buffers) {
    void* p = buffer->data();
    if (absl::Status s =
            backend_->PinHostMemory(p, buffer->size() * sizeof(float));
        !s.ok()) {
      log(absl::StrCat("cannot pin a host buffer (its copies are slower): ",
                       s.message()));
    } else {
      pinned_.push_back(p);
    }
  }
}

PinnedHostBuffers::~PinnedHostBuffers() {
  for (void* p : pinned_) backend_->UnpinHostMemory(p);
}

}  // namespace lmps
