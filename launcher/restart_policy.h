// RestartPolicy: what lmps_local does when one of its processes exits with
// an error (a process that succeeded, or that the launcher killed on
// purpose, needs nothing). The process's name says its role: "scheduler",
// "server-<s>" and "backup-<s>" (a shard's nodes), "worker-..." (a worker
// slot, an elastic extra or a spare), anything else ("export", "sample").
// The rules, first match wins (none matches once interrupted: kFail):
//
//   0. the scheduler or a shard's node that exited with kExitInvalidInput
//      (its flags, configuration or input, e.g. an --init_from file that
//      does not fit the model, are invalid): kFail at once, since a restart,
//      of it or of the job, would fail the same way;
//   1. the scheduler, restarted up to --restart_scheduler times
//      (kRestartScheduler): the nodes rejoin it;
//   2. a shard's node of a replicated job (shard_backups = 1), restarted up
//      to kMaxBackupRestarts times (kRestartAsBackup): the shard's other
//      node serves on and the restarted process becomes its backup;
//   3. a worker of a pipeline job (pp * tp > 1) with the elastic scheduler,
//      while dp is above --elastic_min_dp (kDropReplica): the scheduler
//      drops its whole replica;
//   4. any other shard's node (not replicated, or out of restarts), or a
//      pipeline worker out of replacements with no spare left, while
//      --restart_job allows (kRestartJob): the whole job restarts from its
//      latest checkpoint;
//   5. a worker, replaced up to --restart_workers times per slot
//      (kReplaceWorker), without the fault injected into it
//      (WithoutFaultFlags);
//   6. a worker with the elastic scheduler (kAwaitElasticShrink): the
//      scheduler shrinks dp unless a worker takes its slot;
//   7. a worker while a spare is left (kAwaitSpare): a spare takes its slot;
//   8. otherwise kFail: the launcher stops and names the process.
//
// Before deciding for a worker, or for a shard's node of a replicated job,
// the launcher asks the scheduler whether the job FAILED
// (ChecksJobFailedFirst): a failed job restarts nothing.
//
// The policy only decides; the launcher acts (and counts: the restarts of
// each process, the job's attempts, the spares and replicas left).
//
// Thread-safety: immutable after construction; every method is const and
// may be called from any thread.
#ifndef LMPS_LAUNCHER_RESTART_POLICY_H_
#define LMPS_LAUNCHER_RESTART_POLICY_H_

#include <string>
#include <vector>

namespace lmps {

// The exit code of the daemons (scheduler, server, worker) when their flags,
// configuration or input are invalid (an InvalidArgument error at start).
inline constexpr int kExitInvalidInput = 2;

// The limits, from lmps_local's flags of the same names.
struct RestartLimits {
  int restart_scheduler = 3;  // restarts of the scheduler
  int restart_workers = 3;    // replacements per worker slot
  int restart_job = 3;        // restarts of the whole job
  int elastic_min_dp = 1;     // the elastic scheduler's smallest dp
};

// The job when the process exited.
struct JobRestartState {
  bool replicated = false;         // every shard has a backup
  bool pipeline = false;           // pp * tp > 1
  bool elastic_scheduler = false;  // --elastic_max_dp > 0
  int elastic_dp = 0;              // the replicas the launcher aims for
  int spares_available = 0;        // spare workers not yet used
  int attempt = 0;                 // restarts of the job so far
  bool interrupted = false;        // SIGINT or SIGTERM received
};

enum class RestartAction {
  kRestartScheduler,    // restart it on the same address
  kRestartAsBackup,     // restart it; it becomes its shard's backup
  kDropReplica,         // dp - 1: the elastic scheduler drops the replica
  kRestartJob,          // restart the job from its latest checkpoint
  kReplaceWorker,       // start a replacement in its slot
  kAwaitElasticShrink,  // the elastic scheduler shrinks dp
  kAwaitSpare,          // a spare takes its slot (one spare fewer)
  kFail,                // stop the job with an error naming the process
};

class RestartPolicy {
 public:
  // Restarts of one node of a replicated shard.
  static constexpr int kMaxBackupRestarts = 5;

  explicit RestartPolicy(const RestartLimits& limits) : limits_(limits) {}

  // Whether to ask the scheduler if the job FAILED before Decide().
  bool ChecksJobFailedFirst(const std::string& name,
                            const JobRestartState& job) const;

  // What to do for process `name`, restarted `restarts` times so far,
  // which exited with an error: exit code `exit_code` (-1: killed by a
  // signal).
  RestartAction Decide(const std::string& name, int restarts,
                       const JobRestartState& job, int exit_code = 1) const;

  const RestartLimits& limits() const { return limits_; }

 private:
  const RestartLimits limits_;
};

// A worker's arguments for its replacement: `args` without the fault
// injection flags (--fault_*), so a replacement does not die the same way.
std::vector<std::string> WithoutFaultFlags(
    const std::vector<std::string>& args);

}  // namespace lmps

#endif  // LMPS_LAUNCHER_RESTART_POLICY_H_
