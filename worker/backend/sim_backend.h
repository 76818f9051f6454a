// SimBackend: a stand-in for a GPU in communication benchmarks
// (bench/gpu_sim.sh). It computes nothing: every layer is a no-op and the
// matrix products and attention take the time a device of a declared
// throughput would take for their FLOPs, spent asleep, so the host's cores
// stay free for the communication it is meant to expose. The parameter and
// gradient buffers are real host memory (the worker's copies in and out of
// them are real memcpys, like a GPU's host-device copies); outputs keep
// whatever the buffers held (zeros at first), so the loss is 0 and the
// gradients stay 0. A run on it is a simulation and must be labelled so.
//
// Time charged, per call (N rows = B*T tokens, FLOPs counted as 2 per
// multiply-add, the causal attention's masked half not counted):
//   MatmulForward    2 * N * C * OC
//   MatmulBackward   4 * N * C * OC          (dinp and dweight)
//   AttentionForward 2 * B * T * T * C       (q.k and att @ v, causal half)
//   AttentionBackward 4 * B * T * T * C
//   everything else  0 (memory-bound and small next to the products)
// divided by `flops_per_second`. The time is slept in pieces of at least
// `min_sleep` (owed time accumulates until then, and oversleeping is paid
// back by later calls), so the total slept tracks the total charged.
//
// Memory: Alloc maps anonymous zero pages on demand (mmap), so activation
// buffers that nothing touches cost no RAM; a GPT-2-small model with batch
// 8 x 1024 fits on a small host.
//
// Thread-safety: like every Backend, one thread at a time.
#ifndef LMPS_WORKER_BACKEND_SIM_BACKEND_H_
#define LMPS_WORKER_BACKEND_SIM_BACKEND_H_

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string_view>
#include <unordered_map>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "worker/backend/backend.h"
#include "worker/backend/host_backend.h"

namespace lmps {

struct SimBackendOptions {
  double flops_per_second = 100e12;  // the declared device throughput, > 0
  absl::Duration min_sleep = absl::Milliseconds(1);
  // How to spend time: returns the time actually slept (>= 0). Default:
  // absl::SleepFor measured with absl::Now. Tests inject a fake.
  std::function<absl::Duration(absl::Duration)> sleep;
};

class SimBackend : public HostBackend {
 public:
  // InvalidArgument for a throughput that is not a positive finite number.
  static absl::StatusOr<std::unique_ptr<SimBackend>> Create(
      SimBackendOptions options);
  ~SimBackend() override;

  // The time charged so far (what a device of the declared throughput
  // would have spent computing).
  absl::Duration charged() const { return charged_; }

  std::string_view name() const override { return "sim"; }
  // Copies are HostBackend's memcpys; memory is mapped on demand.
  absl::StatusOr<float*> Alloc(size_t floats) override;
  absl::StatusOr<int32_t*> AllocInt32(size_t n) override;
  void Free(float* p) override;
  void Free(int32_t* p) override;
  // Treated as a device's memory: collectives copy it to the host and back,
  // as they would on the GPU this stands in for.
  bool memory_is_host() const override { return false; }

  void Zero(float*, size_t) override {}
  void Axpy(float*, float, const float*, size_t) override {}
  void EncoderForward(float*, const int32_t*, const float*, const float*, int,
                      int, int) override {}
  void EncoderBackward(float*, float*, const float*, const int32_t*, int, int,
                       int) override {}
  void LayerNormForward(float*, float*, float*, const float*, const float*,
                        const float*, int, int) override {}
  void LayerNormBackward(float*, float*, float*, const float*, const float*,
                         const float*, const float*, const float*, int,
                         int) override {}
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
  void GeluForward(float*, const float*, size_t) override {}
  void GeluBackward(float*, const float*, const float*, size_t) override {}
  void ResidualForward(float*, const float*, const float*, size_t) override {}
  void ResidualBackward(float*, float*, const float*, size_t) override {}
  void CrossEntropyForward(float*, float*, const float*, const int32_t*, int,
                           int) override {}
  void CrossEntropyBackward(float*, const float*, const int32_t*, float, int,
                            int) override {}

 private:
  explicit SimBackend(SimBackendOptions options);
  absl::StatusOr<void*> Map(size_t bytes);
  void Unmap(void* p);
  // Charges `flops` of compute and sleeps what is owed once it reaches
  // min_sleep.
  void Charge(double flops);

  const SimBackendOptions options_;
  absl::Duration charged_;
  absl::Duration owed_;  // charged but not yet slept (negative: overslept)
  std::unordered_map<void*, size_t> mapped_;  // address -> bytes
};

}  // namespace lmps

#endif  // LMPS_WORKER_BACKEND_SIM_BACKEND_H_
