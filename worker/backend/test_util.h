// Test helpers for the backend tests (testonly): deterministic random
// buffers and a tolerance check with a clear failure message.
//
// Thread-safety: pure functions.
#ifndef LMPS_WORKER_BACKEND_TEST_UTIL_H_
#define LMPS_WORKER_BACKEND_TEST_UTIL_H_

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/model/rng.h"
#include "gtest/gtest.h"

namespace lmps {
namespace testing {

// n values uniform in [lo, hi), a pure function of (seed, n, lo, hi).
inline std::vector<float> RandomVector(uint64_t seed, size_t n, float lo = -1,
                                       float hi = 1) {
  std::vector<float> v(n);
  const uint64_t key = Mix64(seed ^ 0x5eed);
  for (size_t i = 0; i < n; ++i) {
    v[i] = lo + (hi - lo) * static_cast<float>(UniformDouble(key, i));
  }
  return v;
}

// n tokens uniform in [0, V).
inline std::vector<int32_t> RandomTokens(uint64_t seed, size_t n, int V) {
  std::vector<int32_t> v(n);
  const uint64_t key = Mix64(seed ^ 0x70c3);
  for (size_t i = 0; i < n; ++i) {
    v[i] = static_cast<int32_t>(RandomBits(key, i) % static_cast<uint64_t>(V));
  }
  return v;
}

// Max-norm relative error: max_i |actual_i - expected_i| / max_i
// |expected_i| (the denominator floored at `floor` so an all-zero expected
// tensor compares absolutely). Element-wise relative error is meaningless
// for sums with cancellation, so errors are measured against the scale of
// the whole tensor.
// The root mean square of v (0 for an empty v): a tensor's scale for the
// absolute part of ElementwiseClose's bound.
inline double Rms(const std::vector<float>& v) {
  double sum = 0;
  for (float x : v) sum += double{x} * x;
  return v.empty() ? 0.0 : std::sqrt(sum / v.size());
}

// Per element: |actual[i] - expected[i]| <= atol + rtol * |expected[i]| for
// every i (a NaN fails). For results of reduced-precision arithmetic, where
// AllClose's bound relative to the tensor's largest element would leave
// its small elements unchecked: rtol bounds the relative error of an
// element that is not the result of cancellation, atol the error of one
// that is (a sum of products much smaller than its terms).
inline ::testing::AssertionResult ElementwiseClose(
    const std::vector<float>& actual, const std::vector<float>& expected,
    double atol, double rtol) {
  if (actual.size() != expected.size()) {
    return ::testing::AssertionFailure()
           << "size " << actual.size() << " != " << expected.size();
  }
  size_t failures = 0, worst_i = 0;
  double worst_excess = 0;  // err / bound of the worst element
  for (size_t i = 0; i < actual.size(); ++i) {
    const double err = std::fabs(double{actual[i]} - expected[i]);
    const double bound = atol + rtol * std::fabs(double{expected[i]});
    if (!(err <= bound)) {
      ++failures;
      const double excess = std::isnan(err) ? INFINITY : err / bound;
      if (!(excess <= worst_excess)) {
        worst_excess = excess;
        worst_i = i;
      }
    }
  }
  if (failures == 0) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure()
         << failures << " of " << actual.size()
         << " elements exceed atol " << atol << " + rtol " << rtol
         << " * |expected|; worst [" << worst_i << "]: actual "
         << actual[worst_i] << ", expected " << expected[worst_i] << " ("
         << worst_excess << " x its bound)";
}

// Per-element tolerance of a matrix product of bf16-rounded operands with
// exact (or fp32) accumulation, against the fp32/double reference. With u =
// 2^-8, bf16's unit roundoff, each product's relative error is at most 2u:
//   rtol = 4u = 2^-6 for elements that are not the result of cancellation;
//   atol = 8u * Rms(expected) for those that are.
// Measured on the host (gemm_plan_test, every GEMM plan, attention's too,
// operands rounded by kernel_math's converter): the largest error of a
// cancelling element was 3.0u * Rms (1.18e-2 * Rms at rtol 2^-6), so the
// bound has a margin of 2.6x.
constexpr double kBf16ProductRtol = 1.0 / 64;
constexpr double kBf16ProductAtolPerRms = 8.0 / 256;

inline ::testing::AssertionResult Bf16ProductClose(
    const std::vector<float>& actual, const std::vector<float>& expected) {
  return ElementwiseClose(actual, expected,
                          kBf16ProductAtolPerRms * Rms(expected),
                          kBf16ProductRtol);
}

inline ::testing::AssertionResult AllClose(const std::vector<float>& actual,
                                           const std::vector<float>& expected,
                                           double rtol, double floor = 1e-6) {
  if (actual.size() != expected.size()) {
    return ::testing::AssertionFailure()
           << "size " << actual.size() << " != " << expected.size();
  }
  double scale = floor;
  for (float e : expected) scale = std::max(scale, std::fabs(double{e}));
  double worst = 0.0;
  size_t worst_i = 0;
  for (size_t i = 0; i < actual.size(); ++i) {
    const double err = std::fabs(double{actual[i]} - expected[i]);
    if (!(err <= worst)) {  // also catches NaN
      worst = std::isnan(err) ? INFINITY : err;
      worst_i = i;
      if (std::isnan(err)) break;
    }
  }
  if (worst <= rtol * scale) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure()
         << "max error " << worst << " at [" << worst_i << "] (actual "
         << actual[worst_i] << ", expected " << expected[worst_i]
         << ") exceeds " << rtol << " * scale " << scale;
}

}  // namespace testing
}  // namespace lmps

#endif  // LMPS_WORKER_BACKEND_TEST_UTIL_H_
