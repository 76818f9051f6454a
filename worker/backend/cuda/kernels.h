// Launchers of the CUDA backend's custom kernels (kernels.cu,
// encoder_backward.cu). Each enqueues its kernels on `stream` and returns
// without waiting; launch errors are left for cudaGetLastError (the backend
// checks after every launcher). Sizes of 0 launch nothing. Semantics are
// those of the same-named functions of backend.h unless stated; the
// per-element math is kernel_math.h.
//
// Internal to the CUDA backend (only .cu files include it).
//
// Thread-safety: as the CUDA runtime (any thread; ordering is the stream's).
#ifndef LMPS_WORKER_BACKEND_CUDA_KERNELS_H_
#define LMPS_WORKER_BACKEND_CUDA_KERNELS_H_

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace lmps {
namespace cuda_kernels {

// y[i] += alpha * x[i].
void Axpy(cudaStream_t stream, float* y, float alpha, const float* x, size_t n);

void EncoderForward(cudaStream_t stream, float* out, const int32_t* inp,
                    const float* wte, const float* wpe, int B, int T, int C);
// dwpe[t] += sum_b dout[b,t] (one thread per (t, c), b in order).
void EncoderBackwardWpe(cudaStream_t stream, float* dwpe, const float* dout,
                        int B, int T, int C);
// dwte[inp[n]] += dout[n] for the N = B*T positions, deterministically: a
// stable radix sort of (token, position) groups the positions of each token
// and one block sums each group in position order. `scratch` is device
// memory of EncoderBackwardWteScratchBytes(N) bytes. Returns the first
// cudaError_t of the sort (launch errors of the other kernels as usual).
size_t EncoderBackwardWteScratchBytes(int N);
cudaError_t EncoderBackwardWte(cudaStream_t stream, void* scratch, float* dwte,
                               const float* dout, const int32_t* inp, int N,
                               int C);

// One warp per row.
void LayerNormForward(cudaStream_t stream, float* out, float* mean, float* rstd,
                      const float* inp, const float* weight, const float* bias,
                      int N, int C);
// dinp += ... only (one warp per row); the parameter gradients are column
// sums, see ColumnSums.
void LayerNormBackwardInput(cudaStream_t stream, float* dinp, const float* dout,
                            const float* inp, const float* weight,
                            const float* mean, const float* rstd, int N, int C);

// Column sums of dout[N,C], deterministic two-stage reduction (row chunks
// that depend only on N, then the chunks in order):
//   dsum[c]  += sum_n dout[n,c]
//   dprod[c] += sum_n dout[n,c] * (inp[n,c] - mean[n]) * rstd[n]
// dprod (and inp, mean, rstd) may be null: then only dsum. `scratch` is
// device memory of ColumnSumsScratchFloats(N, C) floats.
size_t ColumnSumsScratchFloats(int N, int C);
void ColumnSums(cudaStream_t stream, float* scratch, float* dsum, float* dprod,
                const float* dout, const float* inp, const float* mean,
                const float* rstd, int N, int C);

// dst[i] = bf16 bits of src[i] (kernel_math.h FloatToBf16Bits: round to
// nearest even) for i in [0, n). dst and src must not overlap. Vectorised
// (four elements per thread) when src is 16-byte and dst 8-byte aligned.
void FloatToBf16(cudaStream_t stream, uint16_t* dst, const float* src,
                 size_t n);

// out[n, c] += bias[c] for out[rows, cols].
void AddBias(cudaStream_t stream, float* out, const float* bias, int rows,
             int cols);

// In place on att[rows = B*NH*T, T] holding scaled scores: row r (position
// t = r % T) becomes softmax over j <= t, zeros for j > t. One warp per
// row.
void AttentionSoftmaxForward(cudaStream_t stream, float* att, int64_t rows,
                             int T);
// In place on d[rows, T] holding datt: d = att * (datt - <att, datt>) *
// scale over j <= t, zeros for j > t.
void AttentionSoftmaxBackward(cudaStream_t stream, float* d, const float* att,
                              int64_t rows, int T, float scale);

void GeluForward(cudaStream_t stream, float* out, const float* inp, size_t n);
void GeluBackward(cudaStream_t stream, float* dinp, const float* inp,
                  const float* dout, size_t n);
void ResidualForward(cudaStream_t stream, float* out, const float* inp1,
                     const float* inp2, size_t n);
void ResidualBackward(cudaStream_t stream, float* dinp1, float* dinp2,
                      const float* dout, size_t n);

// One block per row.
void CrossEntropyForward(cudaStream_t stream, float* losses, float* probs,
                         const float* logits, const int32_t* targets, int N,
                         int V);
void CrossEntropyBackward(cudaStream_t stream, float* dlogits,
                          const float* probs, const int32_t* targets,
                          float dloss, int N, int V);

}  // namespace cuda_kernels
}  // namespace lmps

#endif  // LMPS_WORKER_BACKEND_CUDA_KERNELS_H_
