// Element loads/stores for CUDA kernels: every storage type converts to its
// accumulator (float, or double for double) and back.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "common/dtype.h"

namespace fl {

__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

// The CUDA type of a storage type: fl::Half and fl::BFloat16 (host layouts) are __half and
// __nv_bfloat16 in kernels; float and double are themselves.
template <class T>
struct DeviceType {
  using type = T;
};
template <>
struct DeviceType<Half> {
  using type = __half;
};
template <>
struct DeviceType<BFloat16> {
  using type = __nv_bfloat16;
};

template <class T>
struct CudaStore;
template <>
struct CudaStore<float> {
  __device__ __forceinline__ static float from(float v) { return v; }
};
template <>
struct CudaStore<double> {
  __device__ __forceinline__ static double from(double v) { return v; }
};
template <>
struct CudaStore<__half> {
  __device__ __forceinline__ static __half from(float v) { return __float2half_rn(v); }
};
template <>
struct CudaStore<__nv_bfloat16> {
  __device__ __forceinline__ static __nv_bfloat16 from(float v) { return __float2bfloat16_rn(v); }
};

}  // namespace fl
