// Helpers of the SchedulerCore tests (scheduler_core_test.cc,
// scheduler_faults_test.cc): small jobs, registration and heartbeat
// requests, and the fixture with a fake clock. Test-only.
#ifndef LMPS_SERVER_SCHEDULER_SCHEDULER_CORE_TEST_UTIL_H_
#define LMPS_SERVER_SCHEDULER_SCHEDULER_CORE_TEST_UTIL_H_

#include "server/scheduler/scheduler_core.h"

#include <cmath>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/synchronization/mutex.h"
#include "common/model/job_spec.h"
#include "common/model/partition.h"
#include "common/rpc/status_util.h"
#include "gtest/gtest.h"
#include "server/scheduler/clock.h"

namespace lmps {
namespace scheduler_test {


inline JobSpec Spec(int dp, int shards) {
  absl::StatusOr<JobSpec> spec = ParseJobSpec(R"pb(
    model { n_layer: 2 n_head: 2 n_embd: 32 block_size: 16 }
    max_chunk_bytes: 2048
  )pb");
  EXPECT_TRUE(spec.ok()) << spec.status();
  spec->mutable_layout()->set_dp(dp);
  spec->mutable_layout()->set_num_shards(shards);
  return *spec;
}

inline RegisterRequest Server(const std::string& address,
                              int requested = -1,
                              std::vector<int64_t> steps = {},
                              uint64_t version = 0) {
  RegisterRequest r;
  r.set_role(SERVER);
  r.set_address(address);
  r.set_requested_rank(requested);
  for (int64_t s : steps) r.add_checkpoint_steps(s);
  r.set_checkpoint_partition_version(version);
  return r;
}

inline RegisterRequest Worker(const std::string& hostname) {
  RegisterRequest r;
  r.set_role(WORKER);
  r.set_hostname(hostname);
  r.set_requested_rank(-1);
  return r;
}

inline HeartbeatRequest Beat(const std::string& id, int64_t step = 0) {
  HeartbeatRequest h;
  h.set_node_id(id);
  h.set_step(step);
  h.set_loss(2.5f);
  h.set_eval_loss(NAN);
  h.set_tokens_per_second(1000);
  return h;
}

// Captures the result of GetAssignmentAsync.
struct Captured {
  absl::Mutex mu;
  std::optional<absl::StatusOr<Assignment>> result ABSL_GUARDED_BY(mu);

  SchedulerCore::AssignmentCallback Callback() {
    return [this](absl::StatusOr<Assignment> r) {
      absl::MutexLock lock(&mu);
      EXPECT_FALSE(result.has_value()) << "callback called twice";
      result = std::move(r);
    };
  }
  bool has() {
    absl::MutexLock lock(&mu);
    return result.has_value();
  }
  absl::StatusOr<Assignment> get() {
    absl::MutexLock lock(&mu);
    return *result;
  }
};

class SchedulerCoreTest : public ::testing::Test {
 protected:
  void Start(int dp, int shards, absl::Duration assemble = absl::Seconds(120),
             absl::Duration lease = absl::Seconds(10), int backups = 0,
             ElasticOptions elastic = {}, int pp = 1) {
    SchedulerOptions options;
    options.elastic = elastic;
    options.spec = Spec(dp, shards);
    options.spec.mutable_layout()->set_pp(pp);
    // Elastic tests resize between dp 1 and 3: a batch all of them divide.
    if (elastic.max_dp > 0 || pp > 1) {
      options.spec.mutable_train()->set_batch_size(12);
      options.spec.mutable_train()->set_micro_batches(2);
    }
    options.spec.mutable_layout()->set_shard_backups(backups);
    options.assemble_timeout = assemble;
    options.lease = lease;
    options.log = [this](absl::string_view line) {
      absl::MutexLock lock(&log_mu_);
      log_.emplace_back(line);
    };
    auto core = SchedulerCore::Create(options, &clock_);
    ASSERT_TRUE(core.ok()) << core.status();
    core_ = std::move(*core);
  }

  std::string Id(const RegisterRequest& r) {
    absl::StatusOr<RegisterResponse> resp = core_->Register(r);
    EXPECT_TRUE(resp.ok()) << resp.status();
    return resp.ok() ? resp->node_id() : "";
  }

  // Registers servers 127.0.0.1:4000+i and workers host-i: a running job.
  void Assemble(int dp, int shards) {
    Start(dp, shards);
    for (int i = 0; i < shards; ++i) {
      Id(Server(absl::StrCat("127.0.0.1:", 4000 + i)));
    }
    for (int i = 0; i < dp; ++i) Id(Worker(absl::StrCat("host-", i)));
    ASSERT_EQ(core_->CurrentState(), RUNNING);
  }

  // A pipeline worker (pp rank `rank`) with its peer address.
  static RegisterRequest PipelineWorker(const std::string& address,
                                        int rank) {
    RegisterRequest r = Worker("host");
    r.set_address(address);
    r.set_requested_rank(rank);
    return r;
  }

  // A running pp = 2 job (lease 10 s): server s:1, pipeline workers h0:1
  // (rank 0) and h1:1 (rank 1). Returns rank 0's node id.
  std::string StartPipelineJob() {
    Start(/*dp=*/1, /*shards=*/1, absl::Seconds(120), absl::Seconds(10), 0,
          {}, /*pp=*/2);
    Id(Server("s:1", 0));
    const std::string first = Id(PipelineWorker("h0:1", 0));
    Id(PipelineWorker("h1:1", 1));
    return first;
  }

  // A replicated job of one shard (primary p:1, backup b:1) and a worker.
  void StartReplicatedJob() {
    Start(/*dp=*/1, /*shards=*/1, absl::Seconds(120), absl::Seconds(10),
          /*backups=*/1);
    RegisterRequest backup = Server("b:1", 0);
    backup.set_backup(true);
    Id(backup);
    Id(Server("p:1", 0));
    Id(Worker("host-0"));
  }

  // The primary stops heartbeating until its lease expired; meanwhile the
  // backup sends `backup_beat` and the worker beats.
  void PrimaryMissesItsLease(const HeartbeatRequest& backup_beat) {
    clock_.Advance(absl::Seconds(8));
    ASSERT_TRUE(core_->Heartbeat(backup_beat).ok());
    ASSERT_TRUE(core_->Heartbeat(Beat("worker-0")).ok());
    clock_.Advance(absl::Seconds(3));
    core_->Tick();
  }

  const NodeStatus* Find(const JobStatus& s, const std::string& id) {
    for (const NodeStatus& n : s.nodes()) {
      if (n.node_id() == id) return &n;
    }
    return nullptr;
  }

  bool Logged(absl::string_view needle) {
    absl::MutexLock lock(&log_mu_);
    for (const std::string& line : log_) {
      if (absl::StrContains(line, needle)) return true;
    }
    return false;
  }

  std::string Log() {
    absl::MutexLock lock(&log_mu_);
    return absl::StrJoin(log_, "\n");
  }

  FakeClock clock_;
  std::unique_ptr<SchedulerCore> core_;
  absl::Mutex log_mu_;
  std::vector<std::string> log_ ABSL_GUARDED_BY(log_mu_);
};


// A server's heartbeat as a replicated node reports it (server/replication.h
// FillHeartbeat).
inline HeartbeatRequest ReplicaBeat(const std::string& id, bool serving,
                                    int64_t epoch, bool awaiting = false) {
  HeartbeatRequest h = Beat(id);
  h.set_serving_primary(serving);
  h.set_epoch(epoch);
  h.set_awaiting_snapshot(awaiting);
  return h;
}

}  // namespace scheduler_test
}  // namespace lmps

#endif  // LMPS_SERVER_SCHEDULER_SCHEDULER_CORE_TEST_UTIL_H_
