// Counter-based random numbers: every value is a pure function of
// (key, index), so any node can generate any element range of a tensor or
// any sample of a batch without generating what comes before it.
//
// Thread-safety: pure functions.
#ifndef LMPS_COMMON_MODEL_RNG_H_
#define LMPS_COMMON_MODEL_RNG_H_

#include <cstdint>
#include <string_view>

namespace lmps {

// SplitMix64 finaliser: a bijective 64-bit mix.
uint64_t Mix64(uint64_t x);

// A stable 64-bit key from a seed and a name (FNV-1a of the name, mixed with
// the seed). Stable across processes, machines and builds.
uint64_t StableKey(uint64_t seed, std::string_view name);

// The index-th 64-bit value of the stream `key`.
uint64_t RandomBits(uint64_t key, uint64_t index);

// Uniform in [0, 1) (24 bits of precision as float, 53 as double).
double UniformDouble(uint64_t key, uint64_t index);

// Standard normal (Box-Muller on two values of the stream).
float StandardNormal(uint64_t key, uint64_t index);

}  // namespace lmps

#endif  // LMPS_COMMON_MODEL_RNG_H_
