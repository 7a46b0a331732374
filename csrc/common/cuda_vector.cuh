// Reading (and transforming) a contiguous range of elements with 16-byte
// accesses: a scalar head up to the first 16-byte boundary, the vectorized
// middle with four loads in flight per lane, a scalar tail. Lanes are any
// group of threads (a warp, a block) that share the range.
#pragma once

#include <cstdint>
#include <cstring>

namespace fl {

template <class T>
struct Vec16 {
  static constexpr int kElems = 16 / sizeof(T);
};

template <class T>
__device__ __forceinline__ int64_t elements_to_16b_boundary(const T* p, int64_t begin, int64_t end) {
  const uintptr_t address = reinterpret_cast<uintptr_t>(p + begin);
  const int64_t misaligned = static_cast<int64_t>((address % 16) / sizeof(T));
  const int64_t head = misaligned ? Vec16<T>::kElems - misaligned : 0;
  return head < end - begin ? head : end - begin;
}

// fn(index, value) for every element index in [begin, end) owned by `lane`.
template <class T, class Fn>
__device__ __forceinline__ void for_each_element(const T* __restrict__ p, int64_t begin, int64_t end, int lane,
                                                 int lanes, Fn&& fn) {
  constexpr int kVec = Vec16<T>::kElems;
  constexpr int kUnroll = 4;
  const int64_t head = elements_to_16b_boundary(p, begin, end);
  for (int64_t i = begin + lane; i < begin + head; i += lanes) fn(i, p[i]);
  const int64_t body_begin = begin + head;
  const int64_t vectors = (end - body_begin) / kVec;
  const uint4* pv = reinterpret_cast<const uint4*>(p + body_begin);
  int64_t v = lane;
  for (; v + (kUnroll - 1) * lanes < vectors; v += kUnroll * lanes) {
    uint4 raw[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) raw[u] = pv[v + u * lanes];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      T values[kVec];
      memcpy(values, &raw[u], sizeof(values));
      const int64_t first = body_begin + (v + u * lanes) * kVec;
#pragma unroll
      for (int e = 0; e < kVec; ++e) fn(first + e, values[e]);
    }
  }
  for (; v < vectors; v += lanes) {
    const uint4 raw = pv[v];
    T values[kVec];
    memcpy(values, &raw, sizeof(values));
    const int64_t first = body_begin + v * kVec;
#pragma unroll
    for (int e = 0; e < kVec; ++e) fn(first + e, values[e]);
  }
  for (int64_t i = body_begin + vectors * kVec + lane; i < end; i += lanes) fn(i, p[i]);
}

// out[i] = fn(i, in[i]) for i in [begin, end) owned by `lane`. Vectorized when
// `in` and `out` sit at the same offset from a 16-byte boundary, scalar otherwise.
template <class T, class Fn>
__device__ __forceinline__ void transform_elements(const T* __restrict__ in, T* __restrict__ out, int64_t begin,
                                                   int64_t end, int lane, int lanes, Fn&& fn) {
  constexpr int kVec = Vec16<T>::kElems;
  const bool same_alignment = (reinterpret_cast<uintptr_t>(in + begin) % 16) == (reinterpret_cast<uintptr_t>(out + begin) % 16);
  const int64_t head = same_alignment ? elements_to_16b_boundary(in, begin, end) : end - begin;
  for (int64_t i = begin + lane; i < begin + head; i += lanes) out[i] = fn(i, in[i]);
  const int64_t body_begin = begin + head;
  const int64_t vectors = (end - body_begin) / kVec;
  const uint4* in_v = reinterpret_cast<const uint4*>(in + body_begin);
  uint4* out_v = reinterpret_cast<uint4*>(out + body_begin);
  for (int64_t v = lane; v < vectors; v += lanes) {
    const uint4 raw = in_v[v];
    T values[kVec];
    memcpy(values, &raw, sizeof(values));
    const int64_t first = body_begin + v * kVec;
#pragma unroll
    for (int e = 0; e < kVec; ++e) values[e] = fn(first + e, values[e]);
    uint4 packed;
    memcpy(&packed, values, sizeof(values));
    out_v[v] = packed;
  }
  for (int64_t i = body_begin + vectors * kVec + lane; i < end; i += lanes) out[i] = fn(i, in[i]);
}

}  // namespace fl
