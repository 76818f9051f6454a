// Vectorised transcendental helpers for the CPU backend (internal).
//
// ExpApprox is Cephes' expf: range reduction x = n ln2 + r, a degree-6
// polynomial for e^r and 2^n built in the exponent bits; relative error
// about 2 ulp on [-87, 88], inputs clamped to that range (so e^-inf is
// ~1e-38, not 0). With AVX2+FMA the array helpers process 8 lanes at a time
// and treat the tail through a padded block, so every element goes through
// the same approximation regardless of its position.
//
// Thread-safety: pure functions.
#ifndef LMPS_WORKER_BACKEND_CPU_VEC_H_
#define LMPS_WORKER_BACKEND_CPU_VEC_H_

#include <cmath>
#include <cstddef>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define LMPS_CPU_VEC_AVX2 1
#endif

namespace lmps {
namespace cpu_vec {

constexpr float kGeluScale = 0.7978845608028654f;  // sqrt(2 / pi)
constexpr float kGeluCubic = 0.044715f;

#ifdef LMPS_CPU_VEC_AVX2

inline __m256 Exp8(__m256 x) {
  x = _mm256_min_ps(x, _mm256_set1_ps(88.0f));
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
  // n = round(x / ln2); r = x - n ln2 in two steps (Cody-Waite).
  __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)),
                             _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r);
  p = _mm256_add_ps(p, _mm256_set1_ps(1.0f));
  __m256i e = _mm256_slli_epi32(
      _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

// GELU (tanh form) as x * sigmoid(2u), u = sqrt(2/pi) (x + 0.044715 x^3);
// 0.5 (1 + tanh(u)) == sigmoid(2u) == 1 / (1 + e^{-2u}).
inline __m256 GeluSigmoid8(__m256 x, __m256* du) {
  const __m256 x2 = _mm256_mul_ps(x, x);
  const __m256 k = _mm256_set1_ps(kGeluScale);
  // u = k x (1 + c x^2)
  const __m256 u = _mm256_mul_ps(
      _mm256_mul_ps(k, x),
      _mm256_fmadd_ps(_mm256_set1_ps(kGeluCubic), x2, _mm256_set1_ps(1.0f)));
  if (du != nullptr) {
    // du/dx = k (1 + 3c x^2)
    *du = _mm256_mul_ps(k, _mm256_fmadd_ps(_mm256_set1_ps(3.0f * kGeluCubic),
                                           x2, _mm256_set1_ps(1.0f)));
  }
  const __m256 e = Exp8(_mm256_mul_ps(u, _mm256_set1_ps(-2.0f)));
  return _mm256_div_ps(_mm256_set1_ps(1.0f),
                       _mm256_add_ps(_mm256_set1_ps(1.0f), e));
}

// out[i] = gelu(x[i]) for 8 lanes.
inline __m256 GeluForward8(__m256 x) {
  return _mm256_mul_ps(x, GeluSigmoid8(x, nullptr));
}

// gelu'(x) for 8 lanes: s + 2 x s (1 - s) du/dx with s = sigmoid(2u).
inline __m256 GeluGrad8(__m256 x) {
  __m256 du;
  const __m256 s = GeluSigmoid8(x, &du);
  const __m256 s1s = _mm256_mul_ps(s, _mm256_sub_ps(_mm256_set1_ps(1.0f), s));
  const __m256 t = _mm256_mul_ps(_mm256_mul_ps(_mm256_add_ps(x, x), s1s), du);
  return _mm256_add_ps(s, t);
}

inline float HorizontalSum8(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v);
  __m128 hi = _mm256_extractf128_ps(v, 1);
  lo = _mm_add_ps(lo, hi);
  lo = _mm_hadd_ps(lo, lo);
  lo = _mm_hadd_ps(lo, lo);
  return _mm_cvtss_f32(lo);
}

// Loads the n < 8 tail of p into a vector padded with `pad`.
inline __m256 LoadTail(const float* p, size_t n, float pad) {
  alignas(32) float buf[8];
  for (size_t i = 0; i < 8; ++i) buf[i] = i < n ? p[i] : pad;
  return _mm256_load_ps(buf);
}

inline void StoreTail(float* p, size_t n, __m256 v) {
  alignas(32) float buf[8];
  _mm256_store_ps(buf, v);
  for (size_t i = 0; i < n; ++i) p[i] = buf[i];
}

#endif  // LMPS_CPU_VEC_AVX2

// y[i] = e^(x[i] - shift) for i in [0, n); returns the sum of the y[i].
// y may alias x.
inline float ExpShifted(float* y, const float* x, float shift, size_t n) {
#ifdef LMPS_CPU_VEC_AVX2
  const __m256 s = _mm256_set1_ps(shift);
  __m256 acc = _mm256_setzero_ps();
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m256 e = Exp8(_mm256_sub_ps(_mm256_loadu_ps(x + i), s));
    _mm256_storeu_ps(y + i, e);
    acc = _mm256_add_ps(acc, e);
  }
  float sum = HorizontalSum8(acc);
  if (i < n) {
    alignas(32) float buf[8];
    _mm256_store_ps(buf, Exp8(_mm256_sub_ps(LoadTail(x + i, n - i, shift), s)));
    for (size_t j = 0; i + j < n; ++j) {
      y[i + j] = buf[j];
      sum += buf[j];
    }
  }
  return sum;
#else
  float sum = 0.0f;
  for (size_t i = 0; i < n; ++i) {
    y[i] = std::exp(x[i] - shift);
    sum += y[i];
  }
  return sum;
#endif
}

// out[i] = gelu(x[i]).
inline void GeluForwardArray(float* out, const float* x, size_t n) {
#ifdef LMPS_CPU_VEC_AVX2
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    _mm256_storeu_ps(out + i, GeluForward8(_mm256_loadu_ps(x + i)));
  }
  if (i < n) StoreTail(out + i, n - i, GeluForward8(LoadTail(x + i, n - i, 0)));
#else
  for (size_t i = 0; i < n; ++i) {
    const float u = kGeluScale * (x[i] + kGeluCubic * x[i] * x[i] * x[i]);
    out[i] = 0.5f * x[i] * (1.0f + std::tanh(u));
  }
#endif
}

// dinp[i] += gelu'(x[i]) * dout[i].
inline void GeluBackwardArray(float* dinp, const float* x, const float* dout,
                              size_t n) {
#ifdef LMPS_CPU_VEC_AVX2
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 g = GeluGrad8(_mm256_loadu_ps(x + i));
    _mm256_storeu_ps(dinp + i, _mm256_fmadd_ps(g, _mm256_loadu_ps(dout + i),
                                               _mm256_loadu_ps(dinp + i)));
  }
  if (i < n) {
    const size_t m = n - i;
    const __m256 g = GeluGrad8(LoadTail(x + i, m, 0));
    StoreTail(dinp + i, m,
              _mm256_fmadd_ps(g, LoadTail(dout + i, m, 0),
                              LoadTail(dinp + i, m, 0)));
  }
#else
  for (size_t i = 0; i < n; ++i) {
    const float xi = x[i];
    const float u = kGeluScale * (xi + kGeluCubic * xi * xi * xi);
    const float th = std::tanh(u);
    const float du = kGeluScale * (1.0f + 3.0f * kGeluCubic * xi * xi);
    dinp[i] += (0.5f * (1.0f + th) + 0.5f * xi * (1.0f - th * th) * du) *
               dout[i];
  }
#endif
}

}  // namespace cpu_vec
}  // namespace lmps

#endif  // LMPS_WORKER_BACKEND_CPU_VEC_H_
