// Fault-injection hooks of `lmps_worker --fault_kill_at_step=N` (the
// fault-tolerance tests; launcher --fault_worker): the worker logs one line
// saying where the kill lands, then SIGKILLs itself. Test-only behaviour.
//
// Thread-safety: the returned hooks may be called from several threads at
// once (PsClient calls on_shard_push from its per-shard threads).
#ifndef LMPS_WORKER_FAULT_INJECTION_H_
#define LMPS_WORKER_FAULT_INJECTION_H_

#include <cstdint>
#include <functional>
#include <string>

namespace lmps {

using FaultLog = std::function<void(const std::string& line)>;

// A PsClientOptions::on_shard_push hook (data parallel): during the push of
// `kill_step`, holds the other shards' pushes (5 s) and dies once shard 0
// accepted its part, so the kill lands mid-push; the log line counts the
// other shards that had accepted theirs.
std::function<void(int shard, int64_t step, bool accepted)> KillMidPush(
    int64_t kill_step, FaultLog log);

// A PipelineTrainer on_step_start hook: dies as the schedule of `kill_step`
// starts, leaving the stage and tensor-parallel partners mid-step.
std::function<void(int64_t step)> KillAtStepStart(int64_t kill_step,
                                                  FaultLog log);

}  // namespace lmps

#endif  // LMPS_WORKER_FAULT_INJECTION_H_
