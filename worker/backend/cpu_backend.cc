#include "worker/backend/cpu_backend.h"

#include <cblas.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "worker/backend/cpu_vec.h"
#include "common/threads/thread_pool.h"

namespace lmps {
namespace {

constexpr float kLayerNormEps = 1e-5f;

// Elements of simple streaming work below which a task is not worth
// handing to another thread.
constexpr size_t kGrain = 1 << 14;

// The [begin, end) slice of [0, n) that part `id` of `parts` covers.
inline void PartRange(size_t n, int id, int parts, size_t* begin,
                        size_t* end) {
  const size_t chunk = (n + parts - 1) / parts;
  *begin = std::min(n, chunk * id);
  *end = std::min(n, *begin + chunk);
}

// Splits [0, n) into at most 4 tasks per thread of at least `grain` items
// and runs f(begin, end) on each. The split depends only on n, grain and
// the thread count, never on scheduling.
void ParallelRange(ThreadPool& pool, size_t n, size_t grain,
                   absl::FunctionRef<void(size_t, size_t)> f) {
  if (n == 0) return;
  grain = std::max<size_t>(grain, 1);
  const int tasks = static_cast<int>(std::min<size_t>(
      4 * static_cast<size_t>(pool.num_threads()), (n + grain - 1) / grain));
  if (tasks <= 1) {
    f(0, n);
    return;
  }
  pool.ParallelFor(tasks, [&](int t) {
    size_t begin, end;
    PartRange(n, t, tasks, &begin, &end);
    if (end > begin) f(begin, end);
  });
}

// Row-major C[M,N] = alpha op(A)[M,K] op(B)[K,N] + beta C on the pool:
// each task calls single-threaded sgemm on a slice of the rows of C (or of
// its columns when M is small), in whole 16-wide tiles (the kernel's). One
// threading runtime for everything: OpenBLAS's own threads would fight ours
// for the cores.
//
// With row_bias != nullptr, beta is ignored and C's rows are first set to
// row_bias[N] (slice by slice, right before sgemm adds onto them).
void ParallelSgemm(ThreadPool& pool, CBLAS_TRANSPOSE ta, CBLAS_TRANSPOSE tb,
                   int M, int N, int K, float alpha, const float* A, int lda,
                   const float* B, int ldb, float beta, float* C, int ldc,
                   const float* row_bias = nullptr) {
  constexpr double kMinFlopsPerTask = 1 << 21;
  const bool split_m = M >= N;
  const int dim = split_m ? M : N;
  const int tiles = (dim + 15) / 16;
  const double flops = 2.0 * M * N * K;
  const int tasks = static_cast<int>(
      std::min<double>({4.0 * pool.num_threads(), static_cast<double>(tiles),
                        std::max(1.0, flops / kMinFlopsPerTask)}));
  // C[m0:m1, n0:n1] = row_bias[n0:n1].
  auto fill_bias = [&](int m0, int m1, int n0, int n1) {
    for (int m = m0; m < m1; ++m) {
      std::memcpy(C + static_cast<size_t>(m) * ldc + n0, row_bias + n0,
                  sizeof(float) * (n1 - n0));
    }
  };
  if (row_bias != nullptr) beta = 1.0f;
  if (tasks <= 1) {
    if (row_bias != nullptr) fill_bias(0, M, 0, N);
    cblas_sgemm(CblasRowMajor, ta, tb, M, N, K, alpha, A, lda, B, ldb, beta,
                C, ldc);
    return;
  }
  pool.ParallelFor(tasks, [&](int task) {
    size_t t0, t1;
    PartRange(tiles, task, tasks, &t0, &t1);
    const int i0 = std::min<int>(dim, static_cast<int>(t0) * 16);
    const int i1 = std::min<int>(dim, static_cast<int>(t1) * 16);
    if (i1 <= i0) return;
    if (split_m) {
      if (row_bias != nullptr) fill_bias(i0, i1, 0, N);
      const float* a =
          ta == CblasNoTrans ? A + static_cast<size_t>(i0) * lda : A + i0;
      cblas_sgemm(CblasRowMajor, ta, tb, i1 - i0, N, K, alpha, a, lda, B, ldb,
                  beta, C + static_cast<size_t>(i0) * ldc, ldc);
    } else {
      if (row_bias != nullptr) fill_bias(0, M, i0, i1);
      const float* b =
          tb == CblasNoTrans ? B + i0 : B + static_cast<size_t>(i0) * ldb;
      cblas_sgemm(CblasRowMajor, ta, tb, M, i1 - i0, K, alpha, A, lda, b, ldb,
                  beta, C + i0, ldc);
    }
  });
}

}  // namespace

absl::StatusOr<std::unique_ptr<CpuBackend>> CpuBackend::Create(
    const CpuBackendOptions& options) {
  if (options.num_threads < 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "cpu backend: num_threads must be >= 0, got ", options.num_threads));
  }
  int threads = options.num_threads;
  if (threads == 0) {
    threads = std::max(1, static_cast<int>(std::thread::hardware_concurrency()));
  }
  // OpenBLAS runs inside our pool's threads (see ParallelSgemm).
  openblas_set_num_threads(1);
  return std::unique_ptr<CpuBackend>(new CpuBackend(threads));
}

CpuBackend::CpuBackend(int num_threads)
    : pool_(std::make_unique<ThreadPool>(num_threads)) {}

CpuBackend::~CpuBackend() = default;

int CpuBackend::num_threads() const { return pool_->num_threads(); }

std::string CpuBackend::notes() const {
  const char* name = openblas_get_corename();
  const std::string core = name != nullptr ? name : "unknown";
  std::string notes =
      absl::StrCat(num_threads(), " threads, OpenBLAS kernels ", core);
  const std::string lower = absl::AsciiStrToLower(core);
  const bool avx2_kernels = lower == "haswell" || lower == "zen" ||
                            lower == "sandybridge";
  if (avx2_kernels && __builtin_cpu_supports("avx512f") &&
      __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512dq")) {
    absl::StrAppend(&notes,
                    "; this CPU has AVX-512: unset OPENBLAS_CORETYPE (or set "
                    "it to SkylakeX) in the worker's environment for "
                    "OpenBLAS's AVX-512 kernels (1.8x the products on an AMD "
                    "EPYC; docs/operations.md)");
  }
  return notes;
}

void CpuBackend::Zero(float* p, size_t n) {
  ParallelRange(*pool_, n, 16 * kGrain, [&](size_t begin, size_t end) {
    std::memset(p + begin, 0, (end - begin) * sizeof(float));
  });
}

void CpuBackend::Axpy(float* y, float alpha, const float* x, size_t n) {
  ParallelRange(*pool_, n, kGrain, [&](size_t begin, size_t end) {
#pragma omp simd
    for (size_t i = begin; i < end; ++i) y[i] += alpha * x[i];
  });
}

// out[B,T,C] = wte[inp[b,t]] + wpe[t].
void CpuBackend::EncoderForward(float* out, const int32_t* inp,
                                const float* wte, const float* wpe, int B,
                                int T, int C) {
  ParallelRange(*pool_, static_cast<size_t>(B) * T, kGrain / C,
                [&](size_t n0, size_t n1) {
                  for (size_t n = n0; n < n1; ++n) {
                    float* o = out + n * C;
                    const float* e = wte + static_cast<size_t>(inp[n]) * C;
                    const float* p = wpe + (n % T) * C;
#pragma omp simd
                    for (int i = 0; i < C; ++i) o[i] = e[i] + p[i];
                  }
                });
}

// Tasks own disjoint channel ranges, so repeated tokens never race.
void CpuBackend::EncoderBackward(float* dwte, float* dwpe, const float* dout,
                                 const int32_t* inp, int B, int T, int C) {
  const size_t N = static_cast<size_t>(B) * T;
  ParallelRange(*pool_, C, std::max<size_t>(16, kGrain / N),
                [&](size_t c0, size_t c1) {
                  for (size_t n = 0; n < N; ++n) {
                    const float* d = dout + n * C;
                    float* e = dwte + static_cast<size_t>(inp[n]) * C;
                    float* p = dwpe + (n % T) * C;
#pragma omp simd
                    for (size_t i = c0; i < c1; ++i) {
                      e[i] += d[i];
                      p[i] += d[i];
                    }
                  }
                });
}

// out[N,C] = (inp - mean) * rstd * weight + bias; saves mean[N], rstd[N].
void CpuBackend::LayerNormForward(float* out, float* mean, float* rstd,
                                  const float* inp, const float* weight,
                                  const float* bias, int N, int C) {
  ParallelRange(*pool_, N, kGrain / C, [&](size_t n0, size_t n1) {
    for (size_t n = n0; n < n1; ++n) {
      const float* x = inp + n * C;
      float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
      for (int i = 0; i < C; ++i) sum += x[i];
      const float m = sum / C;
      float var = 0.0f;
#pragma omp simd reduction(+ : var)
      for (int i = 0; i < C; ++i) var += (x[i] - m) * (x[i] - m);
      const float s = 1.0f / std::sqrt(var / C + kLayerNormEps);
      float* o = out + n * C;
#pragma omp simd
      for (int i = 0; i < C; ++i) o[i] = (x[i] - m) * s * weight[i] + bias[i];
      mean[n] = m;
      rstd[n] = s;
    }
  });
}

// dinp[N,C] += ..., dweight[C] += ..., dbias[C] += ...
// Each task sums dweight/dbias over its rows into a private partial; the
// partials are added in task order (deterministic).
void CpuBackend::LayerNormBackward(float* dinp, float* dweight, float* dbias,
                                   const float* dout, const float* inp,
                                   const float* weight, const float* mean,
                                   const float* rstd, int N, int C) {
  const int tasks = static_cast<int>(std::max<size_t>(
      1, std::min<size_t>(4 * static_cast<size_t>(pool_->num_threads()),
                          static_cast<size_t>(N) * C / kGrain)));
  std::vector<float> partial(static_cast<size_t>(tasks) * 2 * C, 0.0f);
  auto rows = [&](int task) {
    size_t n0, n1;
    PartRange(N, task, tasks, &n0, &n1);
    float* pw = partial.data() + static_cast<size_t>(task) * 2 * C;
    float* pb = pw + C;
    for (size_t n = n0; n < n1; ++n) {
      const float* d = dout + n * C;
      const float* x = inp + n * C;
      float* dx = dinp + n * C;
      const float m = mean[n], s = rstd[n];
      float dnorm_mean = 0.0f, dnorm_norm_mean = 0.0f;
#pragma omp simd reduction(+ : dnorm_mean, dnorm_norm_mean)
      for (int i = 0; i < C; ++i) {
        const float norm = (x[i] - m) * s;
        const float dnorm = weight[i] * d[i];
        dnorm_mean += dnorm;
        dnorm_norm_mean += dnorm * norm;
      }
      dnorm_mean /= C;
      dnorm_norm_mean /= C;
#pragma omp simd
      for (int i = 0; i < C; ++i) {
        const float norm = (x[i] - m) * s;
        const float dnorm = weight[i] * d[i];
        pb[i] += d[i];
        pw[i] += norm * d[i];
        dx[i] += (dnorm - dnorm_mean - norm * dnorm_norm_mean) * s;
      }
    }
  };
  pool_->ParallelFor(tasks, rows);
  for (int task = 0; task < tasks; ++task) {
    const float* pw = partial.data() + static_cast<size_t>(task) * 2 * C;
    const float* pb = pw + C;
#pragma omp simd
    for (int i = 0; i < C; ++i) {
      dweight[i] += pw[i];
      dbias[i] += pb[i];
    }
  }
}

// out[N,OC] = inp[N,C] @ weight[OC,C]^T + bias[OC].
void CpuBackend::MatmulForward(float* out, const float* inp,
                               const float* weight, const float* bias, int N,
                               int C, int OC) {
  // The bias pre-fills each task's slice of out; sgemm accumulates onto it.
  ParallelSgemm(*pool_, CblasNoTrans, CblasTrans, N, OC, C, 1.0f, inp, C,
                weight, C, 0.0f, out, OC, bias);
}

void CpuBackend::MatmulBackward(float* dinp, float* dweight, float* dbias,
                                const float* dout, const float* inp,
                                const float* weight, int N, int C, int OC) {
  // dinp[N,C] += dout[N,OC] @ weight[OC,C]
  ParallelSgemm(*pool_, CblasNoTrans, CblasNoTrans, N, C, OC, 1.0f, dout, OC,
                weight, C, 1.0f, dinp, C);
  // dweight[OC,C] += dout^T[OC,N] @ inp[N,C]
  ParallelSgemm(*pool_, CblasTrans, CblasNoTrans, OC, C, N, 1.0f, dout, OC,
                inp, C, 1.0f, dweight, C);
  if (dbias != nullptr) {
    // dbias[OC] += column sums of dout; tasks own disjoint column ranges.
    ParallelRange(*pool_, OC, std::max<size_t>(16, kGrain / N),
                  [&](size_t o0, size_t o1) {
                    for (int n = 0; n < N; ++n) {
                      const float* d = dout + static_cast<size_t>(n) * OC;
#pragma omp simd
                      for (size_t o = o0; o < o1; ++o) dbias[o] += d[o];
                    }
                  });
  }
}

// Per (b, h), with q, k, v the [T,hs] slices of qkv (row stride 3C):
//   att[T,T] = causal_softmax(q @ k^T / sqrt(hs));  out_h[T,hs] = att @ v.
// One task per (b, h); sgemm is single-threaded inside each.
void CpuBackend::AttentionForward(float* out, float* att, const float* qkv,
                                  int B, int T, int C, int NH) {
  const int C3 = 3 * C;
  const int hs = C / NH;
  const float scale = 1.0f / std::sqrt(static_cast<float>(hs));
  pool_->ParallelFor(B * NH, [&](int bh) {
    const int b = bh / NH, h = bh % NH;
    const float* q = qkv + static_cast<size_t>(b) * T * C3 + h * hs;
    const float* k = q + C;
    const float* v = q + 2 * C;
    float* a = att + static_cast<size_t>(bh) * T * T;
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, T, T, hs, scale, q,
                C3, k, C3, 0.0f, a, T);
    for (int t = 0; t < T; ++t) {
      float* row = a + static_cast<size_t>(t) * T;
      float maxval = -INFINITY;
#pragma omp simd reduction(max : maxval)
      for (int j = 0; j <= t; ++j) maxval = std::max(maxval, row[j]);
      const float sum = cpu_vec::ExpShifted(row, row, maxval, t + 1);
      const float inv = 1.0f / sum;
#pragma omp simd
      for (int j = 0; j <= t; ++j) row[j] *= inv;
      std::fill(row + t + 1, row + T, 0.0f);
    }
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, T, hs, T, 1.0f, a,
                T, v, C3, 0.0f, out + static_cast<size_t>(b) * T * C + h * hs,
                C);
  });
}

// Per (b, h), with datt = scratch[b,h]:
//   datt[T,T]  = dout_h[T,hs] @ v^T
//   dv[T,hs]  += att^T @ dout_h
//   dpre[T,T]  = att * (datt - rowsum(att * datt)) / sqrt(hs)   (in datt)
//   dq[T,hs]  += dpre @ k;   dk[T,hs] += dpre^T @ q
void CpuBackend::AttentionBackward(float* dqkv, float* scratch,
                                   const float* dout, const float* qkv,
                                   const float* att, int B, int T, int C,
                                   int NH) {
  const int C3 = 3 * C;
  const int hs = C / NH;
  const float scale = 1.0f / std::sqrt(static_cast<float>(hs));
  pool_->ParallelFor(B * NH, [&](int bh) {
    const int b = bh / NH, h = bh % NH;
    const size_t qoff = static_cast<size_t>(b) * T * C3 + h * hs;
    const float* q = qkv + qoff;
    const float* k = q + C;
    const float* v = q + 2 * C;
    float* dq = dqkv + qoff;
    float* dk = dq + C;
    float* dv = dq + 2 * C;
    const float* d = dout + static_cast<size_t>(b) * T * C + h * hs;
    const float* a = att + static_cast<size_t>(bh) * T * T;
    float* da = scratch + static_cast<size_t>(bh) * T * T;
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, T, T, hs, 1.0f, d, C,
                v, C3, 0.0f, da, T);
    cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, T, hs, T, 1.0f, a, T,
                d, C, 1.0f, dv, C3);
    for (int t = 0; t < T; ++t) {
      const float* arow = a + static_cast<size_t>(t) * T;
      float* drow = da + static_cast<size_t>(t) * T;
      float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
      for (int j = 0; j <= t; ++j) dot += arow[j] * drow[j];
#pragma omp simd
      for (int j = 0; j <= t; ++j) drow[j] = arow[j] * (drow[j] - dot) * scale;
      std::fill(drow + t + 1, drow + T, 0.0f);
    }
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, T, hs, T, 1.0f, da,
                T, k, C3, 1.0f, dq, C3);
    cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, T, hs, T, 1.0f, da, T,
                q, C3, 1.0f, dk, C3);
  });
}

void CpuBackend::GeluForward(float* out, const float* inp, size_t N) {
  ParallelRange(*pool_, N, kGrain, [&](size_t begin, size_t end) {
    cpu_vec::GeluForwardArray(out + begin, inp + begin, end - begin);
  });
}

void CpuBackend::GeluBackward(float* dinp, const float* inp, const float* dout,
                              size_t N) {
  ParallelRange(*pool_, N, kGrain, [&](size_t begin, size_t end) {
    cpu_vec::GeluBackwardArray(dinp + begin, inp + begin, dout + begin,
                               end - begin);
  });
}

void CpuBackend::ResidualForward(float* out, const float* inp1,
                                 const float* inp2, size_t N) {
  ParallelRange(*pool_, N, kGrain, [&](size_t begin, size_t end) {
#pragma omp simd
    for (size_t i = begin; i < end; ++i) out[i] = inp1[i] + inp2[i];
  });
}

void CpuBackend::ResidualBackward(float* dinp1, float* dinp2,
                                  const float* dout, size_t N) {
  ParallelRange(*pool_, N, kGrain, [&](size_t begin, size_t end) {
#pragma omp simd
    for (size_t i = begin; i < end; ++i) {
      dinp1[i] += dout[i];
      dinp2[i] += dout[i];
    }
  });
}

// probs[N,V] = softmax(logits); losses[N] = logsumexp(logits) - logit[target].
void CpuBackend::CrossEntropyForward(float* losses, float* probs,
                                     const float* logits,
                                     const int32_t* targets, int N, int V) {
  ParallelRange(*pool_, N, kGrain / V, [&](size_t n0, size_t n1) {
    for (size_t n = n0; n < n1; ++n) {
      const float* x = logits + n * V;
      float* p = probs + n * V;
      float maxval = -INFINITY;
#pragma omp simd reduction(max : maxval)
      for (int v = 0; v < V; ++v) maxval = std::max(maxval, x[v]);
      const float sum = cpu_vec::ExpShifted(p, x, maxval, V);
      const float inv = 1.0f / sum;
#pragma omp simd
      for (int v = 0; v < V; ++v) p[v] *= inv;
      losses[n] = std::log(sum) + maxval - x[targets[n]];
    }
  });
}

// dlogits[N,V] += dloss * (probs - onehot(targets)).
void CpuBackend::CrossEntropyBackward(float* dlogits, const float* probs,
                                      const int32_t* targets, float dloss,
                                      int N, int V) {
  ParallelRange(*pool_, N, kGrain / V, [&](size_t n0, size_t n1) {
    for (size_t n = n0; n < n1; ++n) {
      const float* p = probs + n * V;
      float* d = dlogits + n * V;
#pragma omp simd
      for (int v = 0; v < V; ++v) d[v] += p[v] * dloss;
      d[targets[n]] -= dloss;
    }
  });
}

}  // namespace lmps
