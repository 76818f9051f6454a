#include "worker/training_loop.h"

#include <cmath>

#include "absl/time/clock.h"

#include "absl/strings/str_cat.h"
#include "common/rpc/status_util.h"

namespace lmps {

absl::Status ApplyStepOnShards(PsClient* ps, ConsistencyMode mode,
                               int64_t step, double* grad_norm,
                               const PsClient::PushedStep* pushed) {
  double sum_squares = 0;
  if (pushed != nullptr) {
    sum_squares = pushed->sum_squares;
  } else {
    LMPS_ASSIGN_OR_RETURN(sum_squares, ps->GradNorm(step));
  }
  if (grad_norm != nullptr) *grad_norm = std::sqrt(sum_squares);
  if (mode == SYNC) {
    int64_t version = pushed != nullptr ? pushed->version : -1;
    if (version < 0) {
      LMPS_ASSIGN_OR_RETURN(version, ps->Apply(step, sum_squares));
    }
    if (version != step + 1) {
      return absl::InternalError(absl::StrCat("after applying step ", step,
                                              " the servers are at version ",
                                              version));
    }
    return absl::OkStatus();
  }
  return ps->ApplyBounded(step, sum_squares).status();
}

absl::Status AwaitResizeStop(
    PsClient* ps, int64_t step, absl::Status error, absl::Duration wait,
    const std::atomic<bool>& cancelled, float* scratch,
    const std::function<void(const std::string&)>& log) {
  if (wait <= absl::ZeroDuration() ||
      (error.code() != absl::StatusCode::kUnavailable &&
       error.code() != absl::StatusCode::kDeadlineExceeded)) {
    return error;
  }
  log(absl::StrCat("step ", step, " failed (", error.message(),
                   "); waiting up to ", absl::FormatDuration(wait),
                   " for the scheduler to regroup the job at this step"));
  // A shard stopped for a resize at or before `step` answers a pull of
  // `step` with ABORTED (ParameterShard::Pull); until then the pull is
  // served once version `step` exists, and is discarded.
  const absl::Time give_up = absl::Now() + wait;
  while (!cancelled && absl::Now() < give_up) {
    const absl::Status pulled = ps->Pull(step, scratch);
    if (pulled.code() == absl::StatusCode::kAborted) return pulled;
    absl::SleepFor(absl::Milliseconds(250));
  }
  return error;
}

}  // namespace lmps
