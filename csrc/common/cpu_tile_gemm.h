// A small dense product for CPU tile loops: C (rows x cols) = or += A (rows x depth) * B (depth x cols),
// all row-major with leading dimensions. Register blocks of up to 6 rows x 2 vectors (16 floats or 8
// doubles): each step broadcasts A's values and loads B's two vectors. The
// accumulators are GCC vector-extension values, so they stay in registers (an array of scalars
// under `omp simd` was kept on the stack by GCC 12 once it unrolled the loop: 2.5x slower).
// Always inlined, so a caller marked FL_CPU_MULTIVERSION gets it in AVX2 + FMA.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "common/cpu_multiversion.h"

namespace fl {

template <class T>
struct Vec32 {
  typedef T type __attribute__((vector_size(32)));
  static constexpr int kLanes = 32 / sizeof(T);
};

// One register block: rows [r0, r0 + R) x the 2 vectors of columns at c0, over the whole depth.
template <int R, class T>
FL_CPU_INLINE void gemm_block(int64_t r0, int64_t c0, int64_t depth, const T* a, int64_t lda, const T* b,
                              int64_t ldb, T* c, int64_t ldc, bool accumulate) {
  using V = typename Vec32<T>::type;
  constexpr int kW = Vec32<T>::kLanes;
  V acc[R][2];
  for (int i = 0; i < R; ++i)
    for (int h = 0; h < 2; ++h) {
      if (accumulate) std::memcpy(&acc[i][h], c + (r0 + i) * ldc + c0 + h * kW, sizeof(V));
      else acc[i][h] = V{};
    }
  const T* a0 = a + r0 * lda;
  const T* brow = b + c0;
  for (int64_t t = 0; t < depth; ++t, brow += ldb) {
    V b0, b1;
    std::memcpy(&b0, brow, sizeof(V));
    std::memcpy(&b1, brow + kW, sizeof(V));
    for (int i = 0; i < R; ++i) {
      const T x = a0[i * lda + t];
      acc[i][0] += x * b0;
      acc[i][1] += x * b1;
    }
  }
  for (int i = 0; i < R; ++i)
    for (int h = 0; h < 2; ++h) std::memcpy(c + (r0 + i) * ldc + c0 + h * kW, &acc[i][h], sizeof(V));
}

template <class T>
FL_CPU_INLINE void tile_gemm(int64_t rows, int64_t cols, int64_t depth, const T* a, int64_t lda, const T* b, int64_t ldb,
                             T* c, int64_t ldc, bool accumulate) {
  constexpr int kC = 2 * Vec32<T>::kLanes;
  // Column panels outside, row groups inside: a panel of B (depth x 2 vectors) is loaded once into
  // L1 and reused by every row group of A. Row groups of 6 (12 accumulators: enough independent FMAs
  // to cover their latency), then 4, 3, 2, 1 for the remainder.
  for (int64_t c0 = 0; c0 < cols; c0 += kC) {
    const int nc = static_cast<int>(std::min<int64_t>(kC, cols - c0));
    if (nc == kC) {
      int64_t r0 = 0;
      for (; r0 + 6 <= rows; r0 += 6) gemm_block<6>(r0, c0, depth, a, lda, b, ldb, c, ldc, accumulate);
      for (; r0 + 4 <= rows; r0 += 4) gemm_block<4>(r0, c0, depth, a, lda, b, ldb, c, ldc, accumulate);
      switch (rows - r0) {
        case 3: gemm_block<3>(r0, c0, depth, a, lda, b, ldb, c, ldc, accumulate); break;
        case 2: gemm_block<2>(r0, c0, depth, a, lda, b, ldb, c, ldc, accumulate); break;
        case 1: gemm_block<1>(r0, c0, depth, a, lda, b, ldb, c, ldc, accumulate); break;
        default: break;
      }
      continue;
    }
    for (int64_t r0 = 0; r0 < rows; r0 += 4) {  // edge columns
      const int nr = static_cast<int>(std::min<int64_t>(4, rows - r0));
      T block[4][kC];
      for (int i = 0; i < nr; ++i)
        for (int j = 0; j < nc; ++j) block[i][j] = accumulate ? c[(r0 + i) * ldc + c0 + j] : T(0);
      for (int64_t t = 0; t < depth; ++t) {
        const T* brow = b + t * ldb + c0;
        for (int i = 0; i < nr; ++i) {
          const T x = a[(r0 + i) * lda + t];
          for (int j = 0; j < nc; ++j) block[i][j] += x * brow[j];
        }
      }
      for (int i = 0; i < nr; ++i)
        for (int j = 0; j < nc; ++j) c[(r0 + i) * ldc + c0 + j] = block[i][j];
    }
  }
}

// dst (cols x rows, ld_dst) = src (rows x cols, ld_src) transposed.
template <class T>
FL_CPU_INLINE void tile_transpose(int64_t rows, int64_t cols, const T* src, int64_t ld_src, T* dst, int64_t ld_dst) {
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j) dst[j * ld_dst + i] = src[i * ld_src + j];
}

}  // namespace fl
