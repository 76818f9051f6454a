// bfloat16 conversion (bf16.h): round to nearest, ties to even, against a
// naive reference on exact distances; NaN and +-Inf; the byte layout of
// the buffers (what a BF16 pull or push carries on the wire).
#include "common/model/bf16.h"

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "gtest/gtest.h"

namespace lmps {
namespace {

float FromBits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

bool IsNanBits(uint16_t b) { return (b & 0x7f80u) == 0x7f80u && (b & 0x7fu); }

// The naive reference for a finite x: of the two bf16 values around x
// (truncation, and the next one away from zero), the nearer by exact
// distance (in double: both differences are exact there), the one with an
// even last bit on a tie. Overflow past the largest bf16 gives Inf, as
// IEEE round-to-nearest does.
uint16_t ReferenceRound(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  const uint16_t lo = static_cast<uint16_t>(u >> 16);
  const uint16_t hi = static_cast<uint16_t>(lo + 1);
  const double dlo = std::fabs(static_cast<double>(x) -
                               static_cast<double>(Bf16BitsToFloat(lo)));
  const double dhi = std::fabs(static_cast<double>(Bf16BitsToFloat(hi)) -
                               static_cast<double>(x));
  if (std::isinf(Bf16BitsToFloat(hi))) {
    // hi is Inf: x rounds to it when it lies at or past the midpoint
    // between lo and 2^128 (the next value the exponent range would have).
    const double next = std::ldexp(1.0, 128);
    const double mid = (static_cast<double>(Bf16BitsToFloat(lo)) +
                        std::copysign(next, x)) / 2;
    return std::fabs(x) >= std::fabs(mid) ? hi : lo;
  }
  if (dlo < dhi) return lo;
  if (dhi < dlo) return hi;
  return (lo & 1) ? hi : lo;
}

TEST(Bf16Test, RoundsToNearestTiesToEven) {
  EXPECT_EQ(FloatToBf16Bits(1.0f), 0x3f80);
  // 1 + 2^-8 is halfway between 0x3f80 and 0x3f81: the even one.
  EXPECT_EQ(FloatToBf16Bits(FromBits(0x3f808000u)), 0x3f80);
  // Halfway between 0x3f81 and 0x3f82: up to the even one.
  EXPECT_EQ(FloatToBf16Bits(FromBits(0x3f818000u)), 0x3f82);
  EXPECT_EQ(FloatToBf16Bits(FromBits(0xbf818000u)), 0xbf82);  // sign kept
  EXPECT_EQ(FloatToBf16Bits(FromBits(0x3f808001u)), 0x3f81);  // above half
  EXPECT_EQ(FloatToBf16Bits(FromBits(0x3f807fffu)), 0x3f80);  // below half
  // Subnormals and zeros.
  EXPECT_EQ(FloatToBf16Bits(FromBits(0x00008000u)), 0x0000);
  EXPECT_EQ(FloatToBf16Bits(FromBits(0x00018000u)), 0x0002);
  EXPECT_EQ(FloatToBf16Bits(-0.0f), 0x8000);
  // The carry runs into the exponent.
  EXPECT_EQ(FloatToBf16Bits(FromBits(0x3fffffffu)), 0x4000);
}

TEST(Bf16Test, MatchesTheNaiveReferenceOnRandomFloats) {
  std::mt19937 rng(20261205);
  int checked = 0;
  for (int i = 0; i < 1000000; ++i) {
    const uint32_t bits = rng();
    const float x = FromBits(bits);
    if (!std::isfinite(x)) continue;
    ASSERT_EQ(FloatToBf16Bits(x), ReferenceRound(x))
        << "x = " << x << " bits " << std::hex << bits;
    ++checked;
  }
  EXPECT_GT(checked, 990000);
}

TEST(Bf16Test, InfinitiesStayAndOverflowRoundsToInf) {
  const float inf = std::numeric_limits<float>::infinity();
  EXPECT_EQ(FloatToBf16Bits(inf), 0x7f80);
  EXPECT_EQ(FloatToBf16Bits(-inf), 0xff80);
  EXPECT_EQ(Bf16BitsToFloat(0x7f80), inf);
  EXPECT_EQ(Bf16BitsToFloat(0xff80), -inf);
  // The largest float lies past the midpoint above the largest bf16.
  EXPECT_EQ(FloatToBf16Bits(std::numeric_limits<float>::max()), 0x7f80);
  EXPECT_EQ(FloatToBf16Bits(FromBits(0x7f7f7fffu)), 0x7f7f);
  EXPECT_EQ(FloatToBf16Bits(FromBits(0x7f7f8000u)), 0x7f80);  // tie: even
}

TEST(Bf16Test, NanStaysNan) {
  const float qnan = std::numeric_limits<float>::quiet_NaN();
  EXPECT_TRUE(IsNanBits(FloatToBf16Bits(qnan)));
  EXPECT_TRUE(std::isnan(Bf16BitsToFloat(FloatToBf16Bits(qnan))));
  // A NaN whose payload is only in the low 16 bits would truncate to Inf,
  // and rounding would carry it into Inf or the sign: it stays NaN, sign
  // kept.
  for (uint32_t bits : {0x7f800001u, 0x7f80ffffu, 0x7fffffffu, 0xff800001u,
                        0xffffffffu}) {
    const uint16_t b = FloatToBf16Bits(FromBits(bits));
    EXPECT_TRUE(IsNanBits(b)) << std::hex << bits << " -> " << b;
    EXPECT_EQ(b & 0x8000u, (bits >> 16) & 0x8000u) << std::hex << bits;
  }
}

TEST(Bf16Test, WideningIsExactAndRoundTrips) {
  for (uint32_t b = 0; b <= 0xffff; ++b) {
    const uint16_t bits = static_cast<uint16_t>(b);
    const float f = Bf16BitsToFloat(bits);
    uint32_t u;
    std::memcpy(&u, &f, 4);
    ASSERT_EQ(u, b << 16);
    if (IsNanBits(bits)) {
      ASSERT_TRUE(IsNanBits(FloatToBf16Bits(f)));
    } else {
      ASSERT_EQ(FloatToBf16Bits(f), bits) << std::hex << b;
    }
  }
}

TEST(Bf16Test, BuffersAreLittleEndianPairs) {
  const float in[3] = {1.0f, -2.0f, FromBits(0x3f818000u)};
  char bytes[6];
  FloatToBf16(in, 3, bytes);
  EXPECT_EQ(std::string(bytes, 6), std::string("\x80\x3f\x00\xc0\x82\x3f", 6));
  float out[3];
  Bf16ToFloat(bytes, 3, out);
  EXPECT_EQ(out[0], 1.0f);
  EXPECT_EQ(out[1], -2.0f);
  EXPECT_EQ(out[2], Bf16BitsToFloat(0x3f82));
}

// The vectorized buffer conversions give, element by element, the scalar
// functions' bits: every class of input (NaNs with any payload and sign,
// infinities, subnormals, ties, random bits), every length up to 67 and
// every start offset 0..3 (vector loops and their tails).
TEST(Bf16Test, BufferConversionsAreTheScalarOnesElementByElement) {
  std::mt19937 rng(9);
  std::vector<uint32_t> bits = {0x7f800000u, 0xff800000u, 0x7f800001u,
                                0xffc00000u, 0x7fffffffu, 0x00000001u,
                                0x807fffffu, 0x3f808000u, 0x3f818000u,
                                0x7f7fffffu, 0x00000000u, 0x80000000u};
  while (bits.size() < 4096) bits.push_back(rng());
  std::vector<float> in(bits.size());
  std::memcpy(in.data(), bits.data(), 4 * bits.size());
  for (int start = 0; start < 4; ++start) {
    for (int64_t n : {0, 1, 7, 8, 15, 16, 17, 31, 33, 67, 4000}) {
      std::vector<char> out(2 * n + 2, 0x55);
      FloatToBf16(in.data() + start, n, out.data());
      for (int64_t i = 0; i < n; ++i) {
        uint16_t b;
        std::memcpy(&b, out.data() + 2 * i, 2);
        ASSERT_EQ(b, FloatToBf16Bits(in[start + i]))
            << "start " << start << " n " << n << " i " << i;
      }
      EXPECT_EQ(out[2 * n], 0x55);  // nothing written past the end
      std::vector<float> back(n + 1, 7.0f);
      Bf16ToFloat(out.data(), n, back.data());
      for (int64_t i = 0; i < n; ++i) {
        uint16_t b;
        std::memcpy(&b, out.data() + 2 * i, 2);
        const float want = Bf16BitsToFloat(b);
        ASSERT_EQ(std::memcmp(&back[i], &want, 4), 0) << i;
      }
      EXPECT_EQ(back[n], 7.0f);
    }
  }
}

}  // namespace
}  // namespace lmps
