// Fault injection for the tests (lmps_local's --fault_* flags): which
// processes the launcher SIGKILLs, and when, as the job advances.
//
//   worker:   --fault_worker=W --fault_kill_at_step=N: worker W of the
//             first attempt gets --fault_kill_at_step=N (it kills itself
//             after pushing step N; see WorkerArgs).
//   shard:    --fault_kill_server=S --fault_kill_server_at_step=N: once the
//             slowest worker reaches N, server-S (first attempt only).
//   again:    --fault_kill_primary_again_at_step=M (shard_backups = 1): after
//             the shard fault, once the slowest worker reaches M and the
//             shard's other node holds a complete copy again, whichever node
//             then serves shard S as its primary.
//   scheduler: --fault_kill_scheduler_at_step=N: the scheduler, once.
//   freeze:   --fault_freeze_workers_at_step=N --fault_freeze_s=S: once the
//             slowest worker reaches N, SIGSTOP every worker, and SIGCONT
//             them S seconds later (first attempt only): alive workers
//             whose leases all expire at once.
//
// Each fault fires at most once per launcher, announced on stdout
// ("lmps: fault injection: SIGKILL ...", "... SIGSTOP ...") just before
// the signal.
//
// Thread-safety: not thread-safe; the launcher's monitor loop owns it.
#ifndef LMPS_LAUNCHER_FAULT_INJECTION_H_
#define LMPS_LAUNCHER_FAULT_INJECTION_H_

#include <functional>
#include <string>
#include <vector>

#include "absl/time/time.h"
#include "proto/lmps.pb.h"

namespace lmps {

struct FaultOptions {
  int worker = -1;                  // --fault_worker
  int worker_kill_at_step = -1;     // --fault_kill_at_step
  int server = -1;                  // --fault_kill_server
  int server_at_step = -1;          // --fault_kill_server_at_step
  int primary_again_at_step = -1;   // --fault_kill_primary_again_at_step
  int scheduler_at_step = -1;       // --fault_kill_scheduler_at_step
  int freeze_workers_at_step = -1;  // --fault_freeze_workers_at_step
  int freeze_s = 10;                // --fault_freeze_s
};

// The launcher's children by name ("scheduler", "server-0", a node id).
struct FaultTargets {
  // Whether a child of this name runs.
  std::function<bool(const std::string& name)> running;
  // SIGKILLs the running child of this name.
  std::function<void(const std::string& name)> kill;
  // Sends `signal` to every running worker; returns their names.
  std::function<std::vector<std::string>(int signal)> signal_workers;
};

class FaultInjector {
 public:
  explicit FaultInjector(const FaultOptions& options) : options_(options) {}

  // Extra flags for worker `rank` when the job starts (attempt 0 is the
  // first start; later attempts are restarts, which get none).
  std::vector<std::string> WorkerArgs(int rank, int attempt) const;

  // Injects the faults that `status` makes due at `now` (see above).
  void MaybeInject(const JobStatus& status, int attempt, absl::Time now,
                   const FaultTargets& targets);

  // The shard fault or the freeze is configured and not injected yet, or
  // the workers are frozen (the launcher then polls the job more often, to
  // hit the step and the thaw time).
  bool fault_pending() const {
    return (options_.server >= 0 && !server_injected_) ||
           (options_.freeze_workers_at_step >= 0 &&
            (!froze_ || thaw_at_ != absl::InfiniteFuture()));
  }

 private:
  const FaultOptions options_;
  bool server_injected_ = false;
  bool scheduler_injected_ = false;
  bool second_injected_ = false;  // primary_again_at_step
  bool froze_ = false;
  absl::Time thaw_at_ = absl::InfiniteFuture();  // while frozen
};

}  // namespace lmps

#endif  // LMPS_LAUNCHER_FAULT_INJECTION_H_
