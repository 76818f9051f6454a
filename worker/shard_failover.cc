#include "worker/shard_failover.h"

#include <algorithm>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace lmps {

ShardFailover::ShardFailover(int shard, Nodes nodes, absl::Duration timeout)
    : shard_(shard), timeout_(timeout), nodes_(std::move(nodes)) {}

const std::string& ShardFailover::current() const {
  return on_backup_ ? nodes_.backup : nodes_.primary;
}

void ShardFailover::Begin(absl::Time now) {
  deadline_ = now + timeout_;
  delay_ = absl::Milliseconds(20);
  failures_ = 0;
  errors_.clear();
}

absl::StatusOr<absl::Duration> ShardFailover::Failed(
    const absl::Status& status, absl::Time now, const Resolver& resolve) {
  errors_.push_back(absl::StrCat(current(), ": ", status.message()));
  if (now >= deadline_) {
    return absl::UnavailableError(absl::StrCat(
        "neither node of replicated shard ", shard_, " served within ",
        absl::FormatDuration(timeout_), " (last answers: ",
        absl::StrJoin(errors_.end() - std::min<size_t>(errors_.size(), 2),
                      errors_.end(), "; "),
        ")"));
  }
  // To the other node; with no known other node, straight back to asking
  // where the shard is.
  on_backup_ = !on_backup_ && !nodes_.backup.empty();
  ++switches_;
  if (!on_backup_ && resolve) {
    absl::StatusOr<Nodes> now_at = resolve();
    if (now_at.ok() && !now_at->primary.empty()) nodes_ = *std::move(now_at);
  }
  if (failures_++ == 0) return absl::ZeroDuration();
  const absl::Duration pause = delay_;
  delay_ = std::min(delay_ * 2, absl::Seconds(1));
  return pause;
}

}  // namespace lmps
