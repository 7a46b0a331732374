// CUDA's device math intrinsics for the simulator (host C++), with the GPU's semantics where they
// differ from libm: the fast-math functions flush subnormal inputs and results to zero like the
// .approx.ftz PTX instructions they compile to, __fdividef returns 0 for huge divisors, the
// integer intrinsics follow the PTX instructions bit for bit. The .approx functions are computed
// (nearly) correctly rounded here, inside the GPU's documented error bounds.
//
// glibc's <math.h> already declares __expf, __logf, __sinf, __sincosf, ... (internal aliases of
// expf, ..., extern "C"; defining them here would define those C symbols), so those names are macros
// that redirect to fl_sim_* functions; <math.h> and <cmath> are included first so that their
// declarations are not renamed. rsqrtf / rsqrt (C23, in newer glibc) likewise.
#pragma once

#include <math.h>

#include <cmath>
#include <cstdint>
#include <cstring>

namespace fl_sim {
namespace fastmath {

inline float ftz(float x) { return std::fpclassify(x) == FP_SUBNORMAL ? std::copysign(0.0f, x) : x; }

// ex2.approx.ftz.f32.
inline float ex2(float x) { return ftz(static_cast<float>(std::exp2(static_cast<double>(ftz(x))))); }
// lg2.approx.ftz.f32: a subnormal input is a zero, so -inf.
inline float lg2(float x) { return static_cast<float>(std::log2(static_cast<double>(ftz(x)))); }
// mul.ftz.f32.
inline float mul(float a, float b) { return ftz(ftz(a) * ftz(b)); }

template <class To, class From>
inline To bit_cast(From from) {
  static_assert(sizeof(To) == sizeof(From), "same size");
  To to;
  std::memcpy(&to, &from, sizeof(to));
  return to;
}

}  // namespace fastmath
}  // namespace fl_sim

// ---- fast-math float functions (the names glibc also declares go through macros) ----------------
inline float fl_sim_expf(float x) { return fl_sim::fastmath::ex2(fl_sim::fastmath::mul(x, 1.4426950408889634f)); }
inline float fl_sim_exp10f(float x) { return fl_sim::fastmath::ex2(fl_sim::fastmath::mul(x, 3.3219280948873622f)); }
inline float fl_sim_log2f(float x) { return fl_sim::fastmath::lg2(x); }
inline float fl_sim_logf(float x) { return fl_sim::fastmath::mul(fl_sim::fastmath::lg2(x), 0.69314718055994531f); }
inline float fl_sim_log10f(float x) { return fl_sim::fastmath::mul(fl_sim::fastmath::lg2(x), 0.30102999566398120f); }
inline float fl_sim_powf(float x, float y) {
  return fl_sim::fastmath::ex2(fl_sim::fastmath::mul(y, fl_sim::fastmath::lg2(x)));
}
// sin.approx.ftz.f32 / cos.approx.ftz.f32.
inline float fl_sim_sinf(float x) {
  return fl_sim::fastmath::ftz(static_cast<float>(std::sin(static_cast<double>(fl_sim::fastmath::ftz(x)))));
}
inline float fl_sim_cosf(float x) {
  return fl_sim::fastmath::ftz(static_cast<float>(std::cos(static_cast<double>(fl_sim::fastmath::ftz(x)))));
}

// div.approx.ftz.f32: x * rcp.approx(y). rcp of |y| in (2^126, 2^128) is subnormal, flushed to 0,
// so the quotient is 0 (NaN for an infinite x).
inline float __fdividef(float x, float y) {
  using fl_sim::fastmath::ftz;
  const float a = ftz(x), b = ftz(y);
  if (std::isfinite(b) && std::fabs(b) > 0x1p126f) return a * std::copysign(0.0f, b);
  return ftz(a / b);
}
inline float fl_sim_tanf(float x) { return __fdividef(fl_sim_sinf(x), fl_sim_cosf(x)); }

#define __expf fl_sim_expf
#define __exp10f fl_sim_exp10f
#define __log2f fl_sim_log2f
#define __logf fl_sim_logf
#define __log10f fl_sim_log10f
#define __powf fl_sim_powf
#define __sinf fl_sim_sinf
#define __cosf fl_sim_cosf
#define __tanf fl_sim_tanf

inline void fl_sim_sincosf(float x, float* s, float* c) {
  *s = fl_sim_sinf(x);
  *c = fl_sim_cosf(x);
}
#define __sincosf fl_sim_sincosf

// ---- correctly rounded float operations (IEEE, subnormals kept) -----------------------------------
// The _rn add/sub/mul are documented as never contracted into an FMA: noinline keeps a host
// compiler with FMA enabled from fusing them with the caller's arithmetic.
__attribute__((noinline)) inline float __fadd_rn(float a, float b) { return a + b; }
__attribute__((noinline)) inline float __fsub_rn(float a, float b) { return a - b; }
__attribute__((noinline)) inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __fsqrt_rn(float x) { return std::sqrt(x); }
inline float __frsqrt_rn(float x) { return static_cast<float>(1.0 / std::sqrt(static_cast<double>(x))); }
inline float fl_sim_rsqrtf(float x) { return __frsqrt_rn(x); }
inline double fl_sim_rsqrt(double x) { return 1.0 / std::sqrt(x); }
#define rsqrtf fl_sim_rsqrtf
#define rsqrt fl_sim_rsqrt
// cvt.sat: clamps to [0, 1]; NaN gives 0.
inline float __saturatef(float x) { return x > 0.0f ? (x < 1.0f ? x : 1.0f) : 0.0f; }

// ---- conversions --------------------------------------------------------------------------------
// cvt.rni / cvt.rzi: NaN gives 0, out-of-range values saturate.
inline int __float2int_rn(float x) {
  if (std::isnan(x)) return 0;
  const double r = std::nearbyint(static_cast<double>(x));
  return r >= 2147483647.0 ? 2147483647 : (r <= -2147483648.0 ? (-2147483647 - 1) : static_cast<int>(r));
}
inline int __float2int_rz(float x) {
  if (std::isnan(x)) return 0;
  const double r = std::trunc(static_cast<double>(x));
  return r >= 2147483647.0 ? 2147483647 : (r <= -2147483648.0 ? (-2147483647 - 1) : static_cast<int>(r));
}
inline float __int2float_rn(int x) { return static_cast<float>(x); }
inline float __uint2float_rn(unsigned int x) { return static_cast<float>(x); }

// ---- bit casts ----------------------------------------------------------------------------------
inline float __int_as_float(int x) { return fl_sim::fastmath::bit_cast<float>(x); }
inline int __float_as_int(float x) { return fl_sim::fastmath::bit_cast<int>(x); }
inline float __uint_as_float(unsigned int x) { return fl_sim::fastmath::bit_cast<float>(x); }
inline unsigned int __float_as_uint(float x) { return fl_sim::fastmath::bit_cast<unsigned int>(x); }
inline double __longlong_as_double(long long x) { return fl_sim::fastmath::bit_cast<double>(x); }
inline long long __double_as_longlong(double x) { return fl_sim::fastmath::bit_cast<long long>(x); }
inline int __double2hiint(double x) { return static_cast<int>(__double_as_longlong(x) >> 32); }
inline int __double2loint(double x) { return static_cast<int>(static_cast<uint32_t>(__double_as_longlong(x))); }
inline double __hiloint2double(int hi, int lo) {
  return __longlong_as_double(static_cast<long long>((static_cast<uint64_t>(static_cast<uint32_t>(hi)) << 32) |
                                                     static_cast<uint32_t>(lo)));
}

// ---- integer intrinsics -------------------------------------------------------------------------
inline int __popc(unsigned int x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned int>(x)); }
inline int __clzll(long long x) { return x == 0 ? 64 : __builtin_clzll(static_cast<unsigned long long>(x)); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline unsigned int __brev(unsigned int x) {
  unsigned int r = 0;
  for (int i = 0; i < 32; ++i, x >>= 1) r = (r << 1) | (x & 1u);
  return r;
}
inline unsigned long long __brevll(unsigned long long x) {
  return (static_cast<unsigned long long>(__brev(static_cast<unsigned int>(x))) << 32) |
         __brev(static_cast<unsigned int>(x >> 32));
}
// prmt.b32 default mode: result byte n is byte (s >> 4n) & 7 of the 8 bytes y:x (x is bytes 0-3).
inline unsigned int __byte_perm(unsigned int x, unsigned int y, unsigned int s) {
  const uint64_t bytes = (static_cast<uint64_t>(y) << 32) | x;
  unsigned int r = 0;
  for (int n = 0; n < 4; ++n) r |= static_cast<unsigned int>((bytes >> (8 * ((s >> (4 * n)) & 7u))) & 0xffu) << (8 * n);
  return r;
}
// shf.l / shf.r on hi:lo; the plain forms wrap the shift (& 31), the c forms clamp it to 32.
inline unsigned int __funnelshift_l(unsigned int lo, unsigned int hi, unsigned int shift) {
  const uint64_t v = (static_cast<uint64_t>(hi) << 32) | lo;
  return static_cast<unsigned int>((v << (shift & 31u)) >> 32);
}
inline unsigned int __funnelshift_lc(unsigned int lo, unsigned int hi, unsigned int shift) {
  const uint64_t v = (static_cast<uint64_t>(hi) << 32) | lo;
  return static_cast<unsigned int>((v << (shift < 32u ? shift : 32u)) >> 32);
}
inline unsigned int __funnelshift_r(unsigned int lo, unsigned int hi, unsigned int shift) {
  const uint64_t v = (static_cast<uint64_t>(hi) << 32) | lo;
  return static_cast<unsigned int>(v >> (shift & 31u));
}
inline unsigned int __funnelshift_rc(unsigned int lo, unsigned int hi, unsigned int shift) {
  const uint64_t v = (static_cast<uint64_t>(hi) << 32) | lo;
  return static_cast<unsigned int>(v >> (shift < 32u ? shift : 32u));
}
inline unsigned int __umulhi(unsigned int x, unsigned int y) {
  return static_cast<unsigned int>((static_cast<uint64_t>(x) * y) >> 32);
}
inline int __mulhi(int x, int y) { return static_cast<int>((static_cast<int64_t>(x) * y) >> 32); }
inline unsigned long long __umul64hi(unsigned long long x, unsigned long long y) {
  return static_cast<unsigned long long>((static_cast<unsigned __int128>(x) * y) >> 64);
}
inline long long __mul64hi(long long x, long long y) {
  return static_cast<long long>((static_cast<__int128>(x) * y) >> 64);
}
// mul24.lo: the low 32 bits of the product of the operands' low 24 bits (signed: sign-extended).
inline int __mul24(int x, int y) {
  const int32_t xs = static_cast<int32_t>(static_cast<uint32_t>(x) << 8) >> 8;
  const int32_t ys = static_cast<int32_t>(static_cast<uint32_t>(y) << 8) >> 8;
  return static_cast<int>(static_cast<uint32_t>(static_cast<int64_t>(xs) * ys));
}
inline unsigned int __umul24(unsigned int x, unsigned int y) {
  return static_cast<unsigned int>(static_cast<uint64_t>(x & 0xffffffu) * (y & 0xffffffu));
}

// ---- min / max --------------------------------------------------------------------------------------
// CUDA declares these in the global namespace for device code that calls min/max unqualified;
// std::min / std::max are untouched (and preferred by `using std::min` in a scope). Mixed
// signed/unsigned pairs compare as unsigned, as CUDA's overloads do.
#define FL_SIM_MIN_MAX(A, B, R)                                               \
  inline R min(A a, B b) { return static_cast<R>(a) < static_cast<R>(b) ? static_cast<R>(a) : static_cast<R>(b); } \
  inline R max(A a, B b) { return static_cast<R>(a) > static_cast<R>(b) ? static_cast<R>(a) : static_cast<R>(b); }
FL_SIM_MIN_MAX(int, int, int)
FL_SIM_MIN_MAX(unsigned int, unsigned int, unsigned int)
FL_SIM_MIN_MAX(int, unsigned int, unsigned int)
FL_SIM_MIN_MAX(unsigned int, int, unsigned int)
FL_SIM_MIN_MAX(long, long, long)
FL_SIM_MIN_MAX(unsigned long, unsigned long, unsigned long)
FL_SIM_MIN_MAX(long, unsigned long, unsigned long)
FL_SIM_MIN_MAX(unsigned long, long, unsigned long)
FL_SIM_MIN_MAX(long long, long long, long long)
FL_SIM_MIN_MAX(unsigned long long, unsigned long long, unsigned long long)
FL_SIM_MIN_MAX(long long, unsigned long long, unsigned long long)
FL_SIM_MIN_MAX(unsigned long long, long long, unsigned long long)
#undef FL_SIM_MIN_MAX
// fminf / fmaxf semantics (a NaN operand gives the other one), like CUDA's float overloads.
inline float min(float a, float b) { return std::fmin(a, b); }
inline float max(float a, float b) { return std::fmax(a, b); }
inline double min(double a, double b) { return std::fmin(a, b); }
inline double max(double a, double b) { return std::fmax(a, b); }
inline double min(float a, double b) { return std::fmin(static_cast<double>(a), b); }
inline double max(float a, double b) { return std::fmax(static_cast<double>(a), b); }
inline double min(double a, float b) { return std::fmin(a, static_cast<double>(b)); }
inline double max(double a, float b) { return std::fmax(a, static_cast<double>(b)); }

// ---- read-only cache load -----------------------------------------------------------------------
template <class T>
inline T __ldg(const T* p) {
  return *p;
}
