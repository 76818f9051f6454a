// Deterministic token-embedding backward: dwte[inp[n]] += dout[n].
//
// Several positions may hold the same token, so a thread per position would
// need atomics (and their run-to-run rounding differences). Instead a
// stable radix sort (CUB) of the (token, position) pairs puts the positions
// of each token next to each other in increasing order; the block that owns
// the first entry of a run sums the run's rows in that order and adds the
// sum to the token's row, which no other block touches.
#include <algorithm>
#include <cub/device/device_radix_sort.cuh>

#include "worker/backend/cuda/kernels.h"

namespace lmps {
namespace cuda_kernels {
namespace {

constexpr int kThreads = 256;
constexpr size_t kMaxBlocks = size_t{1} << 16;
constexpr size_t kAlign = 256;

size_t AlignUp(size_t bytes) { return (bytes + kAlign - 1) / kAlign * kAlign; }

__global__ void IotaKernel(int32_t* v, int n) {
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n;
       i += gridDim.x * blockDim.x) {
    v[i] = i;
  }
}

// Block per sorted entry i; only the first entry of each token's run works.
__global__ void AccumulateRunsKernel(float* dwte, const float* dout,
                                     const int32_t* tokens,
                                     const int32_t* positions, int N, int C) {
  for (int i = blockIdx.x; i < N; i += gridDim.x) {
    const int32_t token = tokens[i];
    if (i > 0 && tokens[i - 1] == token) continue;
    int end = i + 1;
    while (end < N && tokens[end] == token) ++end;
    float* row = dwte + static_cast<size_t>(token) * C;
    for (int c = threadIdx.x; c < C; c += blockDim.x) {
      float acc = 0.0f;
      for (int j = i; j < end; ++j) {
        acc += dout[static_cast<size_t>(positions[j]) * C + c];
      }
      row[c] += acc;
    }
  }
}

size_t SortTempBytes(int N) {
  size_t bytes = 0;
  cub::DeviceRadixSort::SortPairs(
      nullptr, bytes, static_cast<const int32_t*>(nullptr),
      static_cast<int32_t*>(nullptr), static_cast<const int32_t*>(nullptr),
      static_cast<int32_t*>(nullptr), N);
  return bytes;
}

}  // namespace

size_t EncoderBackwardWteScratchBytes(int N) {
  // positions_in, tokens_out, positions_out, then CUB's temporary storage.
  return 3 * AlignUp(static_cast<size_t>(N) * sizeof(int32_t)) +
         AlignUp(SortTempBytes(N));
}

cudaError_t EncoderBackwardWte(cudaStream_t stream, void* scratch, float* dwte,
                               const float* dout, const int32_t* inp, int N,
                               int C) {
  if (N == 0 || C == 0) return cudaSuccess;
  const size_t array_bytes = AlignUp(static_cast<size_t>(N) * sizeof(int32_t));
  char* base = static_cast<char*>(scratch);
  int32_t* positions_in = reinterpret_cast<int32_t*>(base);
  int32_t* tokens_out = reinterpret_cast<int32_t*>(base + array_bytes);
  int32_t* positions_out = reinterpret_cast<int32_t*>(base + 2 * array_bytes);
  void* temp = base + 3 * array_bytes;
  size_t temp_bytes = SortTempBytes(N);

  const unsigned blocks = static_cast<unsigned>(
      std::min((static_cast<size_t>(N) + kThreads - 1) / kThreads, kMaxBlocks));
  IotaKernel<<<blocks, kThreads, 0, stream>>>(positions_in, N);
  const cudaError_t e = cub::DeviceRadixSort::SortPairs(
      temp, temp_bytes, inp, tokens_out, positions_in, positions_out, N,
      /*begin_bit=*/0, /*end_bit=*/static_cast<int>(8 * sizeof(int32_t)),
      stream);
  if (e != cudaSuccess) return e;
  const int threads = std::min(kThreads, (C + 31) / 32 * 32);
  AccumulateRunsKernel<<<static_cast<unsigned>(std::min<size_t>(N, kMaxBlocks)),
                         threads, 0, stream>>>(dwte, dout, tokens_out,
                                               positions_out, N, C);
  return cudaSuccess;
}

}  // namespace cuda_kernels
}  // namespace lmps
