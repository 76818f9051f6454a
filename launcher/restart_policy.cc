#include "launcher/restart_policy.h"

namespace lmps {
namespace {

bool StartsWith(const std::string& name, const char* prefix) {
  return name.rfind(prefix, 0) == 0;
}

bool IsShardNode(const std::string& name) {
  return StartsWith(name, "server") || StartsWith(name, "backup");
}

bool IsWorker(const std::string& name) { return StartsWith(name, "worker"); }

}  // namespace

bool RestartPolicy::ChecksJobFailedFirst(const std::string& name,
                                         const JobRestartState& job) const {
  return (IsShardNode(name) && job.replicated) || IsWorker(name);
}

RestartAction RestartPolicy::Decide(const std::string& name, int restarts,
                                    const JobRestartState& job,
                                    int exit_code) const {
  if (job.interrupted) return RestartAction::kFail;
  if (exit_code == kExitInvalidInput &&
      (name == "scheduler" || IsShardNode(name))) {
    // Invalid flags, configuration or input: it would fail the same way
    // again. (Workers also exit with it, but a worker's InvalidArgument
    // can come from a shard refusing one push: rules 3-8 decide for them.)
    return RestartAction::kFail;
  }
  if (name == "scheduler" && restarts < limits_.restart_scheduler) {
    // Its state is rebuilt from the nodes: they keep training and rejoin
    // the new scheduler on the same address.
    return RestartAction::kRestartScheduler;
  }
  const bool server = IsShardNode(name);
  const bool worker = IsWorker(name);
  if (server && job.replicated && restarts < kMaxBackupRestarts) {
    // Replicated shards: the other node of the shard serves on (the
    // workers fail over to it); the restarted process registers again
    // and becomes the shard's new backup, with a snapshot.
    return RestartAction::kRestartAsBackup;
  }
  if (worker && job.pipeline && job.elastic_scheduler &&
      job.elastic_dp > limits_.elastic_min_dp) {
    // Its stage and tensor-parallel partners cannot go on without it: the
    // elastic scheduler drops its whole replica (dp - 1) at the step it
    // died in, and the partners register again.
    return RestartAction::kDropReplica;
  }
  // Pipeline workers are replaced too (the scheduler regroups the job at
  // the step in progress); out of replacements and spares, the job
  // restarts.
  const bool lost_worker_of_pipeline = job.pipeline && worker &&
                                       restarts >= limits_.restart_workers &&
                                       job.spares_available == 0;
  if ((server || lost_worker_of_pipeline) &&
      job.attempt < limits_.restart_job) {
    return RestartAction::kRestartJob;
  }
  if (worker && restarts < limits_.restart_workers) {
    // Workers are stateless: a replacement takes the dead one's slot once
    // its lease expires and redoes exactly the lost work (a pipeline
    // replica: the step in progress, after the scheduler's regroup).
    return RestartAction::kReplaceWorker;
  }
  if (worker && job.elastic_scheduler) {
    return RestartAction::kAwaitElasticShrink;
  }
  if (worker && job.spares_available > 0) return RestartAction::kAwaitSpare;
  return RestartAction::kFail;
}

std::vector<std::string> WithoutFaultFlags(
    const std::vector<std::string>& args) {
  std::vector<std::string> out;
  for (const std::string& a : args) {
    if (a.rfind("--fault_", 0) != 0) out.push_back(a);
  }
  return out;
}

}  // namespace lmps
