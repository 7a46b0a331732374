// CUDA kernels of the Sinkhorn family. Included by sinkhorn_cuda.cu only.
//   dense rows:    one warp per row of the cost matrix, coalesced along the row.
//   dense columns: blocks of 32 columns x 8 row groups, coalesced along the rows, merged in shared memory.
//   points:        64 x 64 tiles (32 x 32 in float64) of 16 x 16 threads, each thread a 4 x 4 (2 x 2)
//                  micro-tile of dot products staged through shared memory in chunks of 16 dimensions
//                  (the SGEMM scheme), then the costs and a per-row running log-sum-exp.
// Every kernel skips problems whose done_at is in [0, iteration).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "common/cuda_numeric.cuh"
#include "common/cuda_reduce.cuh"
#include "ot/ot_kernels.h"
#include "ot/ot_math.h"

namespace fl::ot::cuda {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kColTile = 32;  // dense column kernel: columns per block
constexpr int kColGroups = kThreads / kColTile;
constexpr int kDimChunk = 16;  // points: dimensions per shared-memory stage

template <class Acc>
constexpr int tile_per_thread() {
  return sizeof(Acc) == 8 ? 2 : 4;
}

template <class Acc>
__device__ __forceinline__ Acc neg_inf() {
  return -static_cast<Acc>(INFINITY);
}

__device__ __forceinline__ bool is_skipped(const int32_t* done_at, int64_t b, int32_t iteration) {
  return done_at != nullptr && done_at[b] >= 0 && done_at[b] < iteration;
}

// h / eps + log w, -inf for zero mass, NaN for NaN input (scaled_potential_entry, ot_math.h).
template <class Acc>
__device__ __forceinline__ Acc scaled(const Acc* h, const Acc* log_w, int64_t index, Acc inv_eps) {
  return scaled_potential_entry<Acc>(h[index], log_w[index], inv_eps);
}

template <class Acc>
__device__ __forceinline__ LogSumExp<Acc> shfl_merge(LogSumExp<Acc> v, int lane_mask) {
  const Acc other_max = __shfl_xor_sync(0xffffffffu, v.max, lane_mask);
  const Acc other_sum = __shfl_xor_sync(0xffffffffu, v.sum, lane_mask);
  v.merge(other_max, other_sum);
  return v;
}

// The geometry as a kernel sees it from one side: destinations (one output each) against sources
// (reduced over); transpose swaps x and y. The cost matrix keeps its (n, m) layout.
template <class T, class Acc>
struct OrientedGeometry {
  const T* cost;           // dense: (batch, n, m)
  const Acc* dst_points;   // points: (batch, len_dst, dim)
  const Acc* src_points;   // points: (batch, len_src, dim)
  int64_t len_dst, len_src, dim, n, m;
  int p;
};

template <class T, class Acc>
OrientedGeometry<T, Acc> orient(const Geometry& g, bool transpose) {
  OrientedGeometry<T, Acc> o;
  o.cost = static_cast<const T*>(g.cost);
  o.dst_points = static_cast<const Acc*>(transpose ? g.y : g.x);
  o.src_points = static_cast<const Acc*>(transpose ? g.x : g.y);
  o.len_dst = transpose ? g.m : g.n;
  o.len_src = transpose ? g.n : g.m;
  o.dim = g.dim;
  o.n = g.n;
  o.m = g.m;
  o.p = g.p;
  return o;
}

// What a softmin kernel reads and writes, in device types.
template <class T, class Acc>
struct SoftminParams : OrientedGeometry<T, Acc> {
  const Acc* h;
  const Acc* log_w;
  Acc* out;
  const Acc* old;
  const Acc* log_w_dst;
  Acc* row_err;
  const int32_t* done_at;
  int32_t iteration;
  Acc eps, inv_eps, damping;
};

template <class T, class Acc>
__device__ __forceinline__ void write_softmin(const SoftminParams<T, Acc>& p, int64_t index, Acc lse) {
  const Acc value = p.damping * (-p.eps * lse);
  if (p.row_err != nullptr) p.row_err[index] = row_error<Acc>(p.log_w_dst[index], p.old[index], value, p.inv_eps);
  p.out[index] = value;
}

template <class T, class Acc>
__global__ void __launch_bounds__(kThreads) dense_rows_softmin_kernel(SoftminParams<T, Acc> p) {
  const int64_t b = blockIdx.y;
  if (is_skipped(p.done_at, b, p.iteration)) return;
  const int lane = threadIdx.x % 32;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (row >= p.n) return;  // a whole warp leaves together
  const T* c = p.cost + (b * p.n + row) * p.m;
  const Acc* h = p.h + b * p.m;
  const Acc* lw = p.log_w + b * p.m;
  LogSumExp<Acc> acc = LogSumExp<Acc>::empty();
  for (int64_t j = lane; j < p.m; j += 32)
    acc.add(pair_exponent<Acc>(scaled(h, lw, j, p.inv_eps), to_acc(c[j]) * p.inv_eps));
#pragma unroll
  for (int mask = 16; mask > 0; mask /= 2) acc = shfl_merge(acc, mask);
  if (lane == 0) write_softmin(p, b * p.n + row, acc.value());
}

template <class T, class Acc>
__global__ void __launch_bounds__(kThreads) dense_cols_softmin_kernel(SoftminParams<T, Acc> p) {
  __shared__ Acc shared_max[kColGroups][kColTile];
  __shared__ Acc shared_sum[kColGroups][kColTile];
  const int64_t b = blockIdx.y;
  if (is_skipped(p.done_at, b, p.iteration)) return;
  const int tx = threadIdx.x % kColTile, ty = threadIdx.x / kColTile;
  const int64_t col = static_cast<int64_t>(blockIdx.x) * kColTile + tx;
  const T* c = p.cost + b * p.n * p.m;
  const Acc* h = p.h + b * p.n;
  const Acc* lw = p.log_w + b * p.n;
  LogSumExp<Acc> acc = LogSumExp<Acc>::empty();
  if (col < p.m) {
    for (int64_t i = ty; i < p.n; i += kColGroups)
      acc.add(pair_exponent<Acc>(scaled(h, lw, i, p.inv_eps), to_acc(c[i * p.m + col]) * p.inv_eps));
  }
  shared_max[ty][tx] = acc.max;
  shared_sum[ty][tx] = acc.sum;
  __syncthreads();
  if (ty == 0 && col < p.m) {
    for (int group = 1; group < kColGroups; ++group) acc.merge(shared_max[group][tx], shared_sum[group][tx]);
    write_softmin(p, b * p.m + col, acc.value());
  }
}

// Row stride of the staged point tiles: one word of padding, so that the 16 dimensions of a point
// written by neighbouring threads land in 16 different banks.
template <int TM>
constexpr int staged_stride() {
  return 16 * TM + 1;
}

// dot[ii][jj] = x_(row0 + ty*TM + ii) . y_(col0 + tx*TM + jj) and the squared norms of those points,
// over all dimensions in chunks of kDimChunk staged in shared memory (xs, ys: kDimChunk rows of
// staged_stride<TM>()). Out-of-range points read as 0; a last chunk shorter than kDimChunk (d = 3)
// only runs its own dimensions. Every thread of the block must call it (it synchronizes).
template <class Acc, int TM>
__device__ __forceinline__ void dot_tile(const Acc* x, int64_t len_x, int64_t row0, const Acc* y, int64_t len_y,
                                         int64_t col0, int64_t dim, Acc (&dot)[TM][TM], Acc (&x_sq)[TM],
                                         Acc (&y_sq)[TM], Acc* xs, Acc* ys) {
  constexpr int kTile = 16 * TM;
  constexpr int kStride = staged_stride<TM>();
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
#pragma unroll
  for (int ii = 0; ii < TM; ++ii) {
    x_sq[ii] = 0;
    y_sq[ii] = 0;
#pragma unroll
    for (int jj = 0; jj < TM; ++jj) dot[ii][jj] = 0;
  }
  for (int64_t k0 = 0; k0 < dim; k0 += kDimChunk) {
    for (int e = threadIdx.x; e < kTile * kDimChunk; e += kThreads) {
      const int r = e / kDimChunk, k = e % kDimChunk;
      const int64_t gk = k0 + k;
      const int64_t gx = row0 + r, gy = col0 + r;
      xs[k * kStride + r] = (gx < len_x && gk < dim) ? x[gx * dim + gk] : Acc(0);
      ys[k * kStride + r] = (gy < len_y && gk < dim) ? y[gy * dim + gk] : Acc(0);
    }
    __syncthreads();
    const int chunk = dim - k0 < kDimChunk ? static_cast<int>(dim - k0) : kDimChunk;  // block-uniform
#pragma unroll 4
    for (int k = 0; k < chunk; ++k) {
      Acc xv[TM], yv[TM];
#pragma unroll
      for (int ii = 0; ii < TM; ++ii) xv[ii] = xs[k * kStride + ty * TM + ii];
#pragma unroll
      for (int jj = 0; jj < TM; ++jj) yv[jj] = ys[k * kStride + tx * TM + jj];
#pragma unroll
      for (int ii = 0; ii < TM; ++ii) {
        x_sq[ii] += xv[ii] * xv[ii];
        y_sq[ii] += yv[ii] * yv[ii];
#pragma unroll
        for (int jj = 0; jj < TM; ++jj) dot[ii][jj] += xv[ii] * yv[jj];
      }
    }
    __syncthreads();
  }
}

template <class Acc>
__global__ void __launch_bounds__(kThreads) points_softmin_kernel(SoftminParams<Acc, Acc> p) {
  constexpr int TM = tile_per_thread<Acc>();
  constexpr int kTile = 16 * TM;
  __shared__ Acc xs[kDimChunk * staged_stride<TM>()];
  __shared__ Acc ys[kDimChunk * staged_stride<TM>()];
  __shared__ Acc hb[kTile];
  const int64_t b = blockIdx.y;
  if (is_skipped(p.done_at, b, p.iteration)) return;
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const Acc* x = p.dst_points + b * p.len_dst * p.dim;
  const Acc* y = p.src_points + b * p.len_src * p.dim;
  const Acc* h = p.h + b * p.len_src;
  const Acc* lw = p.log_w + b * p.len_src;
  LogSumExp<Acc> acc[TM];
#pragma unroll
  for (int ii = 0; ii < TM; ++ii) acc[ii] = LogSumExp<Acc>::empty();
  Acc dot[TM][TM], x_sq[TM], y_sq[TM];
  for (int64_t col0 = 0; col0 < p.len_src; col0 += kTile) {
    if (threadIdx.x < kTile) {
      const int64_t j = col0 + threadIdx.x;
      hb[threadIdx.x] = j < p.len_src ? scaled(h, lw, j, p.inv_eps) : neg_inf<Acc>();
    }
    dot_tile<Acc, TM>(x, p.len_dst, row0, y, p.len_src, col0, p.dim, dot, x_sq, y_sq, xs, ys);  // syncs hb too
#pragma unroll
    for (int ii = 0; ii < TM; ++ii) {
      Acc v[TM];
      Acc tile_max = neg_inf<Acc>();
#pragma unroll
      for (int jj = 0; jj < TM; ++jj) {
        // Out-of-range sources have hb = -inf: skipped, like zero mass (their cost is finite).
        v[jj] = pair_exponent<Acc>(hb[tx * TM + jj], point_cost<Acc>(p.p, x_sq[ii], y_sq[jj], dot[ii][jj]) * p.inv_eps);
        tile_max = v[jj] > tile_max ? v[jj] : tile_max;  // NaN ignored here, carried by the sum
      }
      // As the CPU's add_chunk: no tile is dropped, whatever its maximum (a NaN reaches the sum).
      const Acc shift = LogSumExp<Acc>::block_shift(tile_max);
      Acc sum = 0;
#pragma unroll
      for (int jj = 0; jj < TM; ++jj) sum += fast_exp(v[jj] - shift);
      acc[ii].merge(tile_max, sum);
    }
    __syncthreads();  // hb is rewritten by the next tile
  }
#pragma unroll
  for (int ii = 0; ii < TM; ++ii) {
#pragma unroll
    for (int mask = 8; mask > 0; mask /= 2) acc[ii] = shfl_merge(acc[ii], mask);
    const int64_t row = row0 + ty * TM + ii;
    if (tx == 0 && row < p.len_dst) write_softmin(p, b * p.len_dst + row, acc[ii].value());
  }
}

// ---- transport statistics -------------------------------------------------------------------

template <class T, class Acc>
struct TransportParams : OrientedGeometry<T, Acc> {
  const Acc* pot_dst;  // f for rows, g for columns
  const Acc* pot_src;
  const Acc* lw_dst;
  const Acc* lw_src;
  Acc* mass;
  Acc* cost_out;
  Acc* grad;
  const Acc* src_weight;  // per source of the problem (batch, len_src), or null
  Acc inv_eps;
};

template <class T, class Acc>
__device__ __forceinline__ Acc source_weight(const TransportParams<T, Acc>& p, int64_t index) {
  return p.src_weight != nullptr ? p.src_weight[index] : Acc(1);
}

template <class T, class Acc>
__device__ __forceinline__ void write_transport(const TransportParams<T, Acc>& p, int64_t index, Acc mass, Acc cost) {
  if (p.mass) p.mass[index] = mass;
  if (p.cost_out) p.cost_out[index] = cost;
}

template <class T, class Acc>
__global__ void __launch_bounds__(kThreads) dense_rows_transport_kernel(TransportParams<T, Acc> p) {
  const int64_t b = blockIdx.y;
  const int lane = threadIdx.x % 32;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (row >= p.n) return;
  const T* c = p.cost + (b * p.n + row) * p.m;
  const Acc fa = scaled(p.pot_dst + b * p.n, p.lw_dst + b * p.n, row, p.inv_eps);
  Acc mass = 0, total = 0;
  // A zero-mass row is not skipped as a whole: its terms are 0, or NaN for NaN input (plan_exponent).
  for (int64_t j = lane; j < p.m; j += 32) {
    const Acc cij = to_acc(c[j]);
    const Acc gb = scaled(p.pot_src + b * p.m, p.lw_src + b * p.m, j, p.inv_eps);
    const Acc plan = fast_exp(plan_exponent<Acc>(fa, gb, cij * p.inv_eps)) * source_weight(p, b * p.m + j);
    mass += plan;
    total += plan != Acc(0) ? plan * cij : Acc(0);
  }
#pragma unroll
  for (int mask = 16; mask > 0; mask /= 2) {
    mass += __shfl_xor_sync(0xffffffffu, mass, mask);
    total += __shfl_xor_sync(0xffffffffu, total, mask);
  }
  if (lane == 0) write_transport(p, b * p.n + row, mass, total);
}

template <class T, class Acc>
__global__ void __launch_bounds__(kThreads) dense_cols_transport_kernel(TransportParams<T, Acc> p) {
  __shared__ Acc shared_mass[kColGroups][kColTile];
  __shared__ Acc shared_cost[kColGroups][kColTile];
  const int64_t b = blockIdx.y;
  const int tx = threadIdx.x % kColTile, ty = threadIdx.x / kColTile;
  const int64_t col = static_cast<int64_t>(blockIdx.x) * kColTile + tx;
  Acc mass = 0, total = 0;
  if (col < p.m) {
    const Acc gb = scaled(p.pot_dst + b * p.m, p.lw_dst + b * p.m, col, p.inv_eps);
    const T* c = p.cost + b * p.n * p.m;
    for (int64_t i = ty; i < p.n; i += kColGroups) {
      const Acc cij = to_acc(c[i * p.m + col]);
      const Acc fa = scaled(p.pot_src + b * p.n, p.lw_src + b * p.n, i, p.inv_eps);
      const Acc plan = fast_exp(plan_exponent<Acc>(gb, fa, cij * p.inv_eps)) * source_weight(p, b * p.n + i);
      mass += plan;
      total += plan != Acc(0) ? plan * cij : Acc(0);
    }
  }
  shared_mass[ty][tx] = mass;
  shared_cost[ty][tx] = total;
  __syncthreads();
  if (ty == 0 && col < p.m) {
    for (int group = 1; group < kColGroups; ++group) {
      mass += shared_mass[group][tx];
      total += shared_cost[group][tx];
    }
    write_transport(p, b * p.m + col, mass, total);
  }
}

// Points: per destination row, the mass, the cost and (grid.y > 1 or grad set) the envelope gradient
// grad_i = x_i sum_j W_ij - sum_j W_ij y_j with W_ij = P_ij dc/dx weight. Block (x: row tile,
// y: a chunk of 16*TM gradient dimensions, z: problem); the weights of a tile go through shared
// memory into a (rows x dims) product with the source points, as in the P V step of attention.
template <class Acc>
__global__ void __launch_bounds__(kThreads) points_transport_kernel(TransportParams<Acc, Acc> p) {
  constexpr int TM = tile_per_thread<Acc>();
  constexpr int kTile = 16 * TM;
  __shared__ Acc xs[kDimChunk * staged_stride<TM>()];
  __shared__ Acc ys[kDimChunk * staged_stride<TM>()];
  __shared__ Acc gb[kTile];
  __shared__ Acc sw[kTile];
  __shared__ Acc weights[kTile][kTile + 1];
  __shared__ Acc src_dims[kTile][kTile + 1];
  const int64_t b = blockIdx.z;
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int64_t dim0 = static_cast<int64_t>(blockIdx.y) * kTile;
  const bool with_grad = p.grad != nullptr;
  const Acc* x = p.dst_points + b * p.len_dst * p.dim;
  const Acc* y = p.src_points + b * p.len_src * p.dim;
  Acc fa[TM], mass[TM], total[TM], grad_weight[TM], out[TM][TM];
#pragma unroll
  for (int ii = 0; ii < TM; ++ii) {
    const int64_t row = row0 + ty * TM + ii;
    fa[ii] = row < p.len_dst ? scaled(p.pot_dst + b * p.len_dst, p.lw_dst + b * p.len_dst, row, p.inv_eps)
                             : neg_inf<Acc>();
    mass[ii] = total[ii] = grad_weight[ii] = 0;
#pragma unroll
    for (int jj = 0; jj < TM; ++jj) out[ii][jj] = 0;
  }
  Acc dot[TM][TM], x_sq[TM], y_sq[TM];
  for (int64_t col0 = 0; col0 < p.len_src; col0 += kTile) {
    if (threadIdx.x < kTile) {
      const int64_t j = col0 + threadIdx.x;
      gb[threadIdx.x] =
          j < p.len_src ? scaled(p.pot_src + b * p.len_src, p.lw_src + b * p.len_src, j, p.inv_eps) : neg_inf<Acc>();
      sw[threadIdx.x] = j < p.len_src ? source_weight(p, b * p.len_src + j) : Acc(0);
    }
    dot_tile<Acc, TM>(x, p.len_dst, row0, y, p.len_src, col0, p.dim, dot, x_sq, y_sq, xs, ys);
#pragma unroll
    for (int ii = 0; ii < TM; ++ii) {
#pragma unroll
      for (int jj = 0; jj < TM; ++jj) {
        const Acc cij = point_cost<Acc>(p.p, x_sq[ii], y_sq[jj], dot[ii][jj]);
        const Acc plan = fast_exp(plan_exponent<Acc>(fa[ii], gb[tx * TM + jj], cij * p.inv_eps)) * sw[tx * TM + jj];
        const Acc w = plan * cost_gradient_weight<Acc>(p.p, cij);
        mass[ii] += plan;
        total[ii] += plan != Acc(0) ? plan * cij : Acc(0);  // as on the CPU: no 0 * inf
        grad_weight[ii] += w;
        weights[ty * TM + ii][tx * TM + jj] = w;
      }
    }
    if (with_grad) {
      for (int e = threadIdx.x; e < kTile * kTile; e += kThreads) {
        const int c = e / kTile, k = e % kTile;
        const int64_t gj = col0 + c, gk = dim0 + k;
        src_dims[c][k] = (gj < p.len_src && gk < p.dim) ? y[gj * p.dim + gk] : Acc(0);
      }
      __syncthreads();
      for (int c = 0; c < kTile; ++c) {
#pragma unroll
        for (int ii = 0; ii < TM; ++ii) {
          const Acc w = weights[ty * TM + ii][c];
#pragma unroll
          for (int jj = 0; jj < TM; ++jj) out[ii][jj] += w * src_dims[c][tx * TM + jj];
        }
      }
    }
    __syncthreads();  // gb, weights and src_dims are rewritten by the next tile
  }
#pragma unroll
  for (int ii = 0; ii < TM; ++ii) {
#pragma unroll
    for (int mask = 8; mask > 0; mask /= 2) {
      mass[ii] += __shfl_xor_sync(0xffffffffu, mass[ii], mask);
      total[ii] += __shfl_xor_sync(0xffffffffu, total[ii], mask);
      grad_weight[ii] += __shfl_xor_sync(0xffffffffu, grad_weight[ii], mask);
    }
    const int64_t row = row0 + ty * TM + ii;
    if (row >= p.len_dst) continue;
    const int64_t index = b * p.len_dst + row;
    if (tx == 0 && blockIdx.y == 0) {
      if (p.mass) p.mass[index] = mass[ii];
      if (p.cost_out) p.cost_out[index] = total[ii];
    }
    if (with_grad) {
#pragma unroll
      for (int jj = 0; jj < TM; ++jj) {
        const int64_t k = dim0 + tx * TM + jj;
        if (k < p.dim) p.grad[index * p.dim + k] = grad_weight[ii] * x[row * p.dim + k] - out[ii][jj];
      }
    }
  }
}

}  // namespace fl::ot::cuda
