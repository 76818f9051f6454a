// Chooses a worker's compute backend from its --backend flag: "cpu",
// "cuda" / "cuda:N" where this build has the CUDA backend, or "sim:TFLOPS",
// a simulated device of that throughput that computes nothing
// (worker/backend/sim_backend.h; communication benchmarks only). Asking for a
// backend this machine cannot run fails at start with a clear message.
//
// cuda_matmul (--cuda_matmul) is the CUDA backend's matrix-product input
// precision: "tf32", "bf16", or "" for the backend's default
// (CudaBackendOptions). It is validated for every backend (an unknown value
// is InvalidArgumentError) and ignored by the CPU backend.
//
// The CUDA backend is a plugin loaded with dlopen on first use
// (worker/backend/cuda/cuda_plugin.h): `cuda_plugin` is its path, or "" to
// look beside the binary, in its runfiles and on LD_LIBRARY_PATH. A missing
// plugin or GPU is FailedPreconditionError naming what is missing.
//
// Thread-safety: call once, from main().
#ifndef LMPS_WORKER_BACKEND_FACTORY_H_
#define LMPS_WORKER_BACKEND_FACTORY_H_

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "worker/backend/backend.h"

namespace lmps {

absl::StatusOr<std::unique_ptr<Backend>> CreateBackend(
    const std::string& name, int num_threads,
    const std::string& cuda_matmul = "",
    const std::string& cuda_plugin = "");

}  // namespace lmps

#endif  // LMPS_WORKER_BACKEND_FACTORY_H_
