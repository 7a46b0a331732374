// CPU access to a Geometry from either side: "destination" rows (the side a reduction produces one
// value per element for) against "source" columns (the side it reduces over). transpose = true swaps
// the roles of x and y (and reads the cost matrix by columns). Row tiles of kRowTile destinations
// share each pass over a chunk of kChunk sources, so the source chunk is read once per tile.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "common/dtype.h"
#include "ot/ot_kernels.h"
#include "ot/ot_math.h"

namespace fl::ot::cpu {

constexpr int64_t kChunk = 256;
constexpr int kRowTile = 4;

template <class T, class Acc>
struct SideView {
  const Geometry& g;
  bool transpose;
  int64_t len_dst, len_src;
  // Points: the source points of every problem transposed to (dim, len_src), and squared norms.
  std::vector<Acc> src_t, src_sq, dst_sq;

  SideView(const Geometry& geom, bool transpose_)
      : g(geom), transpose(transpose_), len_dst(transpose_ ? geom.m : geom.n), len_src(transpose_ ? geom.n : geom.m) {
    if (g.p == 0) return;
    const int64_t d = g.dim;
    src_t.resize(static_cast<size_t>(g.batch * d * len_src));
    src_sq.resize(static_cast<size_t>(g.batch * len_src));
    dst_sq.resize(static_cast<size_t>(g.batch * len_dst));
    for (int64_t b = 0; b < g.batch; ++b) {
      const Acc* src = src_points(b);
      for (int64_t j = 0; j < len_src; ++j) {
        Acc sq = 0;
        for (int64_t k = 0; k < d; ++k) {
          const Acc v = src[j * d + k];
          src_t[(b * d + k) * len_src + j] = v;
          sq += v * v;
        }
        src_sq[b * len_src + j] = sq;
      }
      const Acc* dst = dst_points(b);
      for (int64_t i = 0; i < len_dst; ++i) {
        Acc sq = 0;
        for (int64_t k = 0; k < d; ++k) sq += dst[i * d + k] * dst[i * d + k];
        dst_sq[b * len_dst + i] = sq;
      }
    }
  }

  const Acc* dst_points(int64_t b) const {
    const Acc* base = static_cast<const Acc*>(transpose ? g.y : g.x);
    return base + b * len_dst * g.dim;
  }
  const Acc* src_points(int64_t b) const {
    const Acc* base = static_cast<const Acc*>(transpose ? g.x : g.y);
    return base + b * len_src * g.dim;
  }

  // cost[r][t] = c(dst row0 + r, src j0 + t) for r < rows, t < count.
  void fill_costs(int64_t b, int64_t row0, int rows, int64_t j0, int64_t count, Acc (*cost)[kChunk]) const {
    if (g.p == 0) {
      const T* c = static_cast<const T*>(g.cost) + b * g.n * g.m;
      for (int r = 0; r < rows; ++r) {
        const int64_t i = row0 + r;
        if (!transpose) {
          const T* row = c + i * g.m + j0;
#pragma omp simd
          for (int64_t t = 0; t < count; ++t) cost[r][t] = to_acc(row[t]);
        } else {
          for (int64_t t = 0; t < count; ++t) cost[r][t] = to_acc(c[(j0 + t) * g.m + i]);
        }
      }
      return;
    }
    const int64_t d = g.dim;
    const Acc* dst = dst_points(b);
    const Acc* srct = src_t.data() + b * d * len_src + j0;
    // Register blocking: 4 rows x 8 sources accumulate over all of d in registers, so each source value
    // loaded serves 4 rows and nothing is stored until the sums are done. Missing rows of a short tile
    // repeat the last row (computed, never written).
    static_assert(kRowTile == 4, "the micro-kernel below is written for 4 rows");
    const Acc* x_row[4];
    for (int r = 0; r < 4; ++r) x_row[r] = dst + (row0 + std::min(r, rows - 1)) * d;
    // 16 lanes: two AVX2 vectors of sources, so 8 FMAs share one broadcast of each row's x_k.
    constexpr int64_t kLanes = 16;
    int64_t t0 = 0;
    for (; t0 + kLanes <= count; t0 += kLanes) {
      Acc a0[kLanes] = {}, a1[kLanes] = {}, a2[kLanes] = {}, a3[kLanes] = {};
      const Acc* yk = srct + t0;
      for (int64_t k = 0; k < d; ++k, yk += len_src) {
        const Acc c0 = x_row[0][k], c1 = x_row[1][k], c2 = x_row[2][k], c3 = x_row[3][k];
#pragma omp simd
        for (int64_t t = 0; t < kLanes; ++t) {
          a0[t] += c0 * yk[t];
          a1[t] += c1 * yk[t];
          a2[t] += c2 * yk[t];
          a3[t] += c3 * yk[t];
        }
      }
      const Acc* sums[4] = {a0, a1, a2, a3};
      for (int r = 0; r < rows; ++r)
        for (int64_t t = 0; t < kLanes; ++t) cost[r][t0 + t] = sums[r][t];
    }
    for (int r = 0; r < rows; ++r) {
      for (int64_t t = t0; t < count; ++t) {
        Acc sum = 0;
        for (int64_t k = 0; k < d; ++k) sum += x_row[r][k] * srct[k * len_src + t];
        cost[r][t] = sum;
      }
    }
    const Acc* ysq = src_sq.data() + b * len_src + j0;
    const int p = g.p;
    for (int r = 0; r < rows; ++r) {
      Acc* out = cost[r];
      const Acc xsq = dst_sq[b * len_dst + row0 + r];
#pragma omp simd
      for (int64_t t = 0; t < count; ++t) out[t] = point_cost<Acc>(p, xsq, ysq[t], out[t]);
    }
  }
};

// Column-block access for the cost matrix read by columns (transpose with p = 0): a row-major pass
// over a (rows x width) block is cache-friendly where fill_costs' column reads are not.
template <class T>
const T* cost_matrix(const Geometry& g, int64_t b) {
  return static_cast<const T*>(g.cost) + b * g.n * g.m;
}

}  // namespace fl::ot::cpu
