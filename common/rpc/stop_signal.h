// StopSignal: a daemon's stop request (SIGTERM, or a test) that also ends
// the blocking call in flight: the daemon registers what cancels it (its
// SchedulerClient's Cancel, its training loop's Cancel) with OnStop.
//
// Contract: Stop() marks the signal stopped (for good) and runs the
// registered callback once, then forgets it. OnStop(fn) replaces the
// callback; if the signal is already stopped, fn runs at once instead and
// is not kept. After OnStop(nullptr) returns, no callback is running and
// none will run. Callbacks run under the signal's lock: they must be quick
// and must not call this StopSignal.
//
// Thread-safety: every method may be called from any thread.
#ifndef LMPS_COMMON_RPC_STOP_SIGNAL_H_
#define LMPS_COMMON_RPC_STOP_SIGNAL_H_

#include <functional>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"

namespace lmps {

class StopSignal {
 public:
  void Stop();
  bool stopped() const;
  // Sleeps up to `d`; returns true if stopped.
  bool WaitFor(absl::Duration d) const;
  void OnStop(std::function<void()> on_stop);

 private:
  mutable absl::Mutex mu_;
  bool stopped_ ABSL_GUARDED_BY(mu_) = false;
  std::function<void()> on_stop_ ABSL_GUARDED_BY(mu_);
};

}  // namespace lmps

#endif  // LMPS_COMMON_RPC_STOP_SIGNAL_H_
