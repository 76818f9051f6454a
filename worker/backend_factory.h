// Chooses a worker's compute backend from its --backend flag: "cpu", or
// "cuda" / "cuda:N" where this build has the CUDA backend. Asking for a
// backend this machine cannot run fails at start with a clear message.
//
// Thread-safety: call once, from main().
#ifndef LMPS_WORKER_BACKEND_FACTORY_H_
#define LMPS_WORKER_BACKEND_FACTORY_H_

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "worker/backend/backend.h"

namespace lmps {

absl::StatusOr<std::unique_ptr<Backend>> CreateBackend(const std::string& name,
                                                       int num_threads);

}  // namespace lmps

#endif  // LMPS_WORKER_BACKEND_FACTORY_H_
