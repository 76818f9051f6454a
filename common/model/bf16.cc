#include "common/model/bf16.h"

namespace lmps {

// Branch-free forms of FloatToBf16Bits / Bf16BitsToFloat on restrict
// pointers, built with -O3 so that GCC vectorizes them (the scalar loop
// with its NaN branch converted about 1 element per ns).
void FloatToBf16(const float* __restrict src, int64_t n, char* __restrict dst) {
  uint16_t* __restrict out = reinterpret_cast<uint16_t*>(dst);
  for (int64_t i = 0; i < n; ++i) {
    uint32_t u;
    std::memcpy(&u, src + i, 4);
    const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    const uint32_t quiet = (u >> 16) | 0x40u;
    const bool nan = (u & 0x7fffffffu) > 0x7f800000u;
    const uint16_t b = static_cast<uint16_t>(nan ? quiet : rounded);
    std::memcpy(out + i, &b, 2);
  }
}

void Bf16ToFloat(const char* __restrict src, int64_t n, float* __restrict dst) {
  for (int64_t i = 0; i < n; ++i) {
    uint16_t b;
    std::memcpy(&b, src + 2 * i, 2);
    const uint32_t u = static_cast<uint32_t>(b) << 16;
    std::memcpy(dst + i, &u, 4);
  }
}

}  // namespace lmps
