// Private to the scheduler core library (the :scheduler_core cc_library:
// scheduler_core.cc, scheduler_slots.cc, scheduler_register.cc,
// scheduler_liveness.cc, scheduler_elastic.cc). Include it nowhere else; the
// public interface is scheduler_core.h.
//
// The definitions of SchedulerCore's private nested types, which every part
// of the core reads and writes:
//  - Node: one slot of the node table (a shard's server slot or a worker
//    rank) and the node currently holding it;
//  - Pending: a GetAssignment waiting for the job to assemble;
//  - Outbox: effects (log lines, GetAssignment completions) gathered under
//    the lock and carried out by SchedulerCore::Flush after it is released;
// and the small text helpers the parts share.
//
// Thread-safety: Nodes and Pendings live in members guarded by
// SchedulerCore::mu_ and are touched only with it held. An Outbox belongs to
// the one call that fills it (under the lock) and flushes it (without it).
// The free functions are pure.
#ifndef LMPS_SERVER_SCHEDULER_SCHEDULER_CORE_INTERNAL_H_
#define LMPS_SERVER_SCHEDULER_SCHEDULER_CORE_INTERNAL_H_

#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "proto/lmps.pb.h"
#include "server/scheduler/scheduler_core.h"
#include "server/scheduler/start_step.h"

namespace lmps {
namespace scheduler_internal {

inline constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

// "120s", "0.25s", "12.345s".
inline std::string Seconds(absl::Duration d) {
  const double s = std::round(absl::ToDoubleSeconds(d) * 1000) / 1000;
  return absl::StrCat(s, "s");
}

// `noun`, with an "s" unless n == 1.
inline std::string Plural(int n, absl::string_view noun) {
  return absl::StrCat(noun, n == 1 ? "" : "s");
}

// FINISHED and FAILED: the job has ended.
inline bool Terminal(JobState s) { return s == FINISHED || s == FAILED; }

}  // namespace scheduler_internal

// One slot of the job: a shard or a worker rank, and the node holding it.
struct SchedulerCore::Node {
  // Fixed per slot.
  std::string node_id;
  Role role = ROLE_UNSPECIFIED;
  int shard = -1;
  int rank = -1;  // workers
  WorkerCoords coords;  // ParallelLayout::Coords(rank)
  bool backup_slot = false;  // servers of a replicated job: "backup-<shard>"

  // The node currently holding the slot.
  bool registered = false;
  std::string address;
  std::string hostname;
  ShardCheckpoints checkpoints;
  absl::Time registered_at;
  absl::Time last_heartbeat;  // or registration time
  absl::Time lease_start;     // max(last heartbeat, registration, assembly)
  int64_t step = 0;
  float loss = scheduler_internal::kNaN;
  float eval_loss = scheduler_internal::kNaN;
  double tokens_per_second = 0;
  int64_t push_wire_bytes = 0;  // workers: the last step's push
  int64_t pull_wire_bytes = 0;  // workers: the last step's pull
  float lr = 0;                 // workers: the last step's learning rate
  bool alive = true;
  bool done = false;
  std::string error;
  JobState last_told = JOB_STATE_UNSPECIFIED;  // in a HeartbeatResponse
  // Replicated servers: joined a running job as the backup (gets a
  // snapshot).
  bool needs_snapshot = false;
  bool stopped_for_resize = false;  // workers: stopped at a resize boundary
  int64_t incarnation = 0;  // of the registration holding the slot
  absl::Time down_since = absl::InfinitePast();  // InfinitePast: healthy
  std::string last_event;

  // "worker-1 (127.0.0.1:5000)" or "worker-1 (host hostname)".
  std::string Describe() const {
    if (!address.empty()) return absl::StrCat(node_id, " (", address, ")");
    if (!hostname.empty()) return absl::StrCat(node_id, " (host ", hostname, ")");
    return node_id;
  }

  // Empties the slot's progress for a new node.
  void Reset() {
    step = 0;
    loss = scheduler_internal::kNaN;
    eval_loss = scheduler_internal::kNaN;
    tokens_per_second = 0;
    push_wire_bytes = 0;
    pull_wire_bytes = 0;
    lr = 0;
    alive = true;
    done = false;
    error.clear();
    last_told = JOB_STATE_UNSPECIFIED;
    down_since = absl::InfinitePast();
    needs_snapshot = false;
    stopped_for_resize = false;
  }
};

struct SchedulerCore::Pending {
  std::string node_id;
  absl::Time deadline;
  AssignmentCallback done;
};

// Effects gathered under the lock and carried out after it is released.
struct SchedulerCore::Outbox {
  std::vector<std::string> logs;
  std::vector<std::pair<AssignmentCallback, absl::StatusOr<Assignment>>>
      completions;
};

}  // namespace lmps

#endif  // LMPS_SERVER_SCHEDULER_SCHEDULER_CORE_INTERNAL_H_
