// ReferenceBackend: a naive, single-threaded implementation of every layer
// of the Backend interface with plain loops (no BLAS, no SIMD tricks),
// written for obviousness rather than speed; it follows llm.c's
// train_gpt2.c. Reductions accumulate in double so it is a good "truth" for
// the tests of the fast kernels (worker/backend/cpu_backend.h).
//
// Thread-safety: as Backend (one thread at a time); it uses no threads.
#ifndef LMPS_WORKER_BACKEND_CPU_REFERENCE_H_
#define LMPS_WORKER_BACKEND_CPU_REFERENCE_H_

#include <memory>
#include <string_view>

#include "absl/status/statusor.h"
#include "worker/backend/host_backend.h"

namespace lmps {

// Not final: tests derive from it to fake a device's behaviour (e.g.
// deferred asynchronous copies in worker/trainer_test).
class ReferenceBackend : public HostBackend {
 public:
  static absl::StatusOr<std::unique_ptr<ReferenceBackend>> Create();

  std::string_view name() const override { return "reference"; }

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

 protected:
  ReferenceBackend() = default;
};

}  // namespace lmps

#endif  // LMPS_WORKER_BACKEND_CPU_REFERENCE_H_
