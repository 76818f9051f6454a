// The step a worker starts training at (worker_daemon.h, step 4): the
// assignment's start step, or later for a replacement joining a running
// job. SYNC and BOUNDED_STALENESS: the shards' version, once every shard
// is at the same one (in the middle of an Apply the shards may differ by
// one: the live replicas finish it; still different after `rpc_timeout`:
// DeadlineExceeded). ASYNC: versions count pushes, not steps, so the
// replica's clock (the steps this dp rank completely pushed): a replacement
// neither repeats nor skips its predecessor's steps. A shard answering
// UNAVAILABLE (still starting up) is asked again every 100 ms for up to
// `rpc_timeout`.
//
// Thread-safety: uses `ps` from the calling thread only.
#ifndef LMPS_WORKER_RESUME_STEP_H_
#define LMPS_WORKER_RESUME_STEP_H_

#include <cstdint>
#include <functional>
#include <string>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "proto/lmps.pb.h"
#include "worker/ps_client.h"

namespace lmps {

// `log` gets the line that says the worker joins a running job (only then).
absl::StatusOr<int64_t> ResumeStep(
    PsClient* ps, ConsistencyMode mode, int dp_rank, int64_t start_step,
    absl::Duration rpc_timeout,
    const std::function<void(const std::string&)>& log);

}  // namespace lmps

#endif  // LMPS_WORKER_RESUME_STEP_H_
