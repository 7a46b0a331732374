// __half / __nv_bfloat16 (and their pairs) for the simulator: CUDA's 16-bit float types and
// intrinsics as host C++, bit-exact with the GPU's round-to-nearest-even conversions, so a
// simulated kernel stores the same fp16/bf16 bits as the device.
//
// Arithmetic is rounded once from the exact result: a sum goes through TwoSum (a double sum of two
// bf16 values can be inexact, and rounding that double again to bf16 would round twice), a product
// of two 16-bit values is exact in double, and a quotient rounded to double then to 16 bits is
// still correctly rounded (53 >= 2 * 11 + 2). Do not build the simulator with -ffast-math: TwoSum
// relies on IEEE double arithmetic.
#pragma once

#include <climits>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "sim_vector_types.h"

namespace fl_sim {
namespace fp16 {

// A binary16-like format: sign bit, exponent field, mant_bits fraction bits.
struct Format {
  int mant_bits;
  int bias;
};
constexpr Format kHalf{10, 15};
constexpr Format kBFloat16{7, 127};
// cvt.rn.f16.f32 and cvt.rn.bf16.f32 (and CUDA's host conversions) return this for every NaN.
constexpr uint16_t kCanonicalNaN = 0x7fff;

inline uint16_t inf_bits(Format f) { return static_cast<uint16_t>((2 * f.bias + 1) << f.mant_bits); }

// Rounds sign * (m * 2^e0 + d) to the nearest value of `f`, ties to even, where |d| is far below
// the format's precision and `sticky` is d's sign relative to the magnitude (-1, 0 or +1): it only
// decides exact ties, which is what keeps a two-step computation from rounding twice.
inline uint16_t round_scaled(bool negative, uint64_t m, int e0, int sticky, Format f) {
  const uint16_t sign = negative ? 0x8000 : 0;
  if (m == 0) return sign;
  const int exponent = (63 - __builtin_clzll(m)) + e0;  // floor(log2 |value|)
  const int min_exponent = 1 - f.bias;
  const int quantum = (exponent > min_exponent ? exponent : min_exponent) - f.mant_bits;  // last kept bit
  const int shift = quantum - e0;
  uint64_t kept;
  int vs_half;  // the discarded part against half a quantum: -1 below, 0 equal, +1 above
  if (shift <= 0) {
    kept = m << -shift;  // representable (at most mant_bits + 1 bits); a tiny d cannot move it
    vs_half = -1;
  } else if (shift > 64) {
    kept = 0;
    vs_half = -1;
  } else {
    const uint64_t rest = shift == 64 ? m : (m & ((uint64_t(1) << shift) - 1));
    const uint64_t half = uint64_t(1) << (shift - 1);
    kept = shift == 64 ? 0 : m >> shift;
    vs_half = rest < half ? -1 : (rest > half ? 1 : sticky);
  }
  if (vs_half > 0 || (vs_half == 0 && (kept & 1))) ++kept;
  // kept includes the implicit bit, so adding it to (exponent field - 1) carries into the exponent
  // when rounding overflows the fraction; the subnormal range has an exponent field of 0.
  const uint64_t bits = (uint64_t(quantum + f.mant_bits + f.bias - 1) << f.mant_bits) + kept;
  return static_cast<uint16_t>(sign | (bits >= inf_bits(f) ? inf_bits(f) : bits));
}

inline uint16_t round_double(double x, int sticky, Format f) {
  uint64_t b;
  std::memcpy(&b, &x, sizeof(b));
  const bool negative = (b >> 63) != 0;
  const int field = static_cast<int>((b >> 52) & 0x7ff);
  const uint64_t fraction = b & ((uint64_t(1) << 52) - 1);
  if (field == 0x7ff) return fraction ? kCanonicalNaN : static_cast<uint16_t>((negative ? 0x8000 : 0) | inf_bits(f));
  if (field == 0) return round_scaled(negative, fraction, -1074, sticky, f);
  return round_scaled(negative, fraction | (uint64_t(1) << 52), field - 1075, sticky, f);
}

// x + y rounded once: TwoSum gives the double sum's exact error, whose sign breaks a tie.
inline uint16_t round_sum(double x, double y, Format f) {
  const double s = x + y;
  if (!std::isfinite(s)) return round_double(s, 0, f);
  const double yy = s - x;
  const double err = (x - (s - yy)) + (y - yy);
  const int sticky = err == 0 ? 0 : ((err > 0) == (s > 0) ? 1 : -1);
  return round_double(s, sticky, f);
}

template <class Int>
inline uint16_t round_integer(Int v, Format f) {
  const bool negative = v < 0;
  const uint64_t magnitude = negative ? uint64_t(0) - static_cast<uint64_t>(v) : static_cast<uint64_t>(v);
  return round_scaled(negative, magnitude, 0, 0, f);
}

inline float bits_to_float(uint32_t bits) {
  float out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}

// Exact: every half is a float.
inline float half_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  const uint32_t field = (h >> 10) & 0x1fu, mant = h & 0x3ffu;
  if (field == 0x1f) return bits_to_float(sign | 0x7f800000u | (mant << 13));  // inf, NaN (payload kept)
  if (field != 0) return bits_to_float(sign | ((field + 112u) << 23) | (mant << 13));
  if (mant == 0) return bits_to_float(sign);
  const int shift = __builtin_clz(mant) - 21;  // subnormal: move the leading 1 to bit 10
  return bits_to_float(sign | (uint32_t(113 - shift) << 23) | (((mant << shift) & 0x3ffu) << 13));
}
inline float bfloat16_to_float(uint16_t b) { return bits_to_float(uint32_t(b) << 16); }

// float -> int conversions of cvt.rzi / cvt.rni.s32: NaN gives 0, out-of-range values saturate.
inline int saturate_to_int(double v) {
  if (std::isnan(v)) return 0;
  if (v >= 2147483647.0) return INT_MAX;
  if (v <= -2147483648.0) return INT_MIN;
  return static_cast<int>(v);
}

}  // namespace fp16
}  // namespace fl_sim

struct __half_raw {
  unsigned short x;
};
struct __half2_raw {
  unsigned short x, y;
};
struct __nv_bfloat16_raw {
  unsigned short x;
};
struct __nv_bfloat162_raw {
  unsigned short x, y;
};

// The constructors and conversions CUDA's headers give (without __CUDA_NO_HALF_CONVERSIONS__):
// from float/double and integers by value with round-to-nearest-even, to float exactly.
#define FL_SIM_16BIT_TYPE(T, RAW, FORMAT, TO_FLOAT)                                                                \
  struct T {                                                                                                       \
    unsigned short __x;                                                                                            \
    T() = default;                                                                                                 \
    constexpr T(const RAW& r) : __x(r.x) {}                                                                        \
    T(float v) : __x(::fl_sim::fp16::round_double(v, 0, FORMAT)) {}                                              \
    T(double v) : __x(::fl_sim::fp16::round_double(v, 0, FORMAT)) {}                                             \
    T(short v) : __x(::fl_sim::fp16::round_integer(v, FORMAT)) {}                                                  \
    T(unsigned short v) : __x(::fl_sim::fp16::round_integer(v, FORMAT)) {}                                         \
    T(int v) : __x(::fl_sim::fp16::round_integer(v, FORMAT)) {}                                                    \
    T(unsigned int v) : __x(::fl_sim::fp16::round_integer(v, FORMAT)) {}                                           \
    T(long v) : __x(::fl_sim::fp16::round_integer(v, FORMAT)) {}                                                   \
    T(unsigned long v) : __x(::fl_sim::fp16::round_integer(v, FORMAT)) {}                                          \
    T(long long v) : __x(::fl_sim::fp16::round_integer(v, FORMAT)) {}                                              \
    T(unsigned long long v) : __x(::fl_sim::fp16::round_integer(v, FORMAT)) {}                                     \
    T& operator=(const RAW& r) {                                                                                   \
      __x = r.x;                                                                                                   \
      return *this;                                                                                                \
    }                                                                                                              \
    operator float() const { return ::fl_sim::fp16::TO_FLOAT(__x); }                                               \
    operator RAW() const { return RAW{__x}; }                                                                      \
  };

FL_SIM_16BIT_TYPE(__half, __half_raw, ::fl_sim::fp16::kHalf, half_to_float)
FL_SIM_16BIT_TYPE(__nv_bfloat16, __nv_bfloat16_raw, ::fl_sim::fp16::kBFloat16, bfloat16_to_float)
#undef FL_SIM_16BIT_TYPE

#define FL_SIM_16BIT_PAIR(T2, T, RAW, RAW2)                              \
  struct alignas(4) T2 {                                                 \
    T x, y;                                                              \
    T2() = default;                                                      \
    constexpr T2(const T& a, const T& b) : x(a), y(b) {}                 \
    constexpr T2(const RAW2& r) : x(RAW{r.x}), y(RAW{r.y}) {}            \
    T2& operator=(const RAW2& r) {                                       \
      x.__x = r.x;                                                       \
      y.__x = r.y;                                                       \
      return *this;                                                      \
    }                                                                    \
    operator RAW2() const { return RAW2{x.__x, y.__x}; }                 \
  };

FL_SIM_16BIT_PAIR(__half2, __half, __half_raw, __half2_raw)
FL_SIM_16BIT_PAIR(__nv_bfloat162, __nv_bfloat16, __nv_bfloat16_raw, __nv_bfloat162_raw)
#undef FL_SIM_16BIT_PAIR

typedef __half half;
typedef __half2 half2;
typedef __nv_bfloat16 nv_bfloat16;
typedef __nv_bfloat162 nv_bfloat162;

static_assert(sizeof(__half) == 2 && sizeof(__nv_bfloat16) == 2, "16-bit types hold only their bits");
static_assert(std::is_trivially_copyable<__half>::value && std::is_standard_layout<__half>::value &&
                  std::is_trivially_copyable<__nv_bfloat16>::value && std::is_standard_layout<__nv_bfloat16>::value &&
                  std::is_trivially_copyable<__half2>::value && std::is_trivially_copyable<__nv_bfloat162>::value,
              "kernels memcpy and reinterpret these types");
static_assert(sizeof(__half2) == 4 && alignof(__half2) == 4 && sizeof(__nv_bfloat162) == 4 &&
                  alignof(__nv_bfloat162) == 4,
              "pairs are one aligned 32-bit register");

namespace fl_sim {
namespace fp16 {
template <class T>
inline T from_bits(uint16_t bits) {
  T out;
  out.__x = bits;
  return out;
}
inline bool is_nan_bits(uint16_t bits, Format f) { return (bits & 0x7fffu) > inf_bits(f); }
// max.f16 / min.f16: a NaN operand gives the other one, two NaNs the canonical NaN, and +0 > -0.
inline uint16_t max_bits(uint16_t a, uint16_t b, float fa, float fb, Format f, bool want_max) {
  const bool na = is_nan_bits(a, f), nb = is_nan_bits(b, f);
  if (na && nb) return kCanonicalNaN;
  if (na) return b;
  if (nb) return a;
  if (fa == fb) return want_max ? (a & b) : (a | b);  // equal values differ only in the sign of zero
  return (fa > fb) == want_max ? a : b;
}
}  // namespace fp16
}  // namespace fl_sim

// The intrinsics and operators shared by __half and __nv_bfloat16, stamped out for each.
#define FL_SIM_16BIT_FUNCTIONS(T, T2, F)                                                                            \
  inline T __hadd(const T a, const T b) {                                                                          \
    return ::fl_sim::fp16::from_bits<T>(::fl_sim::fp16::round_sum(float(a), float(b), F));                        \
  }                                                                                                                \
  inline T __hsub(const T a, const T b) {                                                                          \
    return ::fl_sim::fp16::from_bits<T>(::fl_sim::fp16::round_sum(float(a), -double(float(b)), F));              \
  }                                                                                                                \
  inline T __hmul(const T a, const T b) {                                                                          \
    return ::fl_sim::fp16::from_bits<T>(::fl_sim::fp16::round_double(double(float(a)) * float(b), 0, F));         \
  }                                                                                                                \
  inline T __hdiv(const T a, const T b) {                                                                          \
    return ::fl_sim::fp16::from_bits<T>(::fl_sim::fp16::round_double(double(float(a)) / float(b), 0, F));         \
  }                                                                                                                \
  inline T __hfma(const T a, const T b, const T c) {                                                               \
    return ::fl_sim::fp16::from_bits<T>(::fl_sim::fp16::round_sum(double(float(a)) * float(b), float(c), F));     \
  }                                                                                                                \
  inline T __hneg(const T a) { return ::fl_sim::fp16::from_bits<T>(static_cast<uint16_t>(a.__x ^ 0x8000u)); }    \
  inline T __habs(const T a) { return ::fl_sim::fp16::from_bits<T>(static_cast<uint16_t>(a.__x & 0x7fffu)); }    \
  inline T __hmax(const T a, const T b) {                                                                          \
    return ::fl_sim::fp16::from_bits<T>(::fl_sim::fp16::max_bits(a.__x, b.__x, float(a), float(b), F, true));     \
  }                                                                                                                \
  inline T __hmin(const T a, const T b) {                                                                          \
    return ::fl_sim::fp16::from_bits<T>(::fl_sim::fp16::max_bits(a.__x, b.__x, float(a), float(b), F, false));    \
  }                                                                                                                \
  inline bool __hisnan(const T a) { return ::fl_sim::fp16::is_nan_bits(a.__x, F); }                              \
  inline int __hisinf(const T a) {                                                                                 \
    return (a.__x & 0x7fffu) == ::fl_sim::fp16::inf_bits(F) ? ((a.__x & 0x8000u) ? -1 : 1) : 0;                   \
  }                                                                                                                \
  inline bool __heq(const T a, const T b) { return float(a) == float(b); }                                        \
  inline bool __hne(const T a, const T b) { return float(a) < float(b) || float(a) > float(b); }                  \
  inline bool __hneu(const T a, const T b) { return !(float(a) == float(b)); }                                    \
  inline bool __hlt(const T a, const T b) { return float(a) < float(b); }                                         \
  inline bool __hle(const T a, const T b) { return float(a) <= float(b); }                                        \
  inline bool __hgt(const T a, const T b) { return float(a) > float(b); }                                         \
  inline bool __hge(const T a, const T b) { return float(a) >= float(b); }                                        \
  inline T2 __hadd2(const T2 a, const T2 b) { return T2(__hadd(a.x, b.x), __hadd(a.y, b.y)); }                    \
  inline T2 __hsub2(const T2 a, const T2 b) { return T2(__hsub(a.x, b.x), __hsub(a.y, b.y)); }                    \
  inline T2 __hmul2(const T2 a, const T2 b) { return T2(__hmul(a.x, b.x), __hmul(a.y, b.y)); }                    \
  inline T2 __h2div(const T2 a, const T2 b) { return T2(__hdiv(a.x, b.x), __hdiv(a.y, b.y)); }                    \
  inline T2 __hfma2(const T2 a, const T2 b, const T2 c) { return T2(__hfma(a.x, b.x, c.x), __hfma(a.y, b.y, c.y)); } \
  inline T2 __hneg2(const T2 a) { return T2(__hneg(a.x), __hneg(a.y)); }                                          \
  inline T2 __habs2(const T2 a) { return T2(__habs(a.x), __habs(a.y)); }                                          \
  inline T2 __hmax2(const T2 a, const T2 b) { return T2(__hmax(a.x, b.x), __hmax(a.y, b.y)); }                    \
  inline T2 __hmin2(const T2 a, const T2 b) { return T2(__hmin(a.x, b.x), __hmin(a.y, b.y)); }                    \
  inline float __low2float(const T2 a) { return float(a.x); }                                                     \
  inline float __high2float(const T2 a) { return float(a.y); }                                                    \
  inline T operator+(const T& a, const T& b) { return __hadd(a, b); }                                             \
  inline T operator-(const T& a, const T& b) { return __hsub(a, b); }                                             \
  inline T operator*(const T& a, const T& b) { return __hmul(a, b); }                                             \
  inline T operator/(const T& a, const T& b) { return __hdiv(a, b); }                                             \
  inline T& operator+=(T& a, const T& b) { return a = __hadd(a, b); }                                             \
  inline T& operator-=(T& a, const T& b) { return a = __hsub(a, b); }                                             \
  inline T& operator*=(T& a, const T& b) { return a = __hmul(a, b); }                                             \
  inline T& operator/=(T& a, const T& b) { return a = __hdiv(a, b); }                                             \
  inline T operator+(const T& a) { return a; }                                                                    \
  inline T operator-(const T& a) { return __hneg(a); }                                                            \
  inline T& operator++(T& a) { return a = __hadd(a, T(1.0f)); }                                                   \
  inline T& operator--(T& a) { return a = __hsub(a, T(1.0f)); }                                                   \
  inline T operator++(T& a, int) {                                                                                \
    const T old = a;                                                                                               \
    ++a;                                                                                                           \
    return old;                                                                                                    \
  }                                                                                                                \
  inline T operator--(T& a, int) {                                                                                \
    const T old = a;                                                                                               \
    --a;                                                                                                           \
    return old;                                                                                                    \
  }                                                                                                                \
  inline bool operator==(const T& a, const T& b) { return __heq(a, b); }                                          \
  inline bool operator!=(const T& a, const T& b) { return __hneu(a, b); }                                         \
  inline bool operator<(const T& a, const T& b) { return __hlt(a, b); }                                           \
  inline bool operator<=(const T& a, const T& b) { return __hle(a, b); }                                          \
  inline bool operator>(const T& a, const T& b) { return __hgt(a, b); }                                           \
  inline bool operator>=(const T& a, const T& b) { return __hge(a, b); }                                          \
  inline T2 operator+(const T2& a, const T2& b) { return __hadd2(a, b); }                                         \
  inline T2 operator-(const T2& a, const T2& b) { return __hsub2(a, b); }                                         \
  inline T2 operator*(const T2& a, const T2& b) { return __hmul2(a, b); }                                         \
  inline T2 operator/(const T2& a, const T2& b) { return __h2div(a, b); }                                         \
  inline T2& operator+=(T2& a, const T2& b) { return a = __hadd2(a, b); }                                         \
  inline T2& operator-=(T2& a, const T2& b) { return a = __hsub2(a, b); }                                         \
  inline T2& operator*=(T2& a, const T2& b) { return a = __hmul2(a, b); }                                         \
  inline T2& operator/=(T2& a, const T2& b) { return a = __h2div(a, b); }                                         \
  inline T2 operator+(const T2& a) { return a; }                                                                  \
  inline T2 operator-(const T2& a) { return __hneg2(a); }                                                         \
  inline bool operator==(const T2& a, const T2& b) { return __heq(a.x, b.x) && __heq(a.y, b.y); }                 \
  inline bool operator!=(const T2& a, const T2& b) { return __hneu(a.x, b.x) && __hneu(a.y, b.y); }

FL_SIM_16BIT_FUNCTIONS(__half, __half2, ::fl_sim::fp16::kHalf)
FL_SIM_16BIT_FUNCTIONS(__nv_bfloat16, __nv_bfloat162, ::fl_sim::fp16::kBFloat16)
#undef FL_SIM_16BIT_FUNCTIONS

// ---- __half conversions and bit casts ----------------------------------------------------------
inline __half __float2half(const float a) { return __half(a); }
inline __half __float2half_rn(const float a) { return __half(a); }
inline __half __double2half(const double a) { return __half(a); }
inline float __half2float(const __half a) { return float(a); }
inline __half __int2half_rn(const int i) { return __half(i); }
inline int __half2int_rz(const __half h) { return ::fl_sim::fp16::saturate_to_int(std::trunc(float(h))); }
inline int __half2int_rn(const __half h) { return ::fl_sim::fp16::saturate_to_int(std::nearbyint(float(h))); }
inline __half __ushort_as_half(const unsigned short i) { return ::fl_sim::fp16::from_bits<__half>(i); }
inline unsigned short __half_as_ushort(const __half h) { return h.__x; }
inline __half __short_as_half(const short i) { return ::fl_sim::fp16::from_bits<__half>(static_cast<uint16_t>(i)); }
inline short __half_as_short(const __half h) { return static_cast<short>(h.__x); }
inline __half2 __floats2half2_rn(const float a, const float b) { return __half2(__half(a), __half(b)); }
inline __half2 __float2half2_rn(const float a) { return __half2(__half(a), __half(a)); }
inline float2 __half22float2(const __half2 a) { return make_float2(float(a.x), float(a.y)); }
inline __half2 __halves2half2(const __half a, const __half b) { return __half2(a, b); }
inline __half2 make_half2(const __half x, const __half y) { return __half2(x, y); }
inline __half2 __half2half2(const __half a) { return __half2(a, a); }
inline __half __low2half(const __half2 a) { return a.x; }
inline __half __high2half(const __half2 a) { return a.y; }
inline __half2 __lows2half2(const __half2 a, const __half2 b) { return __half2(a.x, b.x); }
inline __half2 __highs2half2(const __half2 a, const __half2 b) { return __half2(a.y, b.y); }

// ---- __nv_bfloat16 conversions and bit casts ---------------------------------------------------
inline __nv_bfloat16 __float2bfloat16(const float a) { return __nv_bfloat16(a); }
inline __nv_bfloat16 __float2bfloat16_rn(const float a) { return __nv_bfloat16(a); }
inline __nv_bfloat16 __double2bfloat16(const double a) { return __nv_bfloat16(a); }
inline float __bfloat162float(const __nv_bfloat16 a) { return float(a); }
inline __nv_bfloat16 __int2bfloat16_rn(const int i) { return __nv_bfloat16(i); }
inline int __bfloat162int_rz(const __nv_bfloat16 h) { return ::fl_sim::fp16::saturate_to_int(std::trunc(float(h))); }
inline int __bfloat162int_rn(const __nv_bfloat16 h) {
  return ::fl_sim::fp16::saturate_to_int(std::nearbyint(float(h)));
}
inline __nv_bfloat16 __ushort_as_bfloat16(const unsigned short i) {
  return ::fl_sim::fp16::from_bits<__nv_bfloat16>(i);
}
inline unsigned short __bfloat16_as_ushort(const __nv_bfloat16 h) { return h.__x; }
inline __nv_bfloat16 __short_as_bfloat16(const short i) {
  return ::fl_sim::fp16::from_bits<__nv_bfloat16>(static_cast<uint16_t>(i));
}
inline short __bfloat16_as_short(const __nv_bfloat16 h) { return static_cast<short>(h.__x); }
inline __nv_bfloat162 __floats2bfloat162_rn(const float a, const float b) {
  return __nv_bfloat162(__nv_bfloat16(a), __nv_bfloat16(b));
}
inline __nv_bfloat162 __float2bfloat162_rn(const float a) { return __nv_bfloat162(__nv_bfloat16(a), __nv_bfloat16(a)); }
inline float2 __bfloat1622float2(const __nv_bfloat162 a) { return make_float2(float(a.x), float(a.y)); }
inline __nv_bfloat162 __halves2bfloat162(const __nv_bfloat16 a, const __nv_bfloat16 b) { return __nv_bfloat162(a, b); }
inline __nv_bfloat162 make_bfloat162(const __nv_bfloat16 x, const __nv_bfloat16 y) { return __nv_bfloat162(x, y); }
inline __nv_bfloat162 __bfloat162bfloat162(const __nv_bfloat16 a) { return __nv_bfloat162(a, a); }
inline __nv_bfloat16 __low2bfloat16(const __nv_bfloat162 a) { return a.x; }
inline __nv_bfloat16 __high2bfloat16(const __nv_bfloat162 a) { return a.y; }
inline __nv_bfloat162 __lows2bfloat162(const __nv_bfloat162 a, const __nv_bfloat162 b) {
  return __nv_bfloat162(a.x, b.x);
}
inline __nv_bfloat162 __highs2bfloat162(const __nv_bfloat162 a, const __nv_bfloat162 b) {
  return __nv_bfloat162(a.y, b.y);
}
