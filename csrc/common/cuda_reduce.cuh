// Warp and block reductions of any trivially copyable value with any
// associative combine (a sum, a max, a fl::Moments merge, ...).
#pragma once

#include <cstdint>
#include <cstring>

namespace fl {

// __shfl_xor_sync of a struct, one 32-bit word at a time.
template <class T>
__device__ __forceinline__ T shfl_xor_any(const T& value, int lane_mask) {
  static_assert(sizeof(T) % 4 == 0, "shuffle needs a size that is a multiple of 4 bytes");
  constexpr int kWords = sizeof(T) / 4;
  uint32_t words[kWords];
  memcpy(words, &value, sizeof(T));
#pragma unroll
  for (int i = 0; i < kWords; ++i) words[i] = __shfl_xor_sync(0xffffffffu, words[i], lane_mask);
  T out;
  memcpy(&out, words, sizeof(T));
  return out;
}

// Reduces over the `width` lanes (a power of two <= 32) of each lane group; all lanes get the result.
template <int kWidth, class T, class Combine>
__device__ __forceinline__ T warp_allreduce(T value, Combine combine) {
#pragma unroll
  for (int mask = kWidth / 2; mask > 0; mask /= 2) value = combine(value, shfl_xor_any(value, mask));
  return value;
}

// Reduces over the whole block (blockDim.x == kThreads, a multiple of 32).
// Every thread gets the result. `scratch` holds kThreads / 32 values.
template <int kThreads, class T, class Combine>
__device__ __forceinline__ T block_allreduce(T value, Combine combine, T* scratch) {
  static_assert(kThreads % 32 == 0 && kThreads <= 1024, "block size must be a multiple of 32");
  constexpr int kWarps = kThreads / 32;
  value = warp_allreduce<32>(value, combine);
  if (kWarps == 1) return value;
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  if (lane == 0) scratch[warp] = value;
  __syncthreads();
  T total = scratch[0];
#pragma unroll
  for (int w = 1; w < kWarps; ++w) total = combine(total, scratch[w]);
  __syncthreads();  // scratch may be reused by the caller right after
  return total;
}

}  // namespace fl
