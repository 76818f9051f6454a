// Reporting the parts of a gradient buffer that a backward pass has
// finished, shared by GptModel and StageModel.
//
// A backward pass runs from the end of the parameter buffer (ln_f, the
// last block) to its front (the embeddings), so the finished part is a
// suffix that grows: GradientSuffix turns "everything from `begin` on is
// final" into calls of the caller's GradientReadyFn with the new range
// only. Not thread-safe (one backward pass).
#ifndef LMPS_WORKER_MODEL_GRADIENT_READY_H_
#define LMPS_WORKER_MODEL_GRADIENT_READY_H_

#include <cstdint>
#include <functional>

#include "absl/status/status.h"

namespace lmps {

// Called by a model's Backward each time grads()[begin, end) has received
// its last contribution of that Backward (see GptModel::Backward). A non-OK
// status stops the pass, which returns it.
using GradientReadyFn = std::function<absl::Status(int64_t begin, int64_t end)>;

class GradientSuffix {
 public:
  // A buffer of n elements, nothing final yet; `on_ready` may be empty and
  // must outlive the object.
  GradientSuffix(int64_t n, const GradientReadyFn& on_ready)
      : done_from_(n), on_ready_(on_ready) {}

  // [begin, n) is final: reports [begin, previous begin) unless empty.
  absl::Status DoneFrom(int64_t begin) {
    const int64_t end = done_from_;
    done_from_ = begin;
    if (!on_ready_ || begin == end) return absl::OkStatus();
    return on_ready_(begin, end);
  }

 private:
  int64_t done_from_;
  const GradientReadyFn& on_ready_;
};

}  // namespace lmps

#endif  // LMPS_WORKER_MODEL_GRADIENT_READY_H_
