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
