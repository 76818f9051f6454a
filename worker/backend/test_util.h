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
#include "common/rng.h"
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
