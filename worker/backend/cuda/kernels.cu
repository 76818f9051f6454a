// The CUDA backend's custom kernels (see kernels.h), except the embedding
// backward's token grouping (encoder_backward.cu).
//
// Conventions: elementwise kernels are grid-stride loops over size_t
// indices; row kernels give a warp (or a block, for vocabulary-wide rows)
// to each row and reduce with xor butterflies, whose result is identical in
// every lane. No atomics: every reduction has a fixed order given the
// shapes, so results are reproducible bit for bit.
#include <algorithm>
#include <cstdint>

#include "worker/backend/cuda/kernel_math.h"
#include "worker/backend/cuda/kernels.h"

namespace lmps {
namespace cuda_kernels {
namespace {

namespace km = ::lmps::cuda_math;

constexpr int kThreads = 256;
constexpr int kWarp = 32;
constexpr int kWarpsPerBlock = kThreads / kWarp;
constexpr unsigned kFullMask = 0xffffffffu;
// Grid-stride loops cap the grid here (plenty to fill any GPU).
constexpr size_t kMaxBlocks = size_t{1} << 16;

unsigned BlocksFor(size_t n, int threads = kThreads) {
  const size_t blocks = (n + threads - 1) / threads;
  return static_cast<unsigned>(std::min(blocks, kMaxBlocks));
}

// Blocks for one warp per row.
unsigned WarpRowBlocks(int64_t rows) {
  return static_cast<unsigned>((rows + kWarpsPerBlock - 1) / kWarpsPerBlock);
}

__device__ __forceinline__ size_t GlobalThread() {
  return static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x;
}

__device__ __forceinline__ size_t GlobalStride() {
  return static_cast<size_t>(gridDim.x) * blockDim.x;
}

__device__ __forceinline__ float WarpSum(float v) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    v += __shfl_xor_sync(kFullMask, v, offset);
  }
  return v;
}

// SoftmaxMerge is symmetric, so every lane ends with the same state.
__device__ __forceinline__ km::SoftmaxState WarpSoftmax(km::SoftmaxState s) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    km::SoftmaxState other;
    other.max = __shfl_xor_sync(kFullMask, s.max, offset);
    other.sum = __shfl_xor_sync(kFullMask, s.sum, offset);
    km::SoftmaxMerge(s, other);
  }
  return s;
}

// ---------------------------------------------------------------------------
// Elementwise.
// ---------------------------------------------------------------------------

__global__ void AxpyKernel(float* y, float alpha, const float* x, size_t n) {
  for (size_t i = GlobalThread(); i < n; i += GlobalStride()) {
    y[i] += alpha * x[i];
  }
}

__global__ void GeluForwardKernel(float* out, const float* inp, size_t n) {
  for (size_t i = GlobalThread(); i < n; i += GlobalStride()) {
    out[i] = km::GeluForward(inp[i]);
  }
}

__global__ void GeluBackwardKernel(float* dinp, const float* inp,
                                   const float* dout, size_t n) {
  for (size_t i = GlobalThread(); i < n; i += GlobalStride()) {
    dinp[i] += km::GeluGrad(inp[i]) * dout[i];
  }
}

__global__ void ResidualForwardKernel(float* out, const float* inp1,
                                      const float* inp2, size_t n) {
  for (size_t i = GlobalThread(); i < n; i += GlobalStride()) {
    out[i] = inp1[i] + inp2[i];
  }
}

__global__ void ResidualBackwardKernel(float* dinp1, float* dinp2,
                                       const float* dout, size_t n) {
  for (size_t i = GlobalThread(); i < n; i += GlobalStride()) {
    const float d = dout[i];
    dinp1[i] += d;
    dinp2[i] += d;
  }
}

__global__ void FloatToBf16Kernel(uint16_t* dst, const float* src, size_t n) {
  for (size_t i = GlobalThread(); i < n; i += GlobalStride()) {
    dst[i] = km::FloatToBf16Bits(src[i]);
  }
}

// Four elements per thread: n4 float4 loads, n4 8-byte stores.
__global__ void FloatToBf16x4Kernel(uint2* dst, const float4* src, size_t n4) {
  for (size_t i = GlobalThread(); i < n4; i += GlobalStride()) {
    const float4 v = src[i];
    uint2 out;
    out.x = static_cast<uint32_t>(km::FloatToBf16Bits(v.x)) |
            (static_cast<uint32_t>(km::FloatToBf16Bits(v.y)) << 16);
    out.y = static_cast<uint32_t>(km::FloatToBf16Bits(v.z)) |
            (static_cast<uint32_t>(km::FloatToBf16Bits(v.w)) << 16);
    dst[i] = out;
  }
}

__global__ void AddBiasKernel(float* out, const float* bias, int cols,
                              size_t n) {
  for (size_t i = GlobalThread(); i < n; i += GlobalStride()) {
    out[i] += bias[i % cols];
  }
}

// ---------------------------------------------------------------------------
// Embedding.
// ---------------------------------------------------------------------------

__global__ void EncoderForwardKernel(float* out, const int32_t* inp,
                                     const float* wte, const float* wpe, int T,
                                     int C, size_t n) {
  for (size_t i = GlobalThread(); i < n; i += GlobalStride()) {
    const size_t row = i / C;
    const size_t c = i - row * C;
    const size_t t = row % T;
    out[i] = wte[static_cast<size_t>(inp[row]) * C + c] + wpe[t * C + c];
  }
}

__global__ void EncoderBackwardWpeKernel(float* dwpe, const float* dout, int B,
                                         int T, int C) {
  const size_t n = static_cast<size_t>(T) * C;
  for (size_t i = GlobalThread(); i < n; i += GlobalStride()) {
    float acc = 0.0f;
    for (int b = 0; b < B; ++b) acc += dout[static_cast<size_t>(b) * n + i];
    dwpe[i] += acc;
  }
}

// ---------------------------------------------------------------------------
// LayerNorm.
// ---------------------------------------------------------------------------

__global__ void LayerNormForwardKernel(float* out, float* mean, float* rstd,
                                       const float* inp, const float* weight,
                                       const float* bias, int N, int C) {
  const int row = blockIdx.x * kWarpsPerBlock + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (row >= N) return;
  const float* x = inp + static_cast<size_t>(row) * C;
  float sum = 0.0f;
  for (int i = lane; i < C; i += kWarp) sum += x[i];
  const float m = WarpSum(sum) / C;
  float var = 0.0f;
  for (int i = lane; i < C; i += kWarp) {
    const float d = x[i] - m;
    var += d * d;
  }
  const float s = km::LayerNormRstd(WarpSum(var) / C);
  float* o = out + static_cast<size_t>(row) * C;
  for (int i = lane; i < C; i += kWarp) {
    o[i] = km::LayerNormOut(x[i], m, s, weight[i], bias[i]);
  }
  if (lane == 0) {
    mean[row] = m;
    rstd[row] = s;
  }
}

__global__ void LayerNormBackwardInputKernel(float* dinp, const float* dout,
                                             const float* inp,
                                             const float* weight,
                                             const float* mean,
                                             const float* rstd, int N, int C) {
  const int row = blockIdx.x * kWarpsPerBlock + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (row >= N) return;
  const size_t base = static_cast<size_t>(row) * C;
  const float m = mean[row], s = rstd[row];
  float dnorm_sum = 0.0f, dnorm_norm_sum = 0.0f;
  for (int i = lane; i < C; i += kWarp) {
    const float norm = km::LayerNormNorm(inp[base + i], m, s);
    const float dnorm = weight[i] * dout[base + i];
    dnorm_sum += dnorm;
    dnorm_norm_sum += dnorm * norm;
  }
  const float dnorm_mean = WarpSum(dnorm_sum) / C;
  const float dnorm_norm_mean = WarpSum(dnorm_norm_sum) / C;
  for (int i = lane; i < C; i += kWarp) {
    const float norm = km::LayerNormNorm(inp[base + i], m, s);
    const float dnorm = weight[i] * dout[base + i];
    dinp[base + i] +=
        km::LayerNormDinp(dnorm, dnorm_mean, norm, dnorm_norm_mean, s);
  }
}

// ---------------------------------------------------------------------------
// Column sums (bias and LayerNorm parameter gradients).
// ---------------------------------------------------------------------------

constexpr int kColTile = 32;  // columns per block (one per lane)
constexpr int kColRows = 8;   // rows in flight per block (warps)
constexpr int kRowsPerChunk = 128;
constexpr int kMaxChunks = 64;

int ColumnChunks(int N) {
  return std::min(kMaxChunks,
                  std::max(1, (N + kRowsPerChunk - 1) / kRowsPerChunk));
}

// Block (kColTile, kColRows) sums rows [chunk * rows_per_chunk, ...) of
// columns [blockIdx.x * kColTile, ...) into part_*[chunk, c].
template <bool kWithProduct>
__global__ void ColumnPartialsKernel(float* part_sum, float* part_prod,
                                     const float* dout, const float* inp,
                                     const float* mean, const float* rstd,
                                     int N, int C, int rows_per_chunk) {
  __shared__ float s_sum[kColRows][kColTile];
  __shared__ float s_prod[kColRows][kColTile];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int c = blockIdx.x * kColTile + tx;
  const int chunk = blockIdx.y;
  const int n0 = chunk * rows_per_chunk;
  const int n1 = min(N, n0 + rows_per_chunk);
  float sum = 0.0f, prod = 0.0f;
  if (c < C) {
    for (int n = n0 + ty; n < n1; n += kColRows) {
      const size_t i = static_cast<size_t>(n) * C + c;
      const float d = dout[i];
      sum += d;
      if constexpr (kWithProduct) {
        prod += km::LayerNormNorm(inp[i], mean[n], rstd[n]) * d;
      }
    }
  }
  s_sum[ty][tx] = sum;
  s_prod[ty][tx] = prod;
  __syncthreads();
  if (ty == 0 && c < C) {
    for (int r = 1; r < kColRows; ++r) {
      sum += s_sum[r][tx];
      prod += s_prod[r][tx];
    }
    part_sum[static_cast<size_t>(chunk) * C + c] = sum;
    if constexpr (kWithProduct)
      part_prod[static_cast<size_t>(chunk) * C + c] = prod;
  }
}

__global__ void ColumnFinalizeKernel(float* dsum, float* dprod,
                                     const float* part_sum,
                                     const float* part_prod, int chunks,
                                     int C) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= C) return;
  float sum = 0.0f, prod = 0.0f;
  for (int k = 0; k < chunks; ++k) {
    sum += part_sum[static_cast<size_t>(k) * C + c];
    if (dprod != nullptr) prod += part_prod[static_cast<size_t>(k) * C + c];
  }
  dsum[c] += sum;
  if (dprod != nullptr) dprod[c] += prod;
}

// ---------------------------------------------------------------------------
// Attention softmax.
// ---------------------------------------------------------------------------

__global__ void AttentionSoftmaxForwardKernel(float* att, int64_t rows, int T) {
  const int64_t row =
      static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (row >= rows) return;
  const int t = static_cast<int>(row % T);
  float* x = att + row * T;
  km::SoftmaxState s = km::SoftmaxEmpty();
  for (int j = lane; j <= t; j += kWarp) km::SoftmaxUpdate(s, x[j]);
  s = WarpSoftmax(s);
  for (int j = lane; j < T; j += kWarp) {
    x[j] = j <= t ? km::SoftmaxProb(x[j], s) : 0.0f;
  }
}

__global__ void AttentionSoftmaxBackwardKernel(float* d, const float* att,
                                               int64_t rows, int T,
                                               float scale) {
  const int64_t row =
      static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (row >= rows) return;
  const int t = static_cast<int>(row % T);
  float* dr = d + row * T;
  const float* a = att + row * T;
  float dot = 0.0f;
  for (int j = lane; j <= t; j += kWarp) dot += a[j] * dr[j];
  dot = WarpSum(dot);
  // Each lane rewrites exactly the elements it read.
  for (int j = lane; j < T; j += kWarp) {
    dr[j] = j <= t ? km::SoftmaxBackward(a[j], dr[j], dot, scale) : 0.0f;
  }
}

// ---------------------------------------------------------------------------
// Cross-entropy: one block per row (rows are vocabulary-wide).
// ---------------------------------------------------------------------------

constexpr int kCeThreads = 512;

__global__ void CrossEntropyForwardKernel(float* losses, float* probs,
                                          const float* logits,
                                          const int32_t* targets, int N,
                                          int V) {
  __shared__ km::SoftmaxState warp_states[kCeThreads / kWarp];
  __shared__ km::SoftmaxState row_state;
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int warps = blockDim.x / kWarp;
  for (int n = blockIdx.x; n < N; n += gridDim.x) {
    const float* x = logits + static_cast<size_t>(n) * V;
    km::SoftmaxState s = km::SoftmaxEmpty();
    for (int v = threadIdx.x; v < V; v += blockDim.x)
      km::SoftmaxUpdate(s, x[v]);
    s = WarpSoftmax(s);
    if (lane == 0) warp_states[warp] = s;
    __syncthreads();
    if (threadIdx.x == 0) {
      km::SoftmaxState r = warp_states[0];
      for (int w = 1; w < warps; ++w) km::SoftmaxMerge(r, warp_states[w]);
      row_state = r;
      losses[n] = km::CrossEntropyLoss(r, x[targets[n]]);
    }
    __syncthreads();
    const km::SoftmaxState r = row_state;
    float* p = probs + static_cast<size_t>(n) * V;
    for (int v = threadIdx.x; v < V; v += blockDim.x) {
      p[v] = km::SoftmaxProb(x[v], r);
    }
    __syncthreads();  // row_state and warp_states are reused
  }
}

__global__ void CrossEntropyBackwardKernel(float* dlogits, const float* probs,
                                           const int32_t* targets, float dloss,
                                           int N, int V) {
  for (int n = blockIdx.x; n < N; n += gridDim.x) {
    const int target = targets[n];
    const size_t base = static_cast<size_t>(n) * V;
    for (int v = threadIdx.x; v < V; v += blockDim.x) {
      dlogits[base + v] +=
          km::CrossEntropyGrad(probs[base + v], v == target, dloss);
    }
  }
}

unsigned RowBlocks(int N) {
  return static_cast<unsigned>(std::min<int64_t>(N, kMaxBlocks));
}

}  // namespace

void Axpy(cudaStream_t stream, float* y, float alpha, const float* x,
          size_t n) {
  if (n == 0) return;
  AxpyKernel<<<BlocksFor(n), kThreads, 0, stream>>>(y, alpha, x, n);
}

void EncoderForward(cudaStream_t stream, float* out, const int32_t* inp,
                    const float* wte, const float* wpe, int B, int T, int C) {
  const size_t n = static_cast<size_t>(B) * T * C;
  if (n == 0) return;
  EncoderForwardKernel<<<BlocksFor(n), kThreads, 0, stream>>>(out, inp, wte,
                                                              wpe, T, C, n);
}

void EncoderBackwardWpe(cudaStream_t stream, float* dwpe, const float* dout,
                        int B, int T, int C) {
  const size_t n = static_cast<size_t>(T) * C;
  if (n == 0 || B == 0) return;
  EncoderBackwardWpeKernel<<<BlocksFor(n), kThreads, 0, stream>>>(dwpe, dout, B,
                                                                  T, C);
}

void LayerNormForward(cudaStream_t stream, float* out, float* mean, float* rstd,
                      const float* inp, const float* weight, const float* bias,
                      int N, int C) {
  if (N == 0) return;
  LayerNormForwardKernel<<<WarpRowBlocks(N), kThreads, 0, stream>>>(
      out, mean, rstd, inp, weight, bias, N, C);
}

void LayerNormBackwardInput(cudaStream_t stream, float* dinp, const float* dout,
                            const float* inp, const float* weight,
                            const float* mean, const float* rstd, int N,
                            int C) {
  if (N == 0) return;
  LayerNormBackwardInputKernel<<<WarpRowBlocks(N), kThreads, 0, stream>>>(
      dinp, dout, inp, weight, mean, rstd, N, C);
}

size_t ColumnSumsScratchFloats(int N, int C) {
  return 2 * static_cast<size_t>(ColumnChunks(N)) * C;
}

void ColumnSums(cudaStream_t stream, float* scratch, float* dsum, float* dprod,
                const float* dout, const float* inp, const float* mean,
                const float* rstd, int N, int C) {
  if (N == 0 || C == 0) return;
  const int chunks = ColumnChunks(N);
  const int rows_per_chunk = (N + chunks - 1) / chunks;
  float* part_sum = scratch;
  float* part_prod = scratch + static_cast<size_t>(chunks) * C;
  const dim3 grid((C + kColTile - 1) / kColTile, chunks);
  const dim3 block(kColTile, kColRows);
  if (dprod != nullptr) {
    ColumnPartialsKernel<true><<<grid, block, 0, stream>>>(
        part_sum, part_prod, dout, inp, mean, rstd, N, C, rows_per_chunk);
  } else {
    ColumnPartialsKernel<false>
        <<<grid, block, 0, stream>>>(part_sum, nullptr, dout, nullptr, nullptr,
                                     nullptr, N, C, rows_per_chunk);
  }
  ColumnFinalizeKernel<<<(C + kThreads - 1) / kThreads, kThreads, 0, stream>>>(
      dsum, dprod, part_sum, part_prod, chunks, C);
}

void FloatToBf16(cudaStream_t stream, uint16_t* dst, const float* src,
                 size_t n) {
  if (n == 0) return;
  size_t done = 0;
  if (reinterpret_cast<uintptr_t>(src) % 16 == 0 &&
      reinterpret_cast<uintptr_t>(dst) % 8 == 0) {
    const size_t n4 = n / 4;
    if (n4 > 0) {
      FloatToBf16x4Kernel<<<BlocksFor(n4), kThreads, 0, stream>>>(
          reinterpret_cast<uint2*>(dst), reinterpret_cast<const float4*>(src),
          n4);
    }
    done = n4 * 4;
  }
  if (done < n) {
    FloatToBf16Kernel<<<BlocksFor(n - done), kThreads, 0, stream>>>(
        dst + done, src + done, n - done);
  }
}

void AddBias(cudaStream_t stream, float* out, const float* bias, int rows,
             int cols) {
  const size_t n = static_cast<size_t>(rows) * cols;
  if (n == 0) return;
  AddBiasKernel<<<BlocksFor(n), kThreads, 0, stream>>>(out, bias, cols, n);
}

void AttentionSoftmaxForward(cudaStream_t stream, float* att, int64_t rows,
                             int T) {
  if (rows == 0) return;
  AttentionSoftmaxForwardKernel<<<WarpRowBlocks(rows), kThreads, 0, stream>>>(
      att, rows, T);
}

void AttentionSoftmaxBackward(cudaStream_t stream, float* d, const float* att,
                              int64_t rows, int T, float scale) {
  if (rows == 0) return;
  AttentionSoftmaxBackwardKernel<<<WarpRowBlocks(rows), kThreads, 0, stream>>>(
      d, att, rows, T, scale);
}

void GeluForward(cudaStream_t stream, float* out, const float* inp, size_t n) {
  if (n == 0) return;
  GeluForwardKernel<<<BlocksFor(n), kThreads, 0, stream>>>(out, inp, n);
}

void GeluBackward(cudaStream_t stream, float* dinp, const float* inp,
                  const float* dout, size_t n) {
  if (n == 0) return;
  GeluBackwardKernel<<<BlocksFor(n), kThreads, 0, stream>>>(dinp, inp, dout, n);
}

void ResidualForward(cudaStream_t stream, float* out, const float* inp1,
                     const float* inp2, size_t n) {
  if (n == 0) return;
  ResidualForwardKernel<<<BlocksFor(n), kThreads, 0, stream>>>(out, inp1, inp2,
                                                               n);
}

void ResidualBackward(cudaStream_t stream, float* dinp1, float* dinp2,
                      const float* dout, size_t n) {
  if (n == 0) return;
  ResidualBackwardKernel<<<BlocksFor(n), kThreads, 0, stream>>>(dinp1, dinp2,
                                                                dout, n);
}

void CrossEntropyForward(cudaStream_t stream, float* losses, float* probs,
                         const float* logits, const int32_t* targets, int N,
                         int V) {
  if (N == 0) return;
  CrossEntropyForwardKernel<<<RowBlocks(N), kCeThreads, 0, stream>>>(
      losses, probs, logits, targets, N, V);
}

void CrossEntropyBackward(cudaStream_t stream, float* dlogits,
                          const float* probs, const int32_t* targets,
                          float dloss, int N, int V) {
  if (N == 0) return;
  CrossEntropyBackwardKernel<<<RowBlocks(N), kThreads, 0, stream>>>(
      dlogits, probs, targets, dloss, N, V);
}

}  // namespace cuda_kernels
}  // namespace lmps
