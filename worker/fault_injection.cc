#include "worker/fault_injection.h"

#include <atomic>
#include <csignal>
#include <memory>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"

namespace lmps {

std::function<void(int, int64_t, bool)> KillMidPush(int64_t kill_step,
                                                   FaultLog log) {
  // Shards other than 0 whose push of kill_step was accepted: the log line
  // says where the kill landed, and tests check it (0: between shard 0's
  // push and the others').
  auto others_accepted = std::make_shared<std::atomic<int>>(0);
  return [log = std::move(log), kill_step, others_accepted](
             int shard, int64_t step, bool accepted) {
    if (step != kill_step) return;
    if (shard != 0) {
      if (accepted) {
        ++*others_accepted;
      } else {
        // Hold the other shards' pushes so the kill lands mid-push.
        absl::SleepFor(absl::Seconds(5));
      }
      return;
    }
    if (!accepted) return;
    log(absl::StrCat("fault injection: SIGKILL mid-push of step ", step,
                     ": shard 0 accepted its push, ", others_accepted->load(),
                     " other shards had accepted theirs"));
    raise(SIGKILL);
  };
}

std::function<void(int64_t)> KillAtStepStart(int64_t kill_step, FaultLog log) {
  return [log = std::move(log), kill_step](int64_t step) {
    if (step != kill_step) return;
    log(absl::StrCat("fault injection: SIGKILL at the start of step ", step));
    raise(SIGKILL);
  };
}

}  // namespace lmps
