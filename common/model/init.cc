#include "common/model/init.h"

#include <algorithm>

#include "common/model/rng.h"

namespace lmps {

void InitTensorRange(const TensorSpec& spec, uint64_t seed, int64_t begin,
                     int64_t end, float* out) {
  const int64_t n = end - begin;
  if (n <= 0) return;
  switch (spec.init) {
    case InitKind::kZeros:
      std::fill(out, out + n, 0.0f);
      return;
    case InitKind::kOnes:
      std::fill(out, out + n, 1.0f);
      return;
    case InitKind::kNormal: {
      const uint64_t key = StableKey(seed, spec.name);
      for (int64_t i = begin; i < end; ++i) {
        out[i - begin] =
            StandardNormal(key, static_cast<uint64_t>(i)) * spec.init_std;
      }
      return;
    }
  }
}

}  // namespace lmps
