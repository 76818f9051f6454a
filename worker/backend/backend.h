// Backend: the compute device of a GPT worker. It owns "backend memory"
// (host memory for the CPU backend, device memory for a CUDA backend) and
// runs the forward and backward pass of every GPT layer on it, in the style
// of llm.c's train_gpt2.c: one function per layer and direction.
//
// Contract of the layer functions:
// - Every pointer argument is backend memory obtained from Alloc/AllocInt32
//   (or an offset into it); host pointers are only accepted by the Copy*
//   functions. Tokens and targets are int32.
// - Shapes are in the comments, row-major, outermost first. N = B * T rows.
//   Matrices are stored out x in (nn.Linear): y = x W^T + b.
// - Shapes and token values are the caller's preconditions (GptModel checks
//   them); layer functions do not validate and do not fail. A device backend
//   may run them asynchronously; its errors surface at the next Copy* or
//   Synchronize(). The CPU backends are synchronous.
// - Forward functions OVERWRITE their outputs.
// - Backward functions ACCUMULATE (+=) into every gradient they produce,
//   parameter gradients and input gradients alike (llm.c convention): the
//   caller zeroes gradient buffers when it wants fresh values. This makes
//   gradient accumulation over micro-batches and fan-out (a tensor used
//   twice, e.g. the tied embedding) free.
// - Outputs must not alias inputs unless the function says so.
//
// Thread-safety: a Backend is used by one thread at a time (like a CUDA
// stream), except WaitCopy; it may use threads internally.
#ifndef LMPS_WORKER_BACKEND_BACKEND_H_
#define LMPS_WORKER_BACKEND_BACKEND_H_

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace lmps {

class Backend {
 public:
  Backend() = default;
  Backend(const Backend&) = delete;
  Backend& operator=(const Backend&) = delete;
  virtual ~Backend() = default;

  // A short name for logs, e.g. "cpu" or "reference".
  virtual std::string_view name() const = 0;
  // What an operator should know about how this backend computes here
  // (logged once by the worker), or empty.
  virtual std::string notes() const { return {}; }

  // ---------------------------------------------------------------------
  // Memory.
  // ---------------------------------------------------------------------

  // `floats` (resp. `n` int32) elements of zero-filled backend memory,
  // aligned for vector loads. ResourceExhaustedError when out of memory.
  // Alloc(0) returns a valid pointer that must still be freed.
  virtual absl::StatusOr<float*> Alloc(size_t floats) = 0;
  virtual absl::StatusOr<int32_t*> AllocInt32(size_t n) = 0;
  // Releases memory from Alloc/AllocInt32. nullptr is a no-op.
  virtual void Free(float* p) = 0;
  virtual void Free(int32_t* p) = 0;
  // True when backend memory is ordinary host memory (any backend pointer
  // may be read and written by host code, e.g. a collective working in
  // place instead of copying to the host and back).
  virtual bool memory_is_host() const { return false; }

  // Copies n elements between host memory and backend memory. When they
  // return, the data has arrived (host_src may be reused, host_dst read).
  virtual absl::Status CopyToBackend(float* dst, const float* host_src,
                                     size_t n) = 0;
  virtual absl::Status CopyToBackend(int32_t* dst, const int32_t* host_src,
                                     size_t n) = 0;
  virtual absl::Status CopyToHost(float* host_dst, const float* src,
                                  size_t n) = 0;

  // Waits for all issued work; reports any asynchronous error.
  virtual absl::Status Synchronize() = 0;

  // Asynchronous copy to the host, so that a result can travel while later
  // work computes (device backends; the defaults copy at once, as the CPU
  // backends do). CopyToHostAsync issues a copy of n elements that starts
  // once every operation issued before it has finished, and returns a
  // ticket; host_dst must stay valid, and is not final, until
  // WaitCopy(ticket) returns OK. Copies complete in issue order, so waiting
  // for a ticket waits for every earlier one. WaitCopy is the one function
  // that may run on another thread than the backend's user (a pushing
  // thread). A destination not pinned by PinHostMemory may be copied
  // synchronously.
  virtual absl::StatusOr<uint64_t> CopyToHostAsync(float* host_dst,
                                                   const float* src,
                                                   size_t n) {
    absl::Status s = CopyToHost(host_dst, src, n);
    if (!s.ok()) return s;
    return 0;
  }
  virtual absl::Status WaitCopy(uint64_t ticket) { return absl::OkStatus(); }
  // Page-locks [p, p + bytes) of host memory for fast asynchronous copies
  // until UnpinHostMemory(p) (call it before freeing the memory). A no-op
  // for host backends.
  virtual absl::Status PinHostMemory(void* p, size_t bytes) {
    return absl::OkStatus();
  }
  virtual void UnpinHostMemory(void* p) {}

  // ---------------------------------------------------------------------
  // Vector utilities (for ZeroGrad and simple optimisers).
  // ---------------------------------------------------------------------

  // p[0..n) = 0.
  virtual void Zero(float* p, size_t n) = 0;
  // y[i] += alpha * x[i] for i in [0, n).
  virtual void Axpy(float* y, float alpha, const float* x, size_t n) = 0;

  // ---------------------------------------------------------------------
  // Layers. B batch, T sequence length, C channels, V vocabulary,
  // NH heads (C % NH == 0), OC output channels.
  // ---------------------------------------------------------------------

  // Token + position embedding.
  //   out[B,T,C] = wte[inp[b,t], :] + wpe[t, :]
  // inp: [B,T] in [0, V); wte: [V,C]; wpe: [>=T, C].
  virtual void EncoderForward(float* out, const int32_t* inp,
                              const float* wte, const float* wpe, int B, int T,
                              int C) = 0;
  // dwte[inp[b,t], :] += dout[b,t,:];  dwpe[t, :] += dout[b,t,:].
  virtual void EncoderBackward(float* dwte, float* dwpe, const float* dout,
                               const int32_t* inp, int B, int T, int C) = 0;

  // LayerNorm over the last dimension (eps = 1e-5, biased variance).
  //   out[N,C] = (inp - mean) * rstd * weight[C] + bias[C]
  // Saves mean[N] and rstd[N] (= 1/sqrt(var + eps)) for the backward pass.
  virtual void LayerNormForward(float* out, float* mean, float* rstd,
                                const float* inp, const float* weight,
                                const float* bias, int N, int C) = 0;
  // dinp[N,C] += ..., dweight[C] += ..., dbias[C] += ...
  virtual void LayerNormBackward(float* dinp, float* dweight, float* dbias,
                                 const float* dout, const float* inp,
                                 const float* weight, const float* mean,
                                 const float* rstd, int N, int C) = 0;

  // Linear layer.
  //   out[N,OC] = inp[N,C] @ weight[OC,C]^T + bias[OC]   (bias nullable)
  virtual void MatmulForward(float* out, const float* inp, const float* weight,
                             const float* bias, int N, int C, int OC) = 0;
  //   dinp[N,C]     += dout[N,OC] @ weight[OC,C]
  //   dweight[OC,C] += dout^T[OC,N] @ inp[N,C]
  //   dbias[OC]     += sum_n dout[n,:]                   (dbias nullable)
  virtual void MatmulBackward(float* dinp, float* dweight, float* dbias,
                              const float* dout, const float* inp,
                              const float* weight, int N, int C, int OC) = 0;

  // Causal multi-head self-attention, head size hs = C / NH.
  //   qkv[B,T,3C] holds q | k | v; head h uses channels [h*hs, (h+1)*hs)
  //   of each.
  //   att[B,NH,T,T] = softmax_j<=t(q_t . k_j / sqrt(hs)), 0 for j > t
  //                   (saved for the backward pass)
  //   out[B,T,C]    = att @ v, heads concatenated along C
  virtual void AttentionForward(float* out, float* att, const float* qkv,
                                int B, int T, int C, int NH) = 0;
  //   dqkv[B,T,3C] += ...
  // scratch: [B,NH,T,T] floats of backend memory, clobbered.
  virtual void AttentionBackward(float* dqkv, float* scratch,
                                 const float* dout, const float* qkv,
                                 const float* att, int B, int T, int C,
                                 int NH) = 0;

  // GELU, tanh approximation:
  //   out[N] = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
  virtual void GeluForward(float* out, const float* inp, size_t N) = 0;
  // dinp[N] += gelu'(inp) * dout
  virtual void GeluBackward(float* dinp, const float* inp, const float* dout,
                            size_t N) = 0;

  // out[N] = inp1 + inp2 (out may alias either input).
  virtual void ResidualForward(float* out, const float* inp1,
                               const float* inp2, size_t N) = 0;
  // dinp1[N] += dout; dinp2[N] += dout.
  virtual void ResidualBackward(float* dinp1, float* dinp2, const float* dout,
                                size_t N) = 0;

  // Fused softmax + cross-entropy over the last dimension.
  //   probs[N,V]  = softmax(logits[N,V])
  //   losses[N]   = -log probs[n, targets[n]]     (targets[N] in [0, V))
  virtual void CrossEntropyForward(float* losses, float* probs,
                                   const float* logits, const int32_t* targets,
                                   int N, int V) = 0;
  //   dlogits[N,V] += dloss * (probs - onehot(targets))
  // dloss is d(objective)/d(losses[n]), the same for every n: 1/N for the
  // mean loss (times any gradient scale the caller wants).
  virtual void CrossEntropyBackward(float* dlogits, const float* probs,
                                    const int32_t* targets, float dloss, int N,
                                    int V) = 0;
};

}  // namespace lmps

#endif  // LMPS_WORKER_BACKEND_BACKEND_H_
