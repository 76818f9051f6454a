// GemmPlan: every matrix product of the CUDA backend as one (strided
// batched) column-major BLAS call, the form cuBLAS and cuBLASLt take.
//
// The backend's tensors are row-major; a row-major [R, K] matrix with row
// stride ld is, to BLAS, a column-major K x R matrix with leading dimension
// ld. The functions below map each product of backend.h onto such calls,
// including the attention products, which read q, k and v in place inside
// qkv[B,T,3C] (leading dimension 3C, one head per batch entry, heads hs
// floats apart) and write dq, dk, dv in place into dqkv. They are plain C++
// so the tests can run the same plans with a host GEMM
// (gemm_plan_test.cc) on machines without a GPU.
//
// Thread-safety: pure functions.
#ifndef LMPS_WORKER_BACKEND_CUDA_GEMM_PLAN_H_
#define LMPS_WORKER_BACKEND_CUDA_GEMM_PLAN_H_

#include <cmath>
#include <cstddef>
#include <cstdint>

namespace lmps {
namespace cuda_gemm {

// For i in [0, batch):
//   C_i = alpha * op(A_i) @ op(B_i) + beta * C_i
// with X_i = x + i * stride_x, all column-major with the given leading
// dimensions; op(A) is m x k, op(B) is k x n, C is m x n; op(X) = X^T when
// trans_x.
struct GemmPlan {
  bool trans_a = false;
  bool trans_b = false;
  int m = 0, n = 0, k = 0;
  float alpha = 1.0f;
  float beta = 0.0f;
  const float* a = nullptr;
  int64_t lda = 0, stride_a = 0;
  const float* b = nullptr;
  int64_t ldb = 0, stride_b = 0;
  float* c = nullptr;
  int64_t ldc = 0, stride_c = 0;
  int batch = 1;
};

// ---------------------------------------------------------------------------
// Linear layer (weight[OC,C] out x in).
// ---------------------------------------------------------------------------

// out[N,OC] = inp[N,C] @ weight^T (the bias is added separately).
// Column-major: out^T[OC,N] = weight[OC,C] @ inp^T[C,N].
inline GemmPlan MatmulForward(float* out, const float* inp, const float* weight,
                              int N, int C, int OC) {
  GemmPlan p;
  p.trans_a = true;
  p.m = OC, p.n = N, p.k = C;
  p.a = weight, p.lda = C;
  p.b = inp, p.ldb = C;
  p.c = out, p.ldc = OC;
  return p;
}

// dinp[N,C] += dout[N,OC] @ weight[OC,C].
// Column-major: dinp^T[C,N] += weight^T[C,OC] @ dout^T[OC,N].
inline GemmPlan MatmulBackwardInput(float* dinp, const float* dout,
                                    const float* weight, int N, int C, int OC) {
  GemmPlan p;
  p.m = C, p.n = N, p.k = OC;
  p.beta = 1.0f;
  p.a = weight, p.lda = C;
  p.b = dout, p.ldb = OC;
  p.c = dinp, p.ldc = C;
  return p;
}

// dweight[OC,C] += dout^T[OC,N] @ inp[N,C].
// Column-major: dweight^T[C,OC] += inp^T[C,N] @ dout[N,OC].
inline GemmPlan MatmulBackwardWeight(float* dweight, const float* dout,
                                     const float* inp, int N, int C, int OC) {
  GemmPlan p;
  p.trans_b = true;
  p.m = C, p.n = OC, p.k = N;
  p.beta = 1.0f;
  p.a = inp, p.lda = C;
  p.b = dout, p.ldb = OC;
  p.c = dweight, p.ldc = C;
  return p;
}

// ---------------------------------------------------------------------------
// Attention, for batch element b, batched over the NH heads. q_t, k_j, v_j
// are the hs-vectors of head h in row t (j) of qkv; att rows are [t, j].
// The scores and the products with att are computed over the full T x T
// square; the softmax kernels zero the entries above the diagonal (j > t),
// so the products see zeros there.
// ---------------------------------------------------------------------------

namespace internal {
struct AttentionDims {
  int64_t T, C, C3, hs, TT;
  float scale;
};
inline AttentionDims Dims(int T, int C, int NH) {
  const int hs = C / NH;
  AttentionDims d;
  d.T = T;
  d.C = C;
  d.C3 = 3 * static_cast<int64_t>(C);
  d.hs = hs;
  d.TT = static_cast<int64_t>(T) * T;
  d.scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(hs)));
  return d;
}
}  // namespace internal

// att[b,h,t,j] = (q_t . k_j) / sqrt(hs) for all t, j (the pre-softmax
// scores; the softmax kernel masks and normalises them in place).
// Column-major per head: S^T[j,t] = K[j,:] @ Q^T[:,t].
inline GemmPlan AttentionScores(float* att, const float* qkv, int b, int T,
                                int C, int NH) {
  const internal::AttentionDims d = internal::Dims(T, C, NH);
  const float* qkv_b = qkv + b * d.T * d.C3;
  GemmPlan p;
  p.trans_a = true;
  p.m = T, p.n = T, p.k = static_cast<int>(d.hs);
  p.alpha = d.scale;
  p.a = qkv_b + d.C, p.lda = d.C3, p.stride_a = d.hs;  // k
  p.b = qkv_b, p.ldb = d.C3, p.stride_b = d.hs;        // q
  p.c = att + b * NH * d.TT, p.ldc = T, p.stride_c = d.TT;
  p.batch = NH;
  return p;
}

// out[b,t,h*hs + i] = sum_j att[b,h,t,j] v_j[i].
// Column-major per head: O^T[i,t] = V^T[i,j] @ att^T[j,t].
inline GemmPlan AttentionValues(float* out, const float* att, const float* qkv,
                                int b, int T, int C, int NH) {
  const internal::AttentionDims d = internal::Dims(T, C, NH);
  const float* qkv_b = qkv + b * d.T * d.C3;
  GemmPlan p;
  p.m = static_cast<int>(d.hs), p.n = T, p.k = T;
  p.a = qkv_b + 2 * d.C, p.lda = d.C3, p.stride_a = d.hs;  // v
  p.b = att + b * NH * d.TT, p.ldb = T, p.stride_b = d.TT;
  p.c = out + b * d.T * d.C, p.ldc = C, p.stride_c = d.hs;
  p.batch = NH;
  return p;
}

// datt[b,h,t,j] = dout_t . v_j (into the scratch buffer, overwritten).
// Column-major per head: dS^T[j,t] = V[j,:] @ dO^T[:,t].
inline GemmPlan AttentionBackwardAtt(float* datt, const float* dout,
                                     const float* qkv, int b, int T, int C,
                                     int NH) {
  const internal::AttentionDims d = internal::Dims(T, C, NH);
  const float* qkv_b = qkv + b * d.T * d.C3;
  GemmPlan p;
  p.trans_a = true;
  p.m = T, p.n = T, p.k = static_cast<int>(d.hs);
  p.a = qkv_b + 2 * d.C, p.lda = d.C3, p.stride_a = d.hs;  // v
  p.b = dout + b * d.T * d.C, p.ldb = C, p.stride_b = d.hs;
  p.c = datt + b * NH * d.TT, p.ldc = T, p.stride_c = d.TT;
  p.batch = NH;
  return p;
}

// dv_j += sum_t att[b,h,t,j] dout_t.
// Column-major per head: dV^T[i,j] += dO^T[i,t] @ att[t,j].
inline GemmPlan AttentionBackwardV(float* dqkv, const float* dout,
                                   const float* att, int b, int T, int C,
                                   int NH) {
  const internal::AttentionDims d = internal::Dims(T, C, NH);
  GemmPlan p;
  p.trans_b = true;
  p.m = static_cast<int>(d.hs), p.n = T, p.k = T;
  p.beta = 1.0f;
  p.a = dout + b * d.T * d.C, p.lda = C, p.stride_a = d.hs;
  p.b = att + b * NH * d.TT, p.ldb = T, p.stride_b = d.TT;
  p.c = dqkv + b * d.T * d.C3 + 2 * d.C, p.ldc = d.C3, p.stride_c = d.hs;
  p.batch = NH;
  return p;
}

// dq_t += sum_j dpreatt[b,h,t,j] k_j (dpreatt includes the 1/sqrt(hs)).
// Column-major per head: dQ^T[i,t] = K^T[i,j] @ dpreatt^T[j,t].
inline GemmPlan AttentionBackwardQ(float* dqkv, const float* dpreatt,
                                   const float* qkv, int b, int T, int C,
                                   int NH) {
  const internal::AttentionDims d = internal::Dims(T, C, NH);
  const float* qkv_b = qkv + b * d.T * d.C3;
  GemmPlan p;
  p.m = static_cast<int>(d.hs), p.n = T, p.k = T;
  p.beta = 1.0f;
  p.a = qkv_b + d.C, p.lda = d.C3, p.stride_a = d.hs;  // k
  p.b = dpreatt + b * NH * d.TT, p.ldb = T, p.stride_b = d.TT;
  p.c = dqkv + b * d.T * d.C3, p.ldc = d.C3, p.stride_c = d.hs;
  p.batch = NH;
  return p;
}

// dk_j += sum_t dpreatt[b,h,t,j] q_t.
// Column-major per head: dK^T[i,j] = Q^T[i,t] @ dpreatt[t,j].
inline GemmPlan AttentionBackwardK(float* dqkv, const float* dpreatt,
                                   const float* qkv, int b, int T, int C,
                                   int NH) {
  const internal::AttentionDims d = internal::Dims(T, C, NH);
  const float* qkv_b = qkv + b * d.T * d.C3;
  GemmPlan p;
  p.trans_b = true;
  p.m = static_cast<int>(d.hs), p.n = T, p.k = T;
  p.beta = 1.0f;
  p.a = qkv_b, p.lda = d.C3, p.stride_a = d.hs;  // q
  p.b = dpreatt + b * NH * d.TT, p.ldb = T, p.stride_b = d.TT;
  p.c = dqkv + b * d.T * d.C3 + d.C, p.ldc = d.C3, p.stride_c = d.hs;
  p.batch = NH;
  return p;
}

// The 1/sqrt(hs) of the scores.
inline float AttentionScale(int C, int NH) {
  return internal::Dims(1, C, NH).scale;
}

}  // namespace cuda_gemm
}  // namespace lmps

#endif  // LMPS_WORKER_BACKEND_CUDA_GEMM_PLAN_H_
