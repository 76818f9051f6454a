#include "worker/resume_step.h"

#include <algorithm>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"

namespace lmps {
namespace {

// Whether a retry of an UNAVAILABLE shard (still starting up) is allowed.
bool WithinRpcTimeout(int attempt, absl::Duration rpc_timeout) {
  return attempt * 0.1 < absl::ToDoubleSeconds(rpc_timeout);
}

absl::StatusOr<int64_t> ResumeAsync(
    PsClient* ps, int dp_rank, int64_t start_step, absl::Duration rpc_timeout,
    const std::function<void(const std::string&)>& log) {
  absl::StatusOr<int64_t> clock = ps->ReplicaClock(dp_rank);
  for (int attempt = 0;
       clock.status().code() == absl::StatusCode::kUnavailable &&
       WithinRpcTimeout(attempt, rpc_timeout);
       ++attempt) {
    absl::SleepFor(absl::Milliseconds(100));  // a shard still starting up
    clock = ps->ReplicaClock(dp_rank);
  }
  if (!clock.ok()) return clock.status();
  if (*clock <= start_step) return start_step;
  log(absl::StrCat("joining a running ASYNC job at step ", *clock,
                   " (dp rank ", dp_rank,
                   "'s clock; replacing a lost worker)"));
  return *clock;
}

absl::StatusOr<int64_t> ResumeAtVersion(
    PsClient* ps, int64_t start_step, absl::Duration rpc_timeout,
    const std::function<void(const std::string&)>& log) {
  for (int attempt = 0;; ++attempt) {
    absl::StatusOr<std::vector<int64_t>> got = ps->Versions();
    if (got.status().code() == absl::StatusCode::kUnavailable &&
        WithinRpcTimeout(attempt, rpc_timeout)) {
      absl::SleepFor(absl::Milliseconds(100));  // a shard still starting up
      continue;
    }
    if (!got.ok()) return got.status();
    const std::vector<int64_t>& versions = *got;
    const auto [lo, hi] = std::minmax_element(versions.begin(), versions.end());
    if (*lo == *hi) {
      if (*lo <= start_step) return start_step;
      log(absl::StrCat("joining a running job at step ", *lo,
                       " (replacing a lost worker)"));
      return *lo;
    }
    if (attempt * 0.1 > absl::ToDoubleSeconds(rpc_timeout)) {
      return absl::DeadlineExceededError(absl::StrCat(
          "shards stay at different versions (", *lo, " and ", *hi,
          "): an Apply was interrupted and no live replica completes it"));
    }
    absl::SleepFor(absl::Milliseconds(100));
  }
}

}  // namespace

absl::StatusOr<int64_t> ResumeStep(
    PsClient* ps, ConsistencyMode mode, int dp_rank, int64_t start_step,
    absl::Duration rpc_timeout,
    const std::function<void(const std::string&)>& log) {
  return mode == ASYNC
             ? ResumeAsync(ps, dp_rank, start_step, rpc_timeout, log)
             : ResumeAtVersion(ps, start_step, rpc_timeout, log);
}

}  // namespace lmps
