// CpuBackend: the fast fp32 CPU implementation of Backend.
//
// Matrix products (the linear layers and, per (batch, head), the attention
// scores and their products with v) go through OpenBLAS cblas_sgemm; the
// other kernels are SIMD loops. All parallelism comes from one ThreadPool
// (common/threads/thread_pool.h) of options.num_threads threads: OpenBLAS is set to one
// thread and each task calls it on a slice of the product (a second thread
// pool would fight ours for the cores). Work is handed out dynamically, so
// a core taken by another process slows a step down gracefully instead of
// stalling every parallel region.
//
// The semantics of every function are those documented in backend.h; the
// naive ReferenceBackend (cpu_reference.h) computes the same functions and
// the tests compare the two. Results are deterministic for a given thread
// count (reductions are split into tasks and combined in a fixed order,
// whichever thread runs them).
//
// Thread-safety: as Backend (one thread at a time). Create() sets
// OpenBLAS's process-global thread count to 1.
#ifndef LMPS_WORKER_BACKEND_CPU_BACKEND_H_
#define LMPS_WORKER_BACKEND_CPU_BACKEND_H_

#include <memory>
#include <string_view>

#include "absl/status/statusor.h"
#include "worker/backend/host_backend.h"

namespace lmps {

class ThreadPool;

struct CpuBackendOptions {
  // Threads for all kernels, sgemm included (the calling thread counts as
  // one); 0 = all hardware threads.
  int num_threads = 0;
};

class CpuBackend final : public HostBackend {
 public:
  // InvalidArgumentError when options.num_threads < 0.
  static absl::StatusOr<std::unique_ptr<CpuBackend>> Create(
      const CpuBackendOptions& options);

  ~CpuBackend() override;

  std::string_view name() const override { return "cpu"; }
  // "N threads, OpenBLAS kernels <core>" and, where this CPU has AVX-512
  // but OpenBLAS runs AVX2 kernels (e.g. forced by OPENBLAS_CORETYPE=Haswell
  // in the environment, as on this project's build machine), how to select
  // the AVX-512 ones (OPENBLAS_CORETYPE, read by OpenBLAS when it loads;
  // docs/operations.md).
  std::string notes() const override;
  int num_threads() const;

  void Zero(float* p, size_t n) override;
  void Axpy(float* y, float alpha, const float* x, size_t n) override;

  void EncoderForward(float* out, const int32_t* inp, const float* wte,
                      const float* wpe, int B, int T, int C) override;
  void EncoderBackward(float* dwte, float* dwpe, const float* dout,
                       const int32_t* inp, int B, int T, int C) override;
  void LayerNormForward(float* out, float* mean, float* rstd, const float* inp,
                        const float* weight, const float* bias, int N,
                        int C) override;
  void LayerNormBackward(float* dinp, float* dweight, float* dbias,
                         const float* dout, const float* inp,
                         const float* weight, const float* mean,
                         const float* rstd, int N, int C) override;
  void MatmulForward(float* out, const float* inp, const float* weight,
                     const float* bias, int N, int C, int OC) override;
  void MatmulBackward(float* dinp, float* dweight, float* dbias,
                      const float* dout, const float* inp, const float* weight,
                      int N, int C, int OC) override;
  void AttentionForward(float* out, float* att, const float* qkv, int B, int T,
                        int C, int NH) override;
  void AttentionBackward(float* dqkv, float* scratch, const float* dout,
                         const float* qkv, const float* att, int B, int T,
                         int C, int NH) override;
  void GeluForward(float* out, const float* inp, size_t N) override;
  void GeluBackward(float* dinp, const float* inp, const float* dout,
                    size_t N) override;
  void ResidualForward(float* out, const float* inp1, const float* inp2,
                       size_t N) override;
  void ResidualBackward(float* dinp1, float* dinp2, const float* dout,
                        size_t N) override;
  void CrossEntropyForward(float* losses, float* probs, const float* logits,
                           const int32_t* targets, int N, int V) override;
  void CrossEntropyBackward(float* dlogits, const float* probs,
                            const int32_t* targets, float dloss, int N,
                            int V) override;

 private:
  explicit CpuBackend(int num_threads);

  std::unique_ptr<ThreadPool> pool_;
};

}  // namespace lmps

#endif  // LMPS_WORKER_BACKEND_CPU_BACKEND_H_
