#include "worker/backend_factory.h"

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "worker/backend/cpu_backend.h"

namespace lmps {

absl::StatusOr<std::unique_ptr<Backend>> CreateBackend(const std::string& name,
                                                       int num_threads) {
  if (name == "cpu") {
    CpuBackendOptions options;
    options.num_threads = num_threads;
    absl::StatusOr<std::unique_ptr<CpuBackend>> cpu = CpuBackend::Create(options);
    if (!cpu.ok()) return cpu.status();
    return std::unique_ptr<Backend>(std::move(*cpu));
  }
  if (name == "cuda" || absl::StartsWith(name, "cuda:")) {
    return absl::FailedPreconditionError(absl::StrCat(
        "backend '", name, "': this lmps_worker was built without the CUDA "
        "backend; use --backend=cpu"));
  }
  return absl::InvalidArgumentError(absl::StrCat(
      "unknown backend '", name, "'; valid: cpu, cuda, cuda:N"));
}

}  // namespace lmps
