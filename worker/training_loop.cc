#include "worker/training_loop.h"

#include <cmath>

#include "absl/strings/str_cat.h"
#include "common/rpc/status_util.h"

namespace lmps {

absl::Status ApplyStepOnShards(PsClient* ps, ConsistencyMode mode,
                               int64_t step, double* grad_norm) {
  LMPS_ASSIGN_OR_RETURN(double sum_squares, ps->GradNorm(step));
  if (grad_norm != nullptr) *grad_norm = std::sqrt(sum_squares);
  if (mode == SYNC) {
    LMPS_ASSIGN_OR_RETURN(int64_t version, ps->Apply(step, sum_squares));
    if (version != step + 1) {
      return absl::InternalError(absl::StrCat("after applying step ", step,
                                              " the servers are at version ",
                                              version));
    }
    return absl::OkStatus();
  }
  return ps->ApplyBounded(step, sum_squares).status();
}

}  // namespace lmps
