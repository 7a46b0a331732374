// Qualifiers for math shared by the CPU and the CUDA kernels. A function marked
// FL_HD compiles for both sides under nvcc and as a plain inline function under
// the host compiler, so the CPU path that CI runs is the same code as the GPU path.
#pragma once

#if defined(__CUDACC__)
#define FL_HD __host__ __device__ __forceinline__
#define FL_DEVICE __device__ __forceinline__
#else
#define FL_HD inline
#endif

// FL_HD_INLINE: FL_HD that the host compiler inlines too, always. For per-element math called inside
// the CPU hot loops (FL_CPU_MULTIVERSION functions): a call left out of line would be compiled for
// the baseline instruction set while its caller runs AVX2 (see cpu_multiversion.h).
#if defined(__CUDACC__)
#define FL_HD_INLINE __host__ __device__ __forceinline__
#elif defined(__GNUC__)
#define FL_HD_INLINE inline __attribute__((always_inline))
#else
#define FL_HD_INLINE inline
#endif
