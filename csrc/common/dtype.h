// Element types a kernel can be handed, and their host-side representations.
// The codes are part of the Python <-> C++ contract (python/fastloss/_library.py).
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>

#include "common/error.h"
#include "common/host_device.h"

namespace fl {

enum class DType : int { Float32 = 0, Float16 = 1, BFloat16 = 2, Float64 = 3 };

inline const char* dtype_name(DType dtype) {
  switch (dtype) {
    case DType::Float32: return "float32";
    case DType::Float16: return "float16";
    case DType::BFloat16: return "bfloat16";
    case DType::Float64: return "float64";
  }
  return "unknown";
}

inline size_t dtype_size(DType dtype) { return dtype == DType::Float64 ? 8 : dtype == DType::Float32 ? 4 : 2; }

inline DType dtype_from_code(int code, const char* where) {
  FL_CHECK_ARG(code >= 0 && code <= 3, where, ": unknown dtype code ", code);
  return static_cast<DType>(code);
}

// 16-bit floats as stored in memory. On the host they are converted in
// software (round to nearest even); CUDA code uses __half / __nv_bfloat16,
// which have the same layout.
struct Half {
  uint16_t bits;
};
struct BFloat16 {
  uint16_t bits;
};

inline float float_from_bits(uint32_t bits) {
  float out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}
inline uint32_t bits_from_float(float value) {
  uint32_t out;
  std::memcpy(&out, &value, sizeof(out));
  return out;
}

inline float to_float(BFloat16 v) { return float_from_bits(static_cast<uint32_t>(v.bits) << 16); }

// Branch-free (a select, not a jump) so that loops storing bfloat16 vectorize.
inline BFloat16 bfloat16_from_float(float f) {
  const uint32_t bits = bits_from_float(f);
  const uint32_t rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;  // round to nearest, ties to even
  const uint32_t quiet_nan = (bits >> 16) | 0x40u;
  const bool is_nan = (bits & 0x7fffffffu) > 0x7f800000u;
  return BFloat16{static_cast<uint16_t>(is_nan ? quiet_nan : rounded)};
}

inline float to_float(Half h) {
  const uint32_t sign = (static_cast<uint32_t>(h.bits) & 0x8000u) << 16;
  uint32_t exponent = (h.bits >> 10) & 0x1fu;
  uint32_t mantissa = h.bits & 0x3ffu;
  if (exponent == 0x1f) return float_from_bits(sign | 0x7f800000u | (mantissa << 13));  // inf / nan
  if (exponent == 0) {
    if (mantissa == 0) return float_from_bits(sign);
    // subnormal half: value = mantissa * 2^-24
    const float magnitude = static_cast<float>(mantissa) * 5.9604644775390625e-8f;
    return sign ? -magnitude : magnitude;
  }
  return float_from_bits(sign | ((exponent + 112u) << 23) | (mantissa << 13));
}

inline Half half_from_float(float f) {
  const uint32_t bits = bits_from_float(f);
  const uint16_t sign = static_cast<uint16_t>((bits >> 16) & 0x8000u);
  const uint32_t abs_bits = bits & 0x7fffffffu;
  if (abs_bits > 0x7f800000u) return Half{static_cast<uint16_t>(sign | 0x7e00u)};  // nan
  if (abs_bits >= 0x477ff000u) return Half{static_cast<uint16_t>(sign | 0x7c00u)};  // overflow -> inf
  if (abs_bits < 0x38800000u) {
    // result is subnormal (or zero): round |f| / 2^-24 to nearest even integer
    const float scaled = float_from_bits(abs_bits) * 16777216.0f;
    float rounded = static_cast<float>(static_cast<uint32_t>(scaled));
    const float frac = scaled - rounded;
    const uint32_t r = static_cast<uint32_t>(rounded);
    uint32_t m = r;
    if (frac > 0.5f || (frac == 0.5f && (r & 1u))) m = r + 1;
    return Half{static_cast<uint16_t>(sign | m)};
  }
  // normal: rebias exponent, round mantissa to nearest even
  uint32_t h = ((abs_bits - 0x38000000u) >> 13);
  const uint32_t rest = abs_bits & 0x1fffu;
  if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) h += 1;
  return Half{static_cast<uint16_t>(sign | h)};
}

// Scalar <-> accumulator conversions used by the CPU kernels.
// (float and double are shared with CUDA code; cuda_numeric.cuh adds __half / __nv_bfloat16.)
FL_HD float to_acc(float v) { return v; }
FL_HD double to_acc(double v) { return v; }
inline float to_acc(Half v) { return to_float(v); }
inline float to_acc(BFloat16 v) { return to_float(v); }

template <class T>
struct StoreAs;
template <>
struct StoreAs<float> {
  static float from(float v) { return v; }
};
template <>
struct StoreAs<double> {
  static double from(double v) { return v; }
};
template <>
struct StoreAs<Half> {
  static Half from(float v) { return half_from_float(v); }
};
template <>
struct StoreAs<BFloat16> {
  static BFloat16 from(float v) { return bfloat16_from_float(v); }
};

// The accumulator type for an element type: float64 stays float64, the rest
// accumulate in float32.
template <class T>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};

template <class T>
struct TypeTag {
  using type = T;
};

// Calls fn(TypeTag<T>{}) with T the element type named by `dtype`. HalfT and
// BF16T let CUDA code use __half / __nv_bfloat16 and host code fl::Half / fl::BFloat16.
template <class HalfT, class BF16T, class Fn>
void dispatch_float_types(DType dtype, const char* where, Fn&& fn) {
  switch (dtype) {
    case DType::Float32: fn(TypeTag<float>{}); return;
    case DType::Float64: fn(TypeTag<double>{}); return;
    case DType::Float16: fn(TypeTag<HalfT>{}); return;
    case DType::BFloat16: fn(TypeTag<BF16T>{}); return;
  }
  throw_invalid_argument(where, ": unsupported dtype code ", static_cast<int>(dtype));
}

}  // namespace fl
