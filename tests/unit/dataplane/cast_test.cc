// Casts in copy_math.h against an independent reference: every target value
// decoded with ldexp into long double, and round-to-nearest-even done by
// searching the sorted table of representable values.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <vector>

#include "daemon/kernels/copy_math.h"

namespace ws::kernels {
namespace {

// Decodes a 16-bit pattern with `mbits` mantissa bits and `ebits` exponent bits.
long double Decode16(uint16_t h, int ebits, int mbits) {
  const int bias = (1 << (ebits - 1)) - 1;
  const int e = (h >> mbits) & ((1 << ebits) - 1);
  const int m = h & ((1 << mbits) - 1);
  const long double sign = (h & 0x8000) ? -1.0L : 1.0L;
  if (e == (1 << ebits) - 1) return m ? NAN : sign * INFINITY;
  if (e == 0) return sign * std::ldexp(static_cast<long double>(m), 1 - bias - mbits);
  return sign * std::ldexp(1.0L + std::ldexp(static_cast<long double>(m), -mbits), e - bias);
}

struct Format {
  int ebits, mbits;
  std::vector<std::pair<long double, uint16_t>> pos;  // finite non-negative values, ascending
  long double overflow;                                // |x| >= this rounds to inf

  Format(int e, int m) : ebits(e), mbits(m) {
    const uint16_t inf = static_cast<uint16_t>(((1 << ebits) - 1) << mbits);
    for (uint32_t h = 0; h < inf; ++h) pos.push_back({Decode16(static_cast<uint16_t>(h), ebits, mbits), static_cast<uint16_t>(h)});
    long double max = pos.back().first;
    long double ulp = max - pos[pos.size() - 2].first;
    overflow = max + ulp / 2;
  }

  // Nearest, ties to the even pattern; NaN -> sign | quiet NaN.
  uint16_t Round(float f, uint16_t qnan) const {
    const uint16_t sign = std::signbit(f) ? 0x8000 : 0;
    if (std::isnan(f)) return sign | qnan;
    long double x = std::fabs(static_cast<long double>(f));
    const uint16_t inf = static_cast<uint16_t>(((1 << ebits) - 1) << mbits);
    if (x >= overflow) return sign | inf;
    auto it = std::lower_bound(pos.begin(), pos.end(), std::make_pair(x, uint16_t{0}),
                               [](const auto& a, const auto& b) { return a.first < b.first; });
    if (it == pos.end()) return sign | pos.back().second;  // between max and the overflow threshold
    if (it->first == x) return sign | it->second;
    auto lo = it - 1;
    long double dl = x - lo->first, dh = it->first - x;
    if (dl < dh) return sign | lo->second;
    if (dh < dl) return sign | it->second;
    return sign | ((lo->second & 1) == 0 ? lo->second : it->second);
  }
};

const Format& F16() {
  static const Format f(5, 10);
  return f;
}
const Format& BF16() {
  static const Format f(8, 7);
  return f;
}

uint32_t Bits(float f) { return FloatBits(f); }

TEST(CastTest, AllBF16PatternsDecodeAndRoundTrip) {
  for (uint32_t h = 0; h < 65536; ++h) {
    const float f = BF16ToF32(static_cast<uint16_t>(h));
    const long double ref = Decode16(static_cast<uint16_t>(h), 8, 7);
    if (std::isnan(ref)) {
      ASSERT_TRUE(std::isnan(f)) << std::hex << h;
      ASSERT_EQ(F32ToBF16(f), (h & 0x8000) | 0x7fc0) << std::hex << h;
      continue;
    }
    ASSERT_EQ(static_cast<long double>(f), ref) << std::hex << h;
    ASSERT_EQ(std::signbit(f), (h & 0x8000) != 0) << std::hex << h;
    ASSERT_EQ(F32ToBF16(f), h) << std::hex << h;
  }
}

TEST(CastTest, AllF16PatternsDecodeAndRoundTrip) {
  for (uint32_t h = 0; h < 65536; ++h) {
    const float f = F16ToF32(static_cast<uint16_t>(h));
    const long double ref = Decode16(static_cast<uint16_t>(h), 5, 10);
    if (std::isnan(ref)) {
      ASSERT_TRUE(std::isnan(f)) << std::hex << h;
      ASSERT_EQ(Bits(f) & 0x400000u, 0x400000u) << "NaN must come out quiet: " << std::hex << h;
      ASSERT_EQ(F32ToF16(f), (h & 0x8000) | 0x7e00) << std::hex << h;
      continue;
    }
    ASSERT_EQ(static_cast<long double>(f), ref) << std::hex << h;
    ASSERT_EQ(std::signbit(f), (h & 0x8000) != 0) << std::hex << h;
    ASSERT_EQ(F32ToF16(f), h) << std::hex << h;
  }
}

void CheckBoth(float f) {
  ASSERT_EQ(F32ToF16(f), F16().Round(f, 0x7e00)) << "f16 of " << f << " bits " << std::hex << Bits(f);
  ASSERT_EQ(F32ToBF16(f), BF16().Round(f, 0x7fc0)) << "bf16 of " << f << " bits " << std::hex << Bits(f);
}

TEST(CastTest, EdgeValues) {
  const float edges[] = {0.0f, -0.0f, 1.0f, -1.0f, 65504.0f, 65519.99f, 65520.0f, -65520.0f, 65536.0f, 1e30f,
                         INFINITY, -INFINITY, NAN, -NAN, std::ldexp(1.0f, -14), std::ldexp(1.0f, -24),
                         std::ldexp(1.0f, -25), std::ldexp(1.5f, -25), std::ldexp(1.0f, -26), 3.0e38f,
                         std::numeric_limits<float>::max(), std::numeric_limits<float>::denorm_min(),
                         std::numeric_limits<float>::min(), 0.1f, 1.0f / 3.0f};
  for (float f : edges) CheckBoth(f);
  EXPECT_EQ(F32ToF16(65504.0f), 0x7bff);
  EXPECT_EQ(F32ToF16(65520.0f), 0x7c00);
  EXPECT_EQ(F32ToF16(std::nextafter(65520.0f, 0.0f)), 0x7bff);
  EXPECT_EQ(F32ToF16(std::ldexp(1.0f, -25)), 0x0000);  // tie between 0 and the smallest subnormal -> even
  EXPECT_EQ(F32ToF16(std::ldexp(1.5f, -24)), 0x0002);  // tie between 1 and 2 subnormal units -> even
  EXPECT_EQ(F32ToBF16(std::numeric_limits<float>::max()), 0x7f80);
  // NaN payloads and signs.
  EXPECT_EQ(F32ToBF16(BitsFloat(0xff800001u)), 0xffc0);
  EXPECT_EQ(F32ToF16(BitsFloat(0x7f800001u)), 0x7e00);
}

// Every midpoint between neighbouring 16-bit values, and one f32 ulp either side.
TEST(CastTest, AllHalfwayCases) {
  for (const Format* fmt : {&F16(), &BF16()}) {
    for (size_t k = 0; k + 1 < fmt->pos.size(); ++k) {
      const long double mid = (fmt->pos[k].first + fmt->pos[k + 1].first) / 2;
      const float f = static_cast<float>(mid);
      if (static_cast<long double>(f) != mid) continue;  // below f32's range
      for (float v : {f, std::nextafter(f, 0.0f), std::nextafter(f, INFINITY)}) {
        CheckBoth(v);
        CheckBoth(-v);
      }
    }
  }
}

TEST(CastTest, RandomValues) {
  std::mt19937_64 rng(1234);
  for (int n = 0; n < 2000000; ++n) {
    const uint32_t u = static_cast<uint32_t>(rng());
    CheckBoth(BitsFloat(u));
    // Concentrate on f16's exponent range, subnormals included.
    CheckBoth(BitsFloat((u & 0x807fffffu) | ((100u + (u >> 23) % 45u) << 23)));
  }
}

TEST(CastTest, LoadStoreAndCopyElement) {
  float f[2] = {1.5f, -2.25f};
  uint16_t b[2], h[2];
  StoreFromF32(b, kBF16, 1, LoadAsF32(f, kF32, 1));
  StoreFromF32(h, kF16, 0, LoadAsF32(f, kF32, 0));
  EXPECT_EQ(LoadAsF32(b, kBF16, 1), -2.25f);
  EXPECT_EQ(LoadAsF32(h, kF16, 0), 1.5f);
  uint32_t nan_payload = 0x7fa00001u, out = 0;
  CopyElement(&nan_payload, kF32, 0, &out, kF32, 0);
  EXPECT_EQ(out, nan_payload) << "same-dtype copies are bit-exact";
}

}  // namespace
}  // namespace ws::kernels
