// A small dense product for CPU tile loops: C (rows x cols) = or += A (rows x depth) * B (depth x cols),
// all row-major with leading dimensions. Register blocks of 4 rows x 2 vectors (16 floats or 8
// doubles): 8 accumulators, each step broadcasts A's four values and loads B's two vectors. The
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

template <class T>
FL_CPU_INLINE void tile_gemm(int64_t rows, int64_t cols, int64_t depth, const T* a, int64_t lda, const T* b, int64_t ldb,
                             T* c, int64_t ldc, bool accumulate) {
  using V = typename Vec32<T>::type;
  constexpr int kW = Vec32<T>::kLanes;
  constexpr int kR = 4, kC = 2 * kW;
  // Column panels outside, row groups inside: a panel of B (depth x 16) is loaded once into L1 and
  // reused by every 4-row group of A (the other order streamed all of B once per row group).
  for (int64_t c0 = 0; c0 < cols; c0 += kC) {
    const int nc = static_cast<int>(std::min<int64_t>(kC, cols - c0));
    for (int64_t r0 = 0; r0 < rows; r0 += kR) {
      const int nr = static_cast<int>(std::min<int64_t>(kR, rows - r0));
      if (nr == kR && nc == kC) {
        V acc[kR][2];
        for (int i = 0; i < kR; ++i)
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
          for (int i = 0; i < kR; ++i) {
            const T x = a0[i * lda + t];
            acc[i][0] += x * b0;
            acc[i][1] += x * b1;
          }
        }
        for (int i = 0; i < kR; ++i)
          for (int h = 0; h < 2; ++h) std::memcpy(c + (r0 + i) * ldc + c0 + h * kW, &acc[i][h], sizeof(V));
      } else {  // edge block
        T block[kR][kC];
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
}

// dst (cols x rows, ld_dst) = src (rows x cols, ld_src) transposed.
template <class T>
FL_CPU_INLINE void tile_transpose(int64_t rows, int64_t cols, const T* src, int64_t ld_src, T* dst, int64_t ld_dst) {
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j) dst[j * ld_dst + i] = src[i * ld_src + j];
}

}  // namespace fl
