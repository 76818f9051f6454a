// bfloat16 conversion (the upper 16 bits of an IEEE binary32), little-endian
// byte buffers. Float to bf16 rounds to nearest even; NaN stays NaN.
//
// Thread-safety: pure functions.
#ifndef LMPS_COMMON_MODEL_BF16_H_
#define LMPS_COMMON_MODEL_BF16_H_

#include <cstdint>
#include <cstring>

namespace lmps {

inline uint16_t FloatToBf16Bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

inline float Bf16BitsToFloat(uint16_t b) {
  uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// dst holds 2n bytes.
// src holds n floats, dst 2n bytes (bf16.cc: vectorized, the same bits as
// FloatToBf16Bits element by element).
void FloatToBf16(const float* src, int64_t n, char* dst);

// src holds 2n bytes.
void Bf16ToFloat(const char* src, int64_t n, float* dst);

}  // namespace lmps

#endif  // LMPS_COMMON_MODEL_BF16_H_
