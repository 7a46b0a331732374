// A small dense product for CPU tile loops: C (rows x cols) = or += A (rows x depth) * B (depth x cols),
// all row-major with leading dimensions. Register blocks of 4 rows x 16 columns keep 64 accumulators
// in vector registers while A's four values are broadcast and B's row is streamed. Inline, so a
// caller marked FL_CPU_MULTIVERSION gets it in AVX2 + FMA.
#pragma once

#include <algorithm>
#include <cstdint>

#include "common/cpu_multiversion.h"

namespace fl {

template <class T>
FL_CPU_INLINE void tile_gemm(int64_t rows, int64_t cols, int64_t depth, const T* a, int64_t lda, const T* b, int64_t ldb,
                      T* c, int64_t ldc, bool accumulate) {
  constexpr int kR = 4, kC = 16;
  for (int64_t r0 = 0; r0 < rows; r0 += kR) {
    const int nr = static_cast<int>(std::min<int64_t>(kR, rows - r0));
    for (int64_t c0 = 0; c0 < cols; c0 += kC) {
      const int nc = static_cast<int>(std::min<int64_t>(kC, cols - c0));
      T block[kR][kC];
      for (int i = 0; i < kR; ++i)
        for (int j = 0; j < kC; ++j)
          block[i][j] = (accumulate && i < nr && j < nc) ? c[(r0 + i) * ldc + c0 + j] : T(0);
      if (nr == kR && nc == kC) {
        const T* a0 = a + r0 * lda;
        for (int64_t t = 0; t < depth; ++t) {
          const T x0 = a0[t], x1 = a0[lda + t], x2 = a0[2 * lda + t], x3 = a0[3 * lda + t];
          const T* brow = b + t * ldb + c0;
#pragma omp simd
          for (int j = 0; j < kC; ++j) {
            block[0][j] += x0 * brow[j];
            block[1][j] += x1 * brow[j];
            block[2][j] += x2 * brow[j];
            block[3][j] += x3 * brow[j];
          }
        }
      } else {  // edge block
        for (int64_t t = 0; t < depth; ++t) {
          const T* brow = b + t * ldb + c0;
          for (int i = 0; i < nr; ++i) {
            const T x = a[(r0 + i) * lda + t];
            for (int j = 0; j < nc; ++j) block[i][j] += x * brow[j];
          }
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
