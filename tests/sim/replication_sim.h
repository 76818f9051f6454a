// A deterministic simulation of a replicated job (layout.shard_backups = 1)
// under faults, FoundationDB-style: the real protocol code -- SchedulerCore
// (server/scheduler), ParameterShard and ReplicatedShard with its heartbeat
// side (server/), ShardFailover (worker/) -- runs on a SimWorld
// (tests/sim/sim_world.h) instead of gRPC, threads and the wall clock. The
// daemons' and workers' life cycles around that code are modelled here:
// servers register, wait for their assignment, serve and heartbeat every
// lease / 3, and a process that dies or is fenced is restarted (as
// lmps_local and Kubernetes do); workers pull, push, ask GradNorm and
// apply, step after step, failing over between a shard's nodes.
//
// One seed draws a fault schedule inside a window: SIGKILLs of server
// processes (restarted after a random delay), partitions between any two
// hosts, stalls (a process that answers nothing for longer than a lease,
// like a frozen VM), message drops, delays and reordering. Then every
// fault heals and the job must end.
//
// Invariants, checked after every event:
//  1. At most one process serves as primary of a shard in any epoch.
//  2. Every acknowledged Apply is on every node that later serves: a
//     primary answering a worker holds at least the highest acknowledged
//     version of its shard.
//  3. Liveness: once the faults stop, the job ends (FINISHED, or FAILED for
//     a rollback) within a bound; no worker gives up.
//  4. A FINISHED job's final parameters equal the fault-free run's, bit for
//     bit (parameters and optimizer state of every shard).
//  5. The job fails for a lost shard only when no live node the scheduler
//     can hear holds a complete copy of it.
//
// Thread-safety: none; one thread runs a simulation.
#ifndef LMPS_TESTS_SIM_REPLICATION_SIM_H_
#define LMPS_TESTS_SIM_REPLICATION_SIM_H_

#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace lmps {
namespace sim {

// Deliberate bugs in the simulated environment, to show that the
// invariants catch what they are meant to catch.
enum class Mutation {
  kNone,
  // Forwarded operations are acknowledged without reaching the backup.
  kLyingLink,
  // A backup a worker calls promotes itself (the protocol before epochs
  // issued by the scheduler).
  kSelfPromotion,
};

// Fixed fault schedules (instead of the seed's random one).
enum class Scenario {
  kRandom,
  // The split brain of an asynchronous design: primary and backup of shard
  // 0 are cut off from each other and worker 1 reaches only the backup,
  // while the primary still hears the scheduler and worker 0...
  kSplitBrainPrimaryHearsScheduler,
  // ...or is cut off from the scheduler too.
  kSplitBrainPrimaryIsolated,
};

struct SimOptions {
  uint64_t seed = 1;
  bool faults = true;
  Scenario scenario = Scenario::kRandom;
  Mutation mutation = Mutation::kNone;
  bool verbose = false;  // every log line on stderr
};

struct SimResult {
  bool ok = true;
  std::string violation;  // the first broken invariant, with context
  std::string outcome;    // "finished" or "rolled back: ..."
  std::vector<std::string> faults;  // the schedule, for the report
  int64_t events = 0;
  double sim_seconds = 0;
};

// Runs one seed. `reference` (may be empty) is the fault-free run's final
// state per shard (from RunReference), compared when the job finishes.
SimResult RunSeed(const SimOptions& options,
                  const std::map<int, std::string>& reference);
// The fault-free run's final state per shard.
std::map<int, std::string> RunReference();

}  // namespace sim
}  // namespace lmps

#endif  // LMPS_TESTS_SIM_REPLICATION_SIM_H_
