#include "worker/backend_factory.h"

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "worker/backend/cpu_backend.h"
#ifdef LMPS_HAVE_CUDA
#include "absl/strings/numbers.h"
#include "worker/backend/cuda/cuda_backend.h"
#endif

namespace lmps {

absl::StatusOr<std::unique_ptr<Backend>> CreateBackend(
    const std::string& name, int num_threads, const std::string& cuda_matmul) {
  if (!cuda_matmul.empty() && cuda_matmul != "tf32" && cuda_matmul != "bf16") {
    return absl::InvalidArgumentError(
        absl::StrCat("cuda_matmul '", cuda_matmul,
                     "': expected tf32 or bf16 (or empty for the default)"));
  }
  if (name == "cpu") {
    CpuBackendOptions options;
    options.num_threads = num_threads;
    absl::StatusOr<std::unique_ptr<CpuBackend>> cpu = CpuBackend::Create(options);
    if (!cpu.ok()) return cpu.status();
    return std::unique_ptr<Backend>(std::move(*cpu));
  }
  if (name == "cuda" || absl::StartsWith(name, "cuda:")) {
#ifdef LMPS_HAVE_CUDA
    CudaBackendOptions options;
    if (name != "cuda" && !absl::SimpleAtoi(name.substr(5), &options.device)) {
      return absl::InvalidArgumentError(
          absl::StrCat("backend '", name, "': expected cuda:N"));
    }
    if (!cuda_matmul.empty()) {
      absl::StatusOr<MatmulPrecision> precision =
          ParseMatmulPrecision(cuda_matmul);
      if (!precision.ok()) return precision.status();
      options.matmul_precision = *precision;
    }
    absl::StatusOr<std::unique_ptr<CudaBackend>> cuda = CudaBackend::Create(options);
    if (!cuda.ok()) {
      return absl::Status(cuda.status().code(),
                          absl::StrCat("backend '", name, "': ",
                                       cuda.status().message()));
    }
    return std::unique_ptr<Backend>(std::move(*cuda));
#else
    return absl::FailedPreconditionError(absl::StrCat(
        "backend '", name, "': this binary has no CUDA backend; use "
        "lmps_worker_cuda (built where nvcc exists) or --backend=cpu"));
#endif
  }
  return absl::InvalidArgumentError(absl::StrCat(
      "unknown backend '", name, "'; valid: cpu, cuda, cuda:N"));
}

}  // namespace lmps
