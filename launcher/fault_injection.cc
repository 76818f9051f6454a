#include "launcher/fault_injection.h"

#include <algorithm>
#include <cstdint>
#include <csignal>
#include <cstdio>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace lmps {
namespace {

// The slowest worker's step, or INT64_MAX when no worker reports.
int64_t SlowestWorkerStep(const JobStatus& status) {
  int64_t step = INT64_MAX;
  for (const NodeStatus& n : status.nodes()) {
    if (n.role() == WORKER) step = std::min(step, n.step());
  }
  return step;
}

}  // namespace

std::vector<std::string> FaultInjector::WorkerArgs(int rank, int attempt) const {
  if (rank != options_.worker || attempt != 0) return {};
  return {absl::StrCat("--fault_kill_at_step=", options_.worker_kill_at_step)};
}

void FaultInjector::MaybeInject(const JobStatus& status, int attempt,
                                absl::Time now, const FaultTargets& targets) {
  const int64_t step = SlowestWorkerStep(status);
  if (now >= thaw_at_) {
    const std::vector<std::string> thawed = targets.signal_workers(SIGCONT);
    std::printf("\nlmps: fault injection: SIGCONT %s after %d s\n",
                absl::StrJoin(thawed, ", ").c_str(), options_.freeze_s);
    std::fflush(stdout);
    thaw_at_ = absl::InfiniteFuture();
  }
  if (options_.freeze_workers_at_step >= 0 && !froze_ && attempt == 0 &&
      step != INT64_MAX && step >= options_.freeze_workers_at_step) {
    froze_ = true;
    thaw_at_ = now + absl::Seconds(options_.freeze_s);
    std::printf("\nlmps: fault injection: SIGSTOP every worker at step %lld "
                "for %d s\n",
                static_cast<long long>(step), options_.freeze_s);
    std::fflush(stdout);
    targets.signal_workers(SIGSTOP);
  }
  if (options_.scheduler_at_step >= 0 && !scheduler_injected_ &&
      step != INT64_MAX && step >= options_.scheduler_at_step &&
      targets.running("scheduler")) {
    std::printf("\nlmps: fault injection: SIGKILL the scheduler at step %lld\n",
                static_cast<long long>(step));
    std::fflush(stdout);
    targets.kill("scheduler");
    scheduler_injected_ = true;
  }
  const int victim = options_.server;
  const int64_t again = options_.primary_again_at_step;
  // The shard must be protected again (its other node holds a complete
  // copy): killing its only copy is a rollback, not the failover this
  // fault tests.
  bool protected_again = false;
  for (const NodeStatus& n : status.nodes()) {
    if (n.role() == SERVER && n.shard() == victim && n.backup() &&
        n.alive() && !n.needs_snapshot()) {
      protected_again = true;
    }
  }
  if (victim >= 0 && server_injected_ && !second_injected_ && again >= 0 &&
      step != INT64_MAX && step >= again && protected_again) {
    for (const NodeStatus& n : status.nodes()) {
      if (n.role() != SERVER || n.shard() != victim || !n.serving_primary()) {
        continue;
      }
      if (targets.running(n.node_id())) {
        std::printf("\nlmps: fault injection: SIGKILL %s, now the primary "
                    "of shard %d, at step %lld\n",
                    n.node_id().c_str(), victim, static_cast<long long>(step));
        std::fflush(stdout);
        targets.kill(n.node_id());
        second_injected_ = true;
      }
    }
  }
  if (victim < 0 || server_injected_ || attempt > 0) return;
  if (step == INT64_MAX || step < options_.server_at_step) return;
  const std::string name = absl::StrCat("server-", victim);
  if (targets.running(name)) {
    std::printf("\nlmps: fault injection: SIGKILL %s at step %lld\n",
                name.c_str(), static_cast<long long>(step));
    std::fflush(stdout);
    targets.kill(name);
    server_injected_ = true;
  }
}

}  // namespace lmps
