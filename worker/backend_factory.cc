#include "worker/backend_factory.h"

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "worker/backend/cpu_backend.h"
#include "worker/backend/sim_backend.h"
#ifdef LMPS_HAVE_CUDA
#include <dlfcn.h>
#include <errno.h>  // program_invocation_name
#include <unistd.h>

#include <vector>

#include "absl/strings/numbers.h"
#include "worker/backend/cuda/cuda_plugin.h"
#endif

namespace lmps {
#ifdef LMPS_HAVE_CUDA
namespace {

// Loads the CUDA backend plugin (cuda_plugin.h) once: `path`, else beside
// this executable, in its Bazel runfiles, then by name (LD_LIBRARY_PATH).
// The library stays loaded for the life of the process.
absl::StatusOr<CudaPluginEntry> LoadCudaPlugin(const std::string& path) {
  std::vector<std::string> candidates;
  if (!path.empty()) {
    candidates.push_back(path);
  } else {
    // The binary as invoked (argv[0], made absolute, symlinks kept) and as
    // resolved (/proc/self/exe). Run as another target's data (a test), the
    // invoked path lies inside that target's runfiles tree, which holds the
    // plugin; the resolved path's own runfiles tree may not exist.
    std::vector<std::string> selves;
    std::string invoked = program_invocation_name;
    if (!invoked.empty() && invoked[0] != '/' &&
        invoked.find('/') != std::string::npos) {
      char cwd[4096] = {0};
      if (getcwd(cwd, sizeof(cwd)) != nullptr) {
        invoked = absl::StrCat(cwd, "/", invoked);
      }
    }
    if (!invoked.empty() && invoked[0] == '/') selves.push_back(invoked);
    char exe[4096] = {0};
    const ssize_t n = readlink("/proc/self/exe", exe, sizeof(exe) - 1);
    if (n > 0) selves.emplace_back(exe, n);
    const std::string in_runfiles =
        absl::StrCat("lmps/worker/backend/cuda/", kCudaPluginFile);
    for (const std::string& self : selves) {
      candidates.push_back(self.substr(0, self.rfind('/') + 1) +
                           kCudaPluginFile);
      const size_t tree = self.rfind(".runfiles/");
      if (tree != std::string::npos) {
        candidates.push_back(self.substr(0, tree + 10) + in_runfiles);
      }
      candidates.push_back(absl::StrCat(self, ".runfiles/", in_runfiles));
    }
    candidates.push_back(kCudaPluginFile);
  }
  std::string errors;
  for (const std::string& c : candidates) {
    if (c.find('/') != std::string::npos && access(c.c_str(), R_OK) != 0) {
      continue;
    }
    void* handle = dlopen(c.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (handle == nullptr) {
      absl::StrAppend(&errors, "; ", dlerror());
      continue;
    }
    void* entry = dlsym(handle, kCudaPluginEntry);
    if (entry == nullptr) {
      return absl::FailedPreconditionError(absl::StrCat(
          c, " has no ", kCudaPluginEntry, ": not an lmps CUDA plugin"));
    }
    return reinterpret_cast<CudaPluginEntry>(entry);
  }
  return absl::FailedPreconditionError(absl::StrCat(
      "cannot load the CUDA backend ", kCudaPluginFile, " (looked ",
      path.empty() ? "beside the binary, in its runfiles and on "
                     "LD_LIBRARY_PATH"
                   : absl::StrCat("at ", path),
      errors, ")"));
}

}  // namespace
#endif

absl::StatusOr<std::unique_ptr<Backend>> CreateBackend(
    const std::string& name, int num_threads, const std::string& cuda_matmul,
    const std::string& cuda_plugin) {
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
  if (absl::StartsWith(name, "sim:")) {
    // A simulated device of the given TFLOP/s (bench/gpu_sim.sh).
    double tflops = 0;
    if (!absl::SimpleAtod(name.substr(4), &tflops)) {
      return absl::InvalidArgumentError(
          absl::StrCat("backend '", name, "': expected sim:TFLOPS"));
    }
    SimBackendOptions options;
    options.flops_per_second = tflops * 1e12;
    absl::StatusOr<std::unique_ptr<SimBackend>> sim =
        SimBackend::Create(options);
    if (!sim.ok()) return sim.status();
    return std::unique_ptr<Backend>(std::move(*sim));
  }
  if (name == "cuda" || absl::StartsWith(name, "cuda:")) {
#ifdef LMPS_HAVE_CUDA
    CudaPluginArgs args;
    args.matmul = cuda_matmul;
    if (name != "cuda" && !absl::SimpleAtoi(name.substr(5), &args.device)) {
      return absl::InvalidArgumentError(
          absl::StrCat("backend '", name, "': expected cuda:N"));
    }
    absl::StatusOr<CudaPluginEntry> create = LoadCudaPlugin(cuda_plugin);
    if (!create.ok()) {
      return absl::Status(create.status().code(),
                          absl::StrCat("backend '", name, "': ",
                                       create.status().message()));
    }
    std::string error;
    Backend* cuda = (*create)(args, &error);
    if (cuda == nullptr) {
      return absl::FailedPreconditionError(
          absl::StrCat("backend '", name, "': ", error));
    }
    return std::unique_ptr<Backend>(cuda);
#else
    return absl::FailedPreconditionError(absl::StrCat(
        "backend '", name, "': this binary has no CUDA backend; use "
        "lmps_worker_cuda (built where nvcc exists) or --backend=cpu"));
#endif
  }
  return absl::InvalidArgumentError(absl::StrCat(
      "unknown backend '", name,
                   "'; valid: cpu, cuda, cuda:N, sim:TFLOPS"));
}

}  // namespace lmps
