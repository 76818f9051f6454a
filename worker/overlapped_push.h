// OverlappedPush: pushes one step's gradient to the parameter servers while
// the backward pass that computes it still runs.
//
// A model's backward pass reports each range of its gradient buffer as it
// becomes final (GptModel / StageModel GradientReadyFn: ln_f, then the
// blocks from the last to the first, then the embeddings, so the final part
// grows as a suffix of the buffer). Ready(begin, end) copies the range to
// the host with Backend::CopyToHostAsync (on a device the copy runs while
// the following blocks compute) and, when it extends the final suffix,
// hands the suffix to a pushing thread, which waits for the copy
// (Backend::WaitCopy) and pushes the chunks lying inside it
// (PsClient::PushChunks: every chunk exactly once, with final values, so
// the result is bit-identical to pushing after the pass). Finish() copies
// the ranges that did not extend the suffix (wte on a last pipeline stage:
// final early but at the front) and pushes the rest. Chunks pushed before
// an error stay pushed (final values: a retried step counts them as
// duplicates); nothing that is not final is pushed.
//
// Thread-safety: Ready, Finish and the destructor on one thread (the
// trainer's); `ps` is used by the pushing thread until Finish returns or
// the object is destroyed.
#ifndef LMPS_WORKER_OVERLAPPED_PUSH_H_
#define LMPS_WORKER_OVERLAPPED_PUSH_H_

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "worker/backend/backend.h"
#include "worker/ps_client.h"

namespace lmps {

class SuffixPusher;  // overlapped_push.cc

class OverlappedPush {
 public:
  // `grads`: the model's gradient buffer (backend memory) and `host` the
  // host buffer receiving it, n floats each (with a PsClient view: the
  // worker's local buffers). Every pointer must outlive the object.
  OverlappedPush(Backend* backend, PsClient* ps, int64_t step,
                 const std::string& worker_id, int dp_rank,
                 const float* grads, float* host, int64_t n);
  OverlappedPush(const OverlappedPush&) = delete;
  OverlappedPush& operator=(const OverlappedPush&) = delete;
  // Without Finish (the pass failed): stops pushing, waits for the copies.
  ~OverlappedPush();

  // The GradientReadyFn of the backward pass: grads[begin, end) is final.
  absl::Status Ready(int64_t begin, int64_t end);
  // After the pass succeeded: pushes everything not pushed yet and waits.
  // The first copy or push error.
  absl::Status Finish();

  // Payload bytes pushed before the pass's last range was final.
  int64_t overlapped_bytes() const { return overlapped_; }
  // Steady-clock microseconds when the first push started (0: none); read
  // after Finish.
  int64_t first_push_us() const;

 private:
  Backend* const backend_;
  PsClient* const ps_;
  const float* const grads_;
  float* const host_;
  const int64_t bytes_before_;
  std::unique_ptr<SuffixPusher> pusher_;
  int64_t suffix_;  // host_[suffix_, n) is final and handed to the pusher
  uint64_t last_ticket_ = 0;
  int64_t overlapped_ = 0;
};

// Page-locks host buffers (Backend::PinHostMemory) for the object's
// lifetime, so a device backend's copies to and from them are direct,
// asynchronous DMA; a no-op on the CPU. A buffer that cannot be pinned is
// only copied more slowly (`log` says so). Declare it after the buffers it
// pins, so that it unpins them before they are freed.
class PinnedHostBuffers {
 public:
  // The float vectors' current storage (do not resize them afterwards).
  PinnedHostBuffers(Backend* backend, std::vector<std::vector<float>*> buffers,
                    const std::function<void(const std::string&)>& log);
  PinnedHostBuffers(const PinnedHostBuffers&) = delete;
  PinnedHostBuffers& operator=(const PinnedHostBuffers&) = delete;
  ~PinnedHostBuffers();

 private:
  Backend* const backend_;
  std::vector<void*> pinned_;
};

}  // namespace lmps

#endif  // LMPS_WORKER_OVERLAPPED_PUSH_H_
