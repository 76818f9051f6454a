// The exported entry of liblmps_cuda_backend.so (see cuda_plugin.h).
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "worker/backend/cuda/cuda_backend.h"
#include "worker/backend/cuda/cuda_plugin.h"

extern "C" __attribute__((visibility("default"))) lmps::Backend*
lmps_create_cuda_backend(const lmps::CudaPluginArgs& args, std::string* error) {
  lmps::CudaBackendOptions options;
  options.device = args.device;
  if (!args.matmul.empty()) {
    absl::StatusOr<lmps::MatmulPrecision> precision =
        lmps::ParseMatmulPrecision(args.matmul);
    if (!precision.ok()) {
      *error = precision.status().ToString();
      return nullptr;
    }
    options.matmul_precision = *precision;
  }
  absl::StatusOr<std::unique_ptr<lmps::CudaBackend>> backend =
      lmps::CudaBackend::Create(options);
  if (!backend.ok()) {
    *error = std::string(backend.status().message());
    return nullptr;
  }
  return backend->release();
}
