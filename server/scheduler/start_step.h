// The resume step of a job: the latest checkpoint step that every parameter
// server can load (ChooseStartStep), and the explanation of that choice for
// the scheduler's log (ExplainStartStep). SchedulerCore (scheduler_core.h,
// "Resume step") recomputes it from every server's registration until the
// job assembles.
//
// Thread-safety: ShardCheckpoints is a plain value; the functions are pure
// (no state, no I/O) and safe to call from any thread.
#ifndef LMPS_SERVER_SCHEDULER_START_STEP_H_
#define LMPS_SERVER_SCHEDULER_START_STEP_H_

#include <cstdint>
#include <string>
#include <vector>

namespace lmps {

// What one server reported about its checkpoints at registration.
struct ShardCheckpoints {
  std::vector<int64_t> steps;  // its own shard file is complete
  uint64_t partition_version = 0;  // of `steps`
  // Every shard file of the writing layout is in its directory (any layout).
  std::vector<int64_t> relayout_steps;
};

// The largest step every element of `shards` can load: present in its
// `steps` when its partition_version equals `partition_version`, or in its
// `relayout_steps` (any version). 0 if there is no such step (or `shards` is
// empty). Negative steps are ignored.
int64_t ChooseStartStep(const std::vector<ShardCheckpoints>& shards,
                        uint64_t partition_version);

// Why `step` (ChooseStartStep(shards, partition_version)) is the start step,
// for the log line "start_step = <step> (<why>)": every shard holds it in its
// own files; or the shards (by index) that load it from the complete set of
// the writing layout's files; or, for 0, that some shard holds checkpoints of
// another partition but no step has every old shard file reachable from every
// server; or that no step is common to every shard.
std::string ExplainStartStep(const std::vector<ShardCheckpoints>& shards,
                             uint64_t partition_version, int64_t step);

}  // namespace lmps

#endif  // LMPS_SERVER_SCHEDULER_START_STEP_H_
