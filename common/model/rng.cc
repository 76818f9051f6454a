#include "common/model/rng.h"

#include <cmath>

namespace lmps {

uint64_t Mix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

uint64_t StableKey(uint64_t seed, std::string_view name) {
  uint64_t h = 0xcbf29ce484222325ULL;  // FNV-1a offset basis
  for (unsigned char ch : name) {
    h ^= ch;
    h *= 0x100000001b3ULL;
  }
  return Mix64(h ^ Mix64(seed));
}

uint64_t RandomBits(uint64_t key, uint64_t index) {
  return Mix64(key ^ Mix64(index * 0xd1b54a32d192ed03ULL + 1));
}

double UniformDouble(uint64_t key, uint64_t index) {
  return static_cast<double>(RandomBits(key, index) >> 11) * 0x1.0p-53;
}

float StandardNormal(uint64_t key, uint64_t index) {
  // Two independent uniforms from the even/odd positions of the stream.
  double u1 = UniformDouble(key, 2 * index);
  double u2 = UniformDouble(key, 2 * index + 1);
  if (u1 < 1e-300) u1 = 1e-300;
  return static_cast<float>(std::sqrt(-2.0 * std::log(u1)) *
                            std::cos(2.0 * M_PI * u2));
}

}  // namespace lmps
