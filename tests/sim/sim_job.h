// The simulated job of tests/sim/replication_sim.h: the model of the
// daemons' and workers' life cycles around the real protocol code, split
// over sim_job_servers.cc (parameter-server processes, forwarding),
// sim_job_workers.cc (the workers' step loop and failover) and
// replication_sim.cc (fault schedule, invariants, the run). Internal to
// tests/sim.
//
// Thread-safety: none; one thread runs a Job.
#ifndef LMPS_TESTS_SIM_SIM_JOB_H_
#define LMPS_TESTS_SIM_SIM_JOB_H_

#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "proto/lmps.pb.h"
#include "server/replication.h"
#include "server/scheduler/scheduler_core.h"
#include "server/shard.h"
#include "tests/sim/replication_sim.h"
#include "tests/sim/sim_world.h"
#include "worker/shard_failover.h"

namespace lmps {
namespace sim {

constexpr int kShards = 2;
constexpr int kDp = 2;
constexpr int kSteps = 16;
constexpr absl::Duration kLease = absl::Milliseconds(200);
constexpr absl::Duration kTick = absl::Milliseconds(20);
// A call to a dead or unreachable host fails after this (connection
// refused / reset); one whose answer never comes, after kRpcTimeout.
constexpr absl::Duration kConnectFail = absl::Milliseconds(5);
constexpr absl::Duration kRpcTimeout = absl::Milliseconds(40);
constexpr absl::Duration kNotReadyRetry = absl::Milliseconds(1);
constexpr absl::Duration kFailoverTimeout = absl::Seconds(20);
constexpr absl::Duration kLiveness = absl::Seconds(30);
inline constexpr char kScheduler[] = "scheduler";

// The job: 2 workers, 2 replicated shards, kSteps SYNC steps.
JobSpec Spec();
// "server-1#3" -> "server-1".
std::string HostOf(const std::string& address);
// Version, parameters and optimizer state of a shard, as bytes.
std::string StateBytes(const ParameterShard& shard);

// One process of a parameter server (an incarnation on its host).
struct ServerProc {
  std::string host;     // "server-1", "backup-1": where it runs
  std::string address;  // host#incarnation
  bool backup_flag = false;  // --backup
  int shard = 0;
  bool alive = true;
  bool registered = false;
  std::string node_id;
  int64_t incarnation = 0;
  absl::Time assignment_asked;
  std::unique_ptr<ParameterShard> shard_state;
  std::unique_ptr<ReplicatedShard> rep;
};

enum class Phase { kPull, kPush, kGradNorm, kApply, kDone };

const char* PhaseName(Phase p);

struct WorkerProc {
  int rank = 0;
  std::string host;
  std::string node_id;
  bool assigned = false;
  std::vector<ShardFailover> failover;
  int64_t step = 0;
  Phase phase = Phase::kPull;
  int pending = 0;
  std::vector<uint64_t> inflight;  // per shard: the attempt awaited, 0: none
  // Per shard: (tensor, chunk) -> pulled parameters.
  std::vector<std::map<std::pair<std::string, int>, std::vector<float>>> params;
  std::vector<double> sum_squares;
  uint64_t attempts = 0;
  std::string gave_up;
};

// What a server answers a worker's call.
struct Answer {
  absl::Status status;
  std::vector<PullResponse> pull;
  double sum_squares = 0;
  int64_t version = 0;
};

class Job;

class SimLink final : public BackupLink {
 public:
  SimLink(Job* job, std::string from_host, std::string to)
      : job_(job), from_host_(std::move(from_host)), to_(std::move(to)) {}
  absl::StatusOr<ReplicateResponse> Replicate(
      const std::vector<ReplicateRequest>& stream) override;
  std::string address() const override { return to_; }

 private:
  Job* const job_;
  const std::string from_host_;
  const std::string to_;
};

class Job {
 public:
  Job(const SimOptions& options, const std::map<int, std::string>& reference)
      : options_(options), reference_(reference), world_(options.seed) {}

  SimResult Run();
  absl::StatusOr<ReplicateResponse> Forward(
      const std::string& from_host, const std::string& to,
      const std::vector<ReplicateRequest>& stream);
  std::map<int, std::string> FinalStates() const { return final_states_; }

 private:
  void Log(const std::string& line);
  void Violation(const std::string& what);
  bool Terminal() { return core_->CurrentState() == FINISHED ||
                           core_->CurrentState() == FAILED; }
  bool Stalled(const std::string& host) const {
    auto it = stalled_until_.find(host);
    return it != stalled_until_.end() && world_.now() < it->second;
  }
  // Runs `fn` on `host` now, or when its stall ends.
  void OnHost(const std::string& host, std::function<void()> fn);

  // Servers.
  void StartServer(const std::string& host, bool backup_flag, int shard);
  void Register(std::shared_ptr<ServerProc> p);
  void RequestAssignment(std::shared_ptr<ServerProc> p);
  void Serve(std::shared_ptr<ServerProc> p, const Assignment& a);
  void ServerHeartbeat(std::shared_ptr<ServerProc> p);
  void Exit(std::shared_ptr<ServerProc> p, const std::string& why,
            absl::Duration restart_after);
  std::shared_ptr<ServerProc> Proc(const std::string& address) const {
    auto it = procs_.find(address);
    return it == procs_.end() ? nullptr : it->second;
  }

  // Workers.
  void StartWorker(int rank);
  void WorkerHeartbeat(WorkerProc* w);
  void StartPhase(WorkerProc* w);
  void Attempt(WorkerProc* w, int k);
  Answer Handle(const std::string& address, int k, Phase phase, int64_t step,
                int rank, const std::vector<PushRequest>& push,
                double global_sum_squares);
  void OnResult(WorkerProc* w, int k, Answer answer);
  std::vector<PushRequest> Gradient(const WorkerProc& w, int k) const;
  absl::StatusOr<ShardFailover::Nodes> Resolve(WorkerProc* w, int k);

  void ScheduleFaults();
  void CheckInvariants();
  void CheckFailure();
  std::string Describe();

  const SimOptions options_;
  const std::map<int, std::string>& reference_;
  SimWorld world_;
  JobSpec spec_;
  PartitionMap map_;
  std::unique_ptr<SchedulerCore> core_;
  std::map<std::string, std::shared_ptr<ServerProc>> procs_;  // by address
  std::map<std::string, int> incarnations_;                   // by host
  std::map<std::string, std::string> current_;  // host -> live address
  std::map<std::string, absl::Time> stalled_until_;
  std::vector<std::unique_ptr<WorkerProc>> workers_;
  std::vector<int64_t> acked_version_ = std::vector<int64_t>(kShards, 0);
  // (shard, epoch) -> the address that served as primary in it.
  std::map<std::pair<int, int64_t>, std::string> primary_of_epoch_;
  std::deque<std::string> log_;
  std::vector<std::string> faults_;
  std::string violation_;
  bool failure_checked_ = false;
  absl::Time heal_at_;
  std::map<int, std::string> final_states_;
};


}  // namespace sim
}  // namespace lmps

#endif  // LMPS_TESTS_SIM_SIM_JOB_H_
