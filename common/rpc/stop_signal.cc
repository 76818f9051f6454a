#include "common/rpc/stop_signal.h"

#include <utility>

namespace lmps {

void StopSignal::Stop() {
  absl::MutexLock lock(&mu_);
  stopped_ = true;
  if (on_stop_) {
    on_stop_();
    on_stop_ = nullptr;
  }
}

bool StopSignal::stopped() const {
  absl::MutexLock lock(&mu_);
  return stopped_;
}

bool StopSignal::WaitFor(absl::Duration d) const {
  absl::MutexLock lock(&mu_);
  return mu_.AwaitWithTimeout(absl::Condition(&stopped_), d);
}

void StopSignal::OnStop(std::function<void()> on_stop) {
  absl::MutexLock lock(&mu_);
  if (stopped_) {
    on_stop_ = nullptr;
    if (on_stop) on_stop();
    return;
  }
  on_stop_ = std::move(on_stop);
}

}  // namespace lmps
