// ShardFailover: which node of a replicated parameter-server shard
// (layout.shard_backups = 1) a worker calls, and what it does when a call
// fails with UNAVAILABLE. Free of gRPC, threads and clocks (the caller
// passes the time and does the waiting), so PsClient (worker/ps_client.h)
// and the deterministic simulation (tests/sim) run the same decisions.
//
// The rule. A call goes to current(). When it fails with UNAVAILABLE the
// next one goes to the shard's other node; once both known nodes failed
// (or there is no known other node), `resolve` is asked where the shard's
// nodes are now (the scheduler's view: after a promotion and a restart both
// may have moved) before starting over with its primary. The first retry
// follows at once, later ones after a pause growing from 20 ms to 1 s. At
// the deadline (Begin + timeout) the call fails naming the last answers.
// Every call is safe to repeat on another node: the primary acknowledges
// nothing its backup lacks (server/replication.h).
//
// Thread-safety: not thread-safe; one call of the shard at a time.
#ifndef LMPS_WORKER_SHARD_FAILOVER_H_
#define LMPS_WORKER_SHARD_FAILOVER_H_

#include <functional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"

namespace lmps {

class ShardFailover {
 public:
  struct Nodes {
    std::string primary;
    std::string backup;  // "" when none is known
  };
  using Resolver = std::function<absl::StatusOr<Nodes>()>;

  ShardFailover(int shard, Nodes nodes, absl::Duration timeout);

  // The address to call.
  const std::string& current() const;
  const Nodes& nodes() const { return nodes_; }

  // A call (with its retries) starts at `now`.
  void Begin(absl::Time now);
  // The call to current() failed with `status` (UNAVAILABLE) at `now`:
  // switches node (asking `resolve`, which may be empty, when both known
  // nodes failed). Returns how long to wait before calling current()
  // again, or UNAVAILABLE naming the shard and the last answers once the
  // deadline passed.
  absl::StatusOr<absl::Duration> Failed(const absl::Status& status,
                                        absl::Time now,
                                        const Resolver& resolve);
  // Switches to another node so far (for stats).
  int64_t switches() const { return switches_; }

 private:
  const int shard_;
  const absl::Duration timeout_;
  Nodes nodes_;
  bool on_backup_ = false;
  absl::Time deadline_ = absl::InfiniteFuture();
  absl::Duration delay_;
  int failures_ = 0;  // in this call
  std::vector<std::string> errors_;
  int64_t switches_ = 0;
};

}  // namespace lmps

#endif  // LMPS_WORKER_SHARD_FAILOVER_H_
