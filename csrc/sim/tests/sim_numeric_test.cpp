// Unit tests of the simulator's numeric headers, which need no simulated device: the 16-bit float
// conversions and arithmetic (sim_half.h) against an independent round-to-nearest-even written
// with frexp / ldexp / nearbyint on doubles (sim_half.h rounds with integer arithmetic on the bits),
// the fast-math and integer intrinsics (sim_math.h) on their documented edge cases, and the vector
// types (sim_vector_types.h).
//
//   g++ -std=c++17 -O2 -Wall -Wextra -Icsrc/sim csrc/sim/tests/sim_numeric_test.cpp -o /tmp/t && /tmp/t
#include <algorithm>
#include <cfenv>
#include <cinttypes>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>
#include <type_traits>

#include "sim_half.h"
#include "sim_math.h"
#include "sim_vector_types.h"

namespace {

int g_failures = 0;
int g_checks = 0;

#define CHECK(cond, ...)                                              \
  do {                                                                \
    ++g_checks;                                                       \
    if (!(cond)) {                                                    \
      if (++g_failures <= 30) {                                       \
        std::printf("%s:%d: CHECK(%s) failed: ", __FILE__, __LINE__, #cond); \
        std::printf(__VA_ARGS__);                                     \
        std::printf("\n");                                            \
      }                                                               \
    }                                                                 \
  } while (0)

struct Fmt {
  int mant_bits, bias;
};
constexpr Fmt kH{10, 15}, kB{7, 127};

// The format value nearest to x (ties to even) as a double: scale so the last kept bit is 1,
// round with nearbyint (FE_TONEAREST), scale back; beyond the largest finite value, infinity.
double ref_round(double x, Fmt f) {
  if (std::isnan(x) || x == 0.0 || std::isinf(x)) return x;
  int e;
  std::frexp(x, &e);  // |x| = m 2^e, m in [0.5, 1)
  const int q = std::max(e - 1, 1 - f.bias) - f.mant_bits;
  const double r = std::ldexp(std::nearbyint(std::ldexp(x, -q)), q);
  const double max_finite = std::ldexp(2.0 - std::ldexp(1.0, -f.mant_bits), f.bias);
  if (std::fabs(r) > max_finite) return std::copysign(INFINITY, x);
  return r == 0.0 ? std::copysign(0.0, x) : r;
}

// Decodes 16 bits of format f by its definition.
double decode(uint16_t bits, Fmt f) {
  const int exp_bits = 15 - f.mant_bits;
  const int field = (bits >> f.mant_bits) & ((1 << exp_bits) - 1);
  const int mant = bits & ((1 << f.mant_bits) - 1);
  const double sign = (bits & 0x8000) ? -1.0 : 1.0;
  if (field == (1 << exp_bits) - 1) return mant ? NAN : sign * INFINITY;
  const double significand = field ? (1 << f.mant_bits) + mant : mant;
  return sign * std::ldexp(significand, (field ? field : 1) - f.bias - f.mant_bits);
}

bool same(double a, double b) {
  if (std::isnan(a) || std::isnan(b)) return std::isnan(a) && std::isnan(b);
  return a == b && std::signbit(a) == std::signbit(b);
}

float rand_float(std::mt19937_64& rng) {
  const uint32_t bits = static_cast<uint32_t>(rng());
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}
// A float with an exponent in [lo, hi) and a random sign and significand.
float rand_float_in(std::mt19937_64& rng, int lo, int hi) {
  std::uniform_int_distribution<int> exponent(lo, hi - 1);
  const double m = 1.0 + static_cast<double>(rng() >> 40) / static_cast<double>(uint64_t(1) << 24);
  const float v = static_cast<float>(std::ldexp(m, exponent(rng)));
  return (rng() & 1) ? -v : v;
}

double h2d(__half h) { return static_cast<double>(__half2float(h)); }
double b2d(__nv_bfloat16 b) { return static_cast<double>(__bfloat162float(b)); }

void test_layout() {
  static_assert(sizeof(__half) == 2 && alignof(__half) == 2, "");
  static_assert(sizeof(__nv_bfloat16) == 2, "");
  static_assert(sizeof(__half2) == 4 && alignof(__half2) == 4, "");
  static_assert(sizeof(__nv_bfloat162) == 4 && alignof(__nv_bfloat162) == 4, "");
  static_assert(std::is_trivially_copyable<__half>::value && std::is_standard_layout<__half>::value, "");
  static_assert(std::is_trivially_copyable<__nv_bfloat162>::value && std::is_standard_layout<__nv_bfloat162>::value, "");
  static_assert(std::is_trivially_default_constructible<__half>::value, "uninitialized like CUDA's");
  static_assert(std::is_same<half, __half>::value && std::is_same<nv_bfloat16, __nv_bfloat16>::value, "");
  static_assert(sizeof(float2) == 8 && alignof(float2) == 8 && sizeof(float4) == 16 && alignof(float4) == 16, "");
  static_assert(alignof(int2) == 8 && alignof(uint2) == 8 && alignof(int4) == 16 && alignof(uint4) == 16, "");
  static_assert(sizeof(uint4) == 16 && sizeof(double2) == 16 && alignof(double2) == 16, "");
  const float2 f2 = make_float2(1.0f, 2.0f);
  const uint4 u4 = make_uint4(1, 2, 3, 4);
  CHECK(f2.x == 1.0f && f2.y == 2.0f && u4.w == 4u, "make_*");
}

// Every 16-bit pattern: decoding matches the definition, and float -> 16 bits gives it back.
void test_exhaustive() {
  for (uint32_t i = 0; i < 65536; ++i) {
    const uint16_t bits = static_cast<uint16_t>(i);
    const double hv = decode(bits, kH), bv = decode(bits, kB);
    const float hf = __half2float(__ushort_as_half(bits)), bf = __bfloat162float(__ushort_as_bfloat16(bits));
    CHECK(same(hf, hv), "half 0x%04x decodes to %a, expected %a", i, hf, hv);
    CHECK(same(bf, bv), "bf16 0x%04x decodes to %a, expected %a", i, bf, bv);
    const uint16_t hexpect = std::isnan(hv) ? 0x7fff : bits, bexpect = std::isnan(bv) ? 0x7fff : bits;
    CHECK(__half_as_ushort(__float2half(hf)) == hexpect, "half 0x%04x round trip", i);
    CHECK(__half_as_ushort(__half(static_cast<double>(hf))) == hexpect, "half 0x%04x round trip via double", i);
    CHECK(__bfloat16_as_ushort(__float2bfloat16(bf)) == bexpect, "bf16 0x%04x round trip", i);
    CHECK(__bfloat16_as_ushort(__double2bfloat16(bf)) == bexpect, "bf16 0x%04x round trip via double", i);
  }
}

// Midpoints between consecutive values round to the even one; a float ulp either side decides.
void test_ties() {
  for (uint32_t i = 0; i < 0x7bff; ++i) {  // consecutive finite halves i, i + 1
    for (uint32_t sign : {0u, 0x8000u}) {
      const uint16_t lo = static_cast<uint16_t>(i | sign), hi = static_cast<uint16_t>((i + 1) | sign);
      const float mid = static_cast<float>((decode(lo, kH) + decode(hi, kH)) / 2);
      const uint16_t even = (i & 1) ? hi : lo;
      CHECK(__half_as_ushort(__float2half_rn(mid)) == even, "half tie between 0x%04x and 0x%04x", lo, hi);
      const float above = std::nextafter(mid, sign ? -INFINITY : INFINITY);
      const float below = std::nextafter(mid, 0.0f);
      CHECK(__half_as_ushort(__float2half_rn(above)) == hi, "half above tie 0x%04x", lo);
      CHECK(__half_as_ushort(__float2half_rn(below)) == lo, "half below tie 0x%04x", lo);
      // From double: a distance far below float precision still decides (no rounding through float).
      const double dmid = (decode(lo, kH) + decode(hi, kH)) / 2;
      const double tiny = std::ldexp(std::fabs(dmid), -45);
      CHECK(__half_as_ushort(__double2half(dmid + (sign ? -tiny : tiny))) == hi, "double above half tie 0x%04x", lo);
      CHECK(__half_as_ushort(__double2half(dmid - (sign ? -tiny : tiny))) == lo, "double below half tie 0x%04x", lo);
    }
  }
  for (uint32_t i = 0; i < 0x7f7f; ++i) {  // consecutive finite bf16
    const uint16_t lo = static_cast<uint16_t>(i), hi = static_cast<uint16_t>(i + 1);
    const float mid = static_cast<float>((decode(lo, kB) + decode(hi, kB)) / 2);
    CHECK(__bfloat16_as_ushort(__float2bfloat16_rn(mid)) == ((i & 1) ? hi : lo), "bf16 tie 0x%04x", lo);
    CHECK(__bfloat16_as_ushort(__float2bfloat16_rn(std::nextafter(mid, INFINITY))) == hi, "bf16 above tie 0x%04x", lo);
    CHECK(__bfloat16_as_ushort(__float2bfloat16_rn(std::nextafter(mid, 0.0f))) == lo, "bf16 below tie 0x%04x", lo);
  }
  // Overflow: 65520 is the tie between 65504 and 2^16, which rounds (to even) to infinity.
  CHECK(__half_as_ushort(__float2half(65520.0f)) == 0x7c00, "65520 -> inf");
  CHECK(__half_as_ushort(__float2half(std::nextafter(65520.0f, 0.0f))) == 0x7bff, "below 65520 -> 65504");
  CHECK(__half_as_ushort(__float2half(-1e30f)) == 0xfc00, "-1e30 -> -inf");
  CHECK(__half_as_ushort(__float2half(std::ldexp(1.0f, -25))) == 0x0000, "2^-25 (tie with 0) -> +0");
  CHECK(__half_as_ushort(__float2half(std::nextafter(std::ldexp(1.0f, -25), 1.0f))) == 0x0001, "above 2^-25 -> min subnormal");
  CHECK(__half_as_ushort(__float2half(-0.0f)) == 0x8000, "-0");
  CHECK(__half_as_ushort(__float2half(NAN)) == 0x7fff && __bfloat16_as_ushort(__float2bfloat16(-NAN)) == 0x7fff, "NaN");
  CHECK(__bfloat16_as_ushort(__float2bfloat16(std::numeric_limits<float>::max())) == 0x7f80, "FLT_MAX -> bf16 inf");
}

void test_random_conversions() {
  std::mt19937_64 rng(12345);
  for (int n = 0; n < 400000; ++n) {
    const float x = n % 2 ? rand_float(rng) : rand_float_in(rng, -30, 18);
    CHECK(same(h2d(__float2half(x)), ref_round(x, kH)), "half(%a) = %a, expected %a", x, h2d(__float2half(x)),
          ref_round(x, kH));
    const float y = n % 2 ? rand_float(rng) : rand_float_in(rng, -140, 128);
    CHECK(same(b2d(__float2bfloat16(y)), ref_round(y, kB)), "bf16(%a) = %a, expected %a", y,
          b2d(__float2bfloat16(y)), ref_round(y, kB));
    // Doubles with bits below float precision.
    const double d = static_cast<double>(rand_float_in(rng, -26, 17)) * (1.0 + std::ldexp(static_cast<double>(rng() >> 40), -60));
    CHECK(same(h2d(__double2half(d)), ref_round(d, kH)), "half(double %a)", d);
    CHECK(same(b2d(__double2bfloat16(d)), ref_round(d, kB)), "bf16(double %a)", d);
  }
  // Integers: rounded once from the exact integer.
  CHECK(__half2float(__int2half_rn(2049)) == 2048.0f && __half2float(__int2half_rn(2051)) == 2052.0f, "int ties");
  CHECK(__half2float(__int2half_rn(-65519)) == -65504.0f && std::isinf(__half2float(__int2half_rn(65520))), "int range");
  CHECK(__bfloat162float(__nv_bfloat16((1LL << 60) + (1LL << 52) + 1)) == std::ldexp(1.0f, 60) + std::ldexp(1.0f, 53),
        "bf16 from int64 rounds once (via double it would tie and round down)");
  CHECK(__half2int_rz(__float2half(-2.75f)) == -2 && __half2int_rn(__float2half(2.5f)) == 2, "half -> int");
  CHECK(__half2int_rz(__ushort_as_half(0x7c00)) == INT_MAX && __half2int_rz(__ushort_as_half(0x7e00)) == 0, "inf/NaN -> int");
  CHECK(__bfloat162int_rz(__float2bfloat16(1e20f)) == INT_MAX, "bf16 -> int saturates");
}

template <class T, class Op, class Ref>
void check_binary(const char* name, Fmt f, T a, T b, Op op, Ref exact) {
  const T r = op(a, b);
  const double expect = ref_round(exact(static_cast<double>(float(a)), static_cast<double>(float(b))), f);
  CHECK(same(static_cast<double>(float(r)), expect) || (std::isnan(expect) && r.__x == 0x7fff), "%s(%a, %a) = %a, expected %a",
        name, static_cast<double>(float(a)), static_cast<double>(float(b)), static_cast<double>(float(r)), expect);
}

void test_arithmetic() {
  std::mt19937_64 rng(777);
  for (int n = 0; n < 200000; ++n) {
    // Halves: sums, products and quotients of halves are exact or correctly rounded in double.
    const __half a = __float2half(rand_float_in(rng, -16, 16)), b = __float2half(rand_float_in(rng, -16, 16));
    check_binary("__hadd", kH, a, b, [](__half x, __half y) { return __hadd(x, y); }, [](double x, double y) { return x + y; });
    check_binary("__hsub", kH, a, b, [](__half x, __half y) { return x - y; }, [](double x, double y) { return x - y; });
    check_binary("__hmul", kH, a, b, [](__half x, __half y) { return x * y; }, [](double x, double y) { return x * y; });
    check_binary("__hdiv", kH, a, b, [](__half x, __half y) { return x / y; }, [](double x, double y) { return x / y; });
    const __half c = __float2half(rand_float_in(rng, -16, 16));
    const double fma_exact = h2d(a) * h2d(b) + h2d(c);
    CHECK(same(h2d(__hfma(a, b, c)), ref_round(fma_exact, kH)), "__hfma(%a, %a, %a)", h2d(a), h2d(b), h2d(c));
    // bf16 within 30 binades of each other: exact in double.
    const __nv_bfloat16 x = __float2bfloat16(rand_float_in(rng, -15, 15)), y = __float2bfloat16(rand_float_in(rng, -15, 15));
    check_binary("__hadd bf16", kB, x, y, [](__nv_bfloat16 p, __nv_bfloat16 q) { return p + q; },
                 [](double p, double q) { return p + q; });
    check_binary("__hmul bf16", kB, x, y, [](__nv_bfloat16 p, __nv_bfloat16 q) { return __hmul(p, q); },
                 [](double p, double q) { return p * q; });
    // Pairs are elementwise.
    const __half2 p2 = __halves2half2(a, b), q2 = __halves2half2(c, a);
    const __half2 s2 = __hadd2(p2, q2), f2 = __hfma2(p2, q2, p2);
    CHECK(s2.x.__x == __hadd(a, c).__x && s2.y.__x == __hadd(b, a).__x, "__hadd2");
    CHECK(f2.x.__x == __hfma(a, c, a).__x && f2.y.__x == __hfma(b, a, b).__x, "__hfma2");
  }
  // One rounding where a double result would tie: 7 * 37 = 259 lies midway between the bf16 values
  // 258 and 260; a tiny c decides the direction (computed in double, c would vanish and the tie
  // would go to even, 260).
  const __nv_bfloat16 seven = __float2bfloat16(7.0f), b37 = __float2bfloat16(37.0f);
  const __nv_bfloat16 tiny = __float2bfloat16(std::ldexp(1.0f, -100));
  CHECK(__bfloat162float(__hfma(seven, b37, __hneg(tiny))) == 258.0f, "bf16 fma below a tie");
  CHECK(__bfloat162float(__hfma(seven, b37, tiny)) == 260.0f, "bf16 fma above a tie");
  CHECK(__bfloat162float(__hfma(seven, b37, __float2bfloat16(0.0f))) == 260.0f, "bf16 fma exact tie -> even");
  // 261 = 9 * 29: tie between 260 and 262, even is 260.
  CHECK(__bfloat162float(__hfma(__float2bfloat16(9.0f), __float2bfloat16(29.0f), tiny)) == 262.0f, "bf16 fma tie+tiny");
  CHECK(__bfloat162float(__hfma(__float2bfloat16(9.0f), __float2bfloat16(29.0f), __float2bfloat16(0.0f))) == 260.0f,
        "bf16 fma tie");
  // Operands far apart: the sum rounds to the larger one; an exact tie goes to even.
  const __nv_bfloat16 big = __float2bfloat16(std::ldexp(1.0f, 100)), half_ulp = __float2bfloat16(std::ldexp(1.0f, 92));
  CHECK(__bfloat162float(__hadd(__hadd(big, half_ulp), tiny)) == std::ldexp(1.0f, 100), "tie to even, then + tiny");
  CHECK(__bfloat162float(__hfma(__float2bfloat16(1.0f), half_ulp, big)) == std::ldexp(1.0f, 100), "fma exact tie");
  const __nv_bfloat162 pair = __floats2bfloat162_rn(1.5f, -2.25f);
  const float2 back = __bfloat1622float2(pair);
  CHECK(back.x == 1.5f && back.y == -2.25f && __low2float(pair) == 1.5f && __high2float(pair) == -2.25f, "bf16 pairs");
  const float2 hb = __half22float2(__floats2half2_rn(0.1f, 3.0f));
  CHECK(hb.x == __half2float(__float2half(0.1f)) && hb.y == 3.0f, "__half22float2");
  // The project's dequantization idiom: (1024 + q) - 1024 in half pairs is exact.
  uint32_t magic = 0x64006400u | 0x00050003u, zero = 0x64006400u;
  __half2 hm, hz;
  std::memcpy(&hm, &magic, 4);
  std::memcpy(&hz, &zero, 4);
  const __half2 q = __hsub2(hm, hz);
  CHECK(__low2float(q) == 3.0f && __high2float(q) == 5.0f, "magic-number dequantization");
}

void test_half_intrinsics() {
  const __half one = __float2half(1.0f), two = __float2half(2.0f), nan = __ushort_as_half(0x7e00);
  const __half pzero = __float2half(0.0f), nzero = __float2half(-0.0f);
  CHECK(__hmax(one, two).__x == two.__x && __hmin(one, two).__x == one.__x, "max/min");
  CHECK(__hmax(nan, one).__x == one.__x && __hmin(one, nan).__x == one.__x, "max/min ignore one NaN");
  CHECK(__hmax(nan, nan).__x == 0x7fff, "max of NaNs is the canonical NaN");
  CHECK(__hmax(pzero, nzero).__x == 0x0000 && __hmin(pzero, nzero).__x == 0x8000, "+0 > -0");
  CHECK(__hisnan(nan) && !__hisnan(one) && __hisinf(__ushort_as_half(0xfc00)) == -1 && __hisinf(one) == 0, "isnan/isinf");
  CHECK(__habs(__float2half(-3.0f)).__x == __float2half(3.0f).__x && __hneg(one).__x == 0xbc00, "abs/neg");
  CHECK(__hneg(nan).__x == 0xfe00 && __habs(__ushort_as_half(0xfe00)).__x == 0x7e00, "neg/abs only flip the sign");
  CHECK(one < two && two > one && one != two && !(nan == nan) && (nan != nan) && !__hne(nan, one), "comparisons");
  __half h = one;
  h += two;
  ++h;
  CHECK(__half2float(h) == 4.0f && __half2float(-h) == -4.0f, "compound operators");
  const float widened = one;  // implicit conversion, as CUDA's operator float
  CHECK(widened == 1.0f, "operator float");
  CHECK(__half2float(__half(3)) == 3.0f && __half2float(__half(1u << 20)) == INFINITY, "integer constructors");
  const __half2 h2 = make_half2(one, two);
  CHECK(__low2half(h2).__x == one.__x && __high2half(h2).__x == two.__x && __half2half2(one).y.__x == one.__x, "half2");
  const __half_raw raw = one;
  CHECK(raw.x == 0x3c00 && __half(raw).__x == 0x3c00, "raw");
  const __nv_bfloat16 bnan = __ushort_as_bfloat16(0xffc1);
  CHECK(__hisnan(bnan) && __hmax(bnan, __float2bfloat16(-1.0f)).__x == 0xbf80, "bf16 NaN max");
}

void test_fast_math() {
  const float subnormal = std::ldexp(1.0f, -130);
  CHECK(__expf(0.0f) == 1.0f && __expf(subnormal) == 1.0f && __expf(-INFINITY) == 0.0f, "__expf basics");
  CHECK(std::isinf(__expf(INFINITY)) && std::isnan(__expf(NAN)) && std::isinf(__expf(89.0f)), "__expf specials");
  CHECK(__expf(-87.0f) >= std::numeric_limits<float>::min(), "e^-87 is normal");
  CHECK(__expf(-88.0f) == 0.0f, "e^-88 is subnormal: flushed (ex2.approx.ftz)");
  CHECK(__expf(-100.0f) == 0.0f && !std::signbit(__expf(-100.0f)), "a subnormal result flushes to +0");
  for (float x = -87.0f; x < 88.0f; x += 0.37f) {
    const double exact = std::exp(static_cast<double>(x));
    const double ulps = std::fabs(__expf(x) - exact) / (std::ldexp(1.0, std::ilogb(exact) - 23));
    CHECK(ulps <= 2 + std::floor(1.173 * std::fabs(x)), "__expf(%a) off by %g ulp", x, ulps);
  }
  CHECK(std::fabs(__logf(2.718281828f) - 1.0f) < 1e-6f && __logf(1.0f) == 0.0f, "__logf");
  CHECK(__logf(0.0f) == -INFINITY && __logf(subnormal) == -INFINITY && std::isnan(__logf(-1.0f)), "__logf specials");
  CHECK(__log2f(8.0f) == 3.0f && std::fabs(__log10f(1000.0f) - 3.0f) < 1e-6f, "__log2f/__log10f");
  CHECK(std::fabs(__exp10f(2.0f) - 100.0f) < 1e-4f && std::fabs(__powf(2.0f, 10.0f) - 1024.0f) < 1e-3f, "exp10/pow");
  CHECK(std::isnan(__powf(-2.0f, 2.0f)) && __powf(0.0f, 2.0f) == 0.0f, "__powf is exp2(y log2 x)");
  CHECK(std::fabs(__sinf(1.0f) - std::sin(1.0f)) < 1e-6f && std::fabs(__cosf(1.0f) - std::cos(1.0f)) < 1e-6f, "sin/cos");
  CHECK(std::fabs(__tanf(0.5f) - std::tan(0.5f)) < 1e-6f && __sinf(subnormal) == 0.0f, "tan, ftz");
  float s = 0.0f, c = 0.0f;
  __sincosf(0.5f, &s, &c);
  CHECK(s == __sinf(0.5f) && c == __cosf(0.5f), "__sincosf");
  // __fdividef: 0 for 2^126 < |y| < 2^128, NaN then for an infinite x.
  CHECK(__fdividef(1.0f, 0x1p127f) == 0.0f && __fdividef(1.0f, -0x1.8p126f) == 0.0f, "__fdividef huge divisor");
  CHECK(std::isnan(__fdividef(INFINITY, 0x1p127f)), "__fdividef(inf, huge)");
  CHECK(__fdividef(1.0f, 0x1p126f) == 0x1p-126f && __fdividef(3.0f, 2.0f) == 1.5f, "__fdividef in range");
  CHECK(std::isinf(__fdividef(1.0f, subnormal)) && __fdividef(subnormal, 1.0f) == 0.0f, "__fdividef ftz");
  CHECK(__fdividef(1.0f, INFINITY) == 0.0f && std::isnan(__fdividef(0.0f, 0.0f)), "__fdividef inf/0");
  CHECK(__frcp_rn(4.0f) == 0.25f && __frcp_rn(0x1p127f) == 0x1p-127f, "__frcp_rn keeps subnormals");
  CHECK(__fsqrt_rn(2.0f) == std::sqrt(2.0f) && rsqrtf(4.0f) == 0.5f && std::isinf(rsqrtf(0.0f)), "sqrt/rsqrt");
  CHECK(__saturatef(NAN) == 0.0f && __saturatef(-1.0f) == 0.0f && __saturatef(2.0f) == 1.0f && __saturatef(0.25f) == 0.25f,
        "__saturatef");
  CHECK(__fmaf_rn(0x1.000002p0f, 0x1.000002p0f, -1.0f) == std::fma(0x1.000002p0f, 0x1.000002p0f, -1.0f), "__fmaf_rn");
  CHECK(__fadd_rn(1.0f, 0x1p-24f) == 1.0f && __fmul_rn(3.0f, 0.5f) == 1.5f && __fsub_rn(1.0f, 0.5f) == 0.5f, "_rn ops");
  CHECK(__float2int_rn(2.5f) == 2 && __float2int_rn(-3.5f) == -4 && __float2int_rz(-3.9f) == -3, "float -> int");
  CHECK(__float2int_rn(NAN) == 0 && __float2int_rz(1e20f) == INT_MAX && __float2int_rn(-1e20f) == INT_MIN, "saturation");
}

void test_bits() {
  CHECK(__int_as_float(0x3f800000) == 1.0f && __float_as_int(-2.0f) == static_cast<int>(0xc0000000u), "int<->float");
  CHECK(__float_as_uint(1.0f) == 0x3f800000u && __uint_as_float(0x40000000u) == 2.0f, "uint<->float");
  CHECK(__double_as_longlong(1.0) == 0x3ff0000000000000LL && __longlong_as_double(0x4000000000000000LL) == 2.0, "ll<->double");
  CHECK(__hiloint2double(__double2hiint(3.25), __double2loint(3.25)) == 3.25, "hi/lo");
  CHECK(__popc(0xf0f0u) == 8 && __popcll(~0ull) == 64, "popc");
  CHECK(__clz(0) == 32 && __clz(1) == 31 && __clz(-1) == 0 && __clzll(0) == 64 && __clzll(1) == 63, "clz");
  CHECK(__ffs(0) == 0 && __ffs(8) == 4 && __ffs(INT_MIN) == 32 && __ffsll(1LL << 40) == 41, "ffs");
  CHECK(__brev(1u) == 0x80000000u && __brev(0x12345678u) == 0x1e6a2c48u && __brevll(1ull) == (1ull << 63), "brev");
  CHECK(__byte_perm(0x33221100u, 0x77665544u, 0x3210) == 0x33221100u, "byte_perm x");
  CHECK(__byte_perm(0x33221100u, 0x77665544u, 0x7654) == 0x77665544u, "byte_perm y");
  CHECK(__byte_perm(0x33221100u, 0x77665544u, 0x0123) == 0x00112233u, "byte_perm swap");
  CHECK(__byte_perm(0x33221100u, 0x77665544u, 0x5140) == 0x55114400u, "byte_perm mix");
  CHECK(__byte_perm(0x33221100u, 0x77665544u, 0x8888) == 0x00000000u, "byte_perm uses 3 selector bits");
  CHECK(__funnelshift_l(0x80000000u, 1u, 1u) == 3u && __funnelshift_l(0xabcdu, 0x1234u, 32u) == 0x1234u, "shf.l wrap");
  CHECK(__funnelshift_lc(0xabcdu, 0x1234u, 40u) == 0xabcdu && __funnelshift_l(0u, 1u, 40u) == 0x100u, "shf.l clamp");
  CHECK(__funnelshift_r(1u, 1u, 1u) == 0x80000000u && __funnelshift_rc(5u, 7u, 99u) == 7u, "shf.r");
  CHECK(__umulhi(0xffffffffu, 0xffffffffu) == 0xfffffffeu && __mulhi(-1, 1) == -1, "mulhi");
  CHECK(__umul64hi(~0ull, 2ull) == 1ull && __mul64hi(-1LL, 1LL) == -1LL, "mul64hi");
  CHECK(__mul24(0x00ffffff, 2) == -2 && __mul24(0x7f000003, 5) == 15 && __umul24(0xff000002u, 3u) == 6u, "mul24");
}

void test_min_max_ldg() {
  CHECK(min(3, 5) == 3 && max(3, 5) == 5 && min(2.5f, 1.5f) == 1.5f && max(1.0, 2.0) == 2.0, "global min/max");
  CHECK(min(-1, 1u) == 1u && max(7LL, 3LL) == 7LL && min(4L, 9L) == 4L && max(1ull, 2ull) == 2ull, "integer overloads");
  CHECK(max(NAN, 1.0f) == 1.0f, "fmaxf semantics");
  CHECK(std::min(3, 5) == 3 && std::max<int64_t>(1, 2) == 2 && std::min({4, 2, 8}) == 2, "std::min/max unaffected");
  {
    using std::max;
    using std::min;
    CHECK(min(3, 5) == 3 && max(2.0, 1.0) == 2.0, "using std::min in a scope");
  }
  const int value = 42;
  const float2 v2 = make_float2(1.0f, 2.0f);
  CHECK(__ldg(&value) == 42 && __ldg(&v2).y == 2.0f, "__ldg");
}

}  // namespace

int main() {
  if (std::fegetround() != FE_TONEAREST) std::fesetround(FE_TONEAREST);
  test_layout();
  test_exhaustive();
  test_ties();
  test_random_conversions();
  test_arithmetic();
  test_half_intrinsics();
  test_fast_math();
  test_bits();
  test_min_max_ldg();
  std::printf("sim_numeric_test: %d passed, %d failed\n", g_checks - g_failures, g_failures);
  return g_failures == 0 ? 0 : 1;
}
