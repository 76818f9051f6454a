// The per-element math of the CUDA backend's kernels (kernels.cu), as
// inline functions that compile both as device code (nvcc) and as plain C++
// (g++), so kernel_math_test can check them against the CPU reference
// (worker/backend/cpu_reference.h) on a machine without a GPU.
//
// Everything is fp32, like the kernels (except the bf16 conversion of the
// matrix-product inputs); the reference works in double. The
// functions use only IEEE operations and the C math library (tanhf, expf,
// logf, sqrtf: at most 2 ulp in CUDA without --use_fast_math), so host and
// device results differ by a few ulp at most.
//
// Thread-safety: pure functions.
#ifndef LMPS_WORKER_BACKEND_CUDA_KERNEL_MATH_H_
#define LMPS_WORKER_BACKEND_CUDA_KERNEL_MATH_H_

#include <math.h>
#include <stdint.h>
#include <string.h>

#ifdef __CUDACC__
#define LMPS_HD __host__ __device__ __forceinline__
#else
#define LMPS_HD inline
#endif

namespace lmps {
namespace cuda_math {

constexpr float kLayerNormEps = 1e-5f;
constexpr float kGeluScale = 0.7978845608028654f;  // sqrt(2 / pi)
constexpr float kGeluCubic = 0.044715f;

// ---------------------------------------------------------------------------
// GELU, tanh approximation.
// ---------------------------------------------------------------------------

// 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))).
LMPS_HD float GeluForward(float x) {
  const float u = kGeluScale * (x + kGeluCubic * x * x * x);
  return 0.5f * x * (1.0f + tanhf(u));
}

// d GeluForward(x) / dx.
LMPS_HD float GeluGrad(float x) {
  const float u = kGeluScale * (x + kGeluCubic * x * x * x);
  const float th = tanhf(u);
  const float sech2 = 1.0f - th * th;
  const float du = kGeluScale * (1.0f + 3.0f * kGeluCubic * x * x);
  return 0.5f * (1.0f + th) + 0.5f * x * sech2 * du;
}

// ---------------------------------------------------------------------------
// LayerNorm. A row's mean and (biased) variance are reductions done by the
// kernel; these are the per-element parts.
// ---------------------------------------------------------------------------

// 1 / sqrt(var + eps), correctly rounded sqrt and division.
LMPS_HD float LayerNormRstd(float var) {
  return 1.0f / sqrtf(var + kLayerNormEps);
}

// The normalised input (x - mean) * rstd.
LMPS_HD float LayerNormNorm(float x, float mean, float rstd) {
  return (x - mean) * rstd;
}

// norm * weight + bias.
LMPS_HD float LayerNormOut(float x, float mean, float rstd, float weight,
                           float bias) {
  return LayerNormNorm(x, mean, rstd) * weight + bias;
}

// The input gradient of one element, given dnorm = weight * dout, the row
// means dnorm_mean = mean(dnorm) and dnorm_norm_mean = mean(dnorm * norm).
LMPS_HD float LayerNormDinp(float dnorm, float dnorm_mean, float norm,
                            float dnorm_norm_mean, float rstd) {
  return (dnorm - dnorm_mean - norm * dnorm_norm_mean) * rstd;
}

// ---------------------------------------------------------------------------
// Softmax (attention rows and cross-entropy rows) as an online reduction:
// a state (running max, sum of exp(x - max)) absorbs elements one at a time
// and merges with other states, so a row can be split across threads and
// read once. The empty state is {-inf, 0}; a non-empty one has sum >= 1.
// ---------------------------------------------------------------------------

struct SoftmaxState {
  float max;
  float sum;
};

LMPS_HD SoftmaxState SoftmaxEmpty() { return SoftmaxState{-INFINITY, 0.0f}; }

// Adds element x.
LMPS_HD void SoftmaxUpdate(SoftmaxState& s, float x) {
  if (x > s.max) {
    s.sum = s.sum * expf(s.max - x) + 1.0f;  // expf(-inf) = 0 when empty
    s.max = x;
  } else {
    s.sum += expf(x - s.max);
  }
}

// s = s (+) o, the state of the union of both element sets.
LMPS_HD void SoftmaxMerge(SoftmaxState& s, SoftmaxState o) {
  if (o.sum == 0.0f) return;
  if (s.sum == 0.0f) {
    s = o;
    return;
  }
  if (o.max > s.max) {
    s.sum = s.sum * expf(s.max - o.max) + o.sum;
    s.max = o.max;
  } else {
    s.sum += o.sum * expf(o.max - s.max);
  }
}

// softmax(x) of an element of the row whose state is s.
LMPS_HD float SoftmaxProb(float x, SoftmaxState s) {
  return expf(x - s.max) / s.sum;
}

// Attention softmax backward, with the 1/sqrt(hs) of the scores folded in:
// dpreatt = att * (datt - sum_j att_j datt_j) * scale.
LMPS_HD float SoftmaxBackward(float att, float datt, float att_dot_datt,
                              float scale) {
  return att * (datt - att_dot_datt) * scale;
}

// ---------------------------------------------------------------------------
// Cross-entropy.
// ---------------------------------------------------------------------------

// -log softmax(x)[target] in log-sum-exp form (exact even when the target's
// probability underflows): log(sum) + max - x_target.
LMPS_HD float CrossEntropyLoss(SoftmaxState s, float x_target) {
  return logf(s.sum) + s.max - x_target;
}

// d loss / d logit for one element: (prob - [is_target]) * dloss.
LMPS_HD float CrossEntropyGrad(float prob, bool is_target, float dloss) {
  return (prob - (is_target ? 1.0f : 0.0f)) * dloss;
}

// ---------------------------------------------------------------------------
// bfloat16 (the upper 16 bits of an IEEE binary32), the input format of the
// matrix products in MatmulPrecision::kBf16. Bit for bit the same as
// common/model/bf16.h (FloatToBf16Bits / Bf16BitsToFloat), so bf16 made on the
// device and on the host agree.
// ---------------------------------------------------------------------------

// fp32 -> bf16 bits, round to nearest, ties to even. Finite values whose
// magnitude rounds past the largest bf16 (about 3.39e38) become +-inf;
// +-inf stay +-inf; NaN stays NaN (quieted: the sign and upper payload
// bits are kept, the quiet bit set). Relative error at most 2^-8 (unit
// roundoff of the 8-bit significand) for results in the normal range.
LMPS_HD uint16_t FloatToBf16Bits(float f) {
  uint32_t u;
  memcpy(&u, &f, sizeof(u));  // a register move in device code
  if ((u & 0x7fffffffu) > 0x7f800000u) {
    return static_cast<uint16_t>((u >> 16) | 0x40u);
  }
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

// bf16 bits -> fp32, exact.
LMPS_HD float Bf16BitsToFloat(uint16_t b) {
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  memcpy(&f, &u, sizeof(f));
  return f;
}

}  // namespace cuda_math
}  // namespace lmps

#endif  // LMPS_WORKER_BACKEND_CUDA_KERNEL_MATH_H_
