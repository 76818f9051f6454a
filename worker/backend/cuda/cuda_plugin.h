// The CUDA backend as a plugin: lmps_worker_cuda loads
// liblmps_cuda_backend.so with dlopen when --backend=cuda[:N] is asked for,
// instead of linking cuBLAS and the CUDA runtime at start.
//
// Why: cuBLASLt 13 has about 94 KiB of static TLS. Linked at start, static
// TLS is carved out of every thread's stack, and Debian's civetweb (the HTTP
// server of /metrics, common/rpc/http_server.h) creates its threads with ~100 KiB
// stacks, so pthread_create fails and /metrics never comes up. A library
// loaded with dlopen gets dynamic TLS instead (allocated on first use), so
// the HTTP server's threads start normally; and the CPU backend of the same
// binary never loads CUDA at all.
//
// The plugin exports one C function, kCudaPluginEntry, of type
// CudaPluginEntry. It returns a new backend (the caller owns it; deleting
// it runs the plugin's destructor through the vtable) or null with *error
// set.
#ifndef LMPS_WORKER_BACKEND_CUDA_CUDA_PLUGIN_H_
#define LMPS_WORKER_BACKEND_CUDA_CUDA_PLUGIN_H_

#include <string>

#include "worker/backend/backend.h"

namespace lmps {

struct CudaPluginArgs {
  int device = 0;
  std::string matmul;  // "tf32", "bf16" or "" (the backend's default)
};

using CudaPluginEntry = Backend* (*)(const CudaPluginArgs& args,
                                     std::string* error);

inline constexpr char kCudaPluginEntry[] = "lmps_create_cuda_backend";
inline constexpr char kCudaPluginFile[] = "liblmps_cuda_backend.so";

}  // namespace lmps

#endif  // LMPS_WORKER_BACKEND_CUDA_CUDA_PLUGIN_H_
