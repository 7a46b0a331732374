// CUDA's built-in vector types for the simulator (host C++): the ones the project's kernels use,
// with CUDA's alignments, because kernels reinterpret memory as uint4 / float2 and rely on
// 8- and 16-byte vector accesses being aligned like on the GPU.
//
// FL_SIM_HAVE_FLOAT2 guards the whole set: the simulator core may define the types itself (and
// the macro) before this header; defined here, it also tells test code that it runs simulated.
#pragma once

#ifndef FL_SIM_HAVE_FLOAT2
#define FL_SIM_HAVE_FLOAT2 1

struct alignas(8) float2 {
  float x, y;
};
struct alignas(16) float4 {
  float x, y, z, w;
};
struct alignas(8) int2 {
  int x, y;
};
struct alignas(16) int4 {
  int x, y, z, w;
};
struct alignas(8) uint2 {
  unsigned int x, y;
};
struct alignas(16) uint4 {
  unsigned int x, y, z, w;
};
struct alignas(16) double2 {
  double x, y;
};

inline float2 make_float2(float x, float y) { return float2{x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }
inline int2 make_int2(int x, int y) { return int2{x, y}; }
inline int4 make_int4(int x, int y, int z, int w) { return int4{x, y, z, w}; }
inline uint2 make_uint2(unsigned int x, unsigned int y) { return uint2{x, y}; }
inline uint4 make_uint4(unsigned int x, unsigned int y, unsigned int z, unsigned int w) { return uint4{x, y, z, w}; }
inline double2 make_double2(double x, double y) { return double2{x, y}; }

#endif  // FL_SIM_HAVE_FLOAT2
