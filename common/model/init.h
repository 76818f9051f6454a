// Deterministic parameter initialisation. Every element is a pure function of
// (seed, tensor name, element index), so any node can initialise any element
// range of a tensor on its own and the result equals the same range of the
// whole tensor initialised at once:
//   kNormal: out[i - begin] =
//                StandardNormal(StableKey(seed, name), i) * init_std
//   kZeros:  0
//   kOnes:   1
//
// Thread-safety: pure functions.
#ifndef LMPS_COMMON_MODEL_INIT_H_
#define LMPS_COMMON_MODEL_INIT_H_

#include <cstdint>

#include "common/model/model_spec.h"

namespace lmps {

// Writes elements [begin, end) of tensor `spec` to out[0, end - begin).
// Requires 0 <= begin <= end <= spec.num_elements().
void InitTensorRange(const TensorSpec& spec, uint64_t seed, int64_t begin,
                     int64_t end, float* out);

}  // namespace lmps

#endif  // LMPS_COMMON_MODEL_INIT_H_
