// InfoNCE / CLIP on the GPU with fused tiles: the row and column log-sum-exps need no whole rows of S,
// so S is never written to memory. The tiles come from cuda_gemm's tile_product (tensor cores for
// 16-bit inputs, fp32 FMA for float32), which leaves each 128 x 128 tile of S in shared memory.
//
//   info_nce_rows_kernel     a block per 128 query rows walks the column tiles of its split (the
//                            columns are split over blocks when there are few row blocks): an online
//                            log-sum-exp per row (two threads a row), the positive's similarity,
//                            and for the symmetric loss each tile's column (max, sum) over its 128
//                            rows, written per row block (launches over groups of row blocks whose
//                            parts fit the workspace budget)
//   row_terms_kernel         the row terms: the splits' parts merged in column order
//   fold_column_parts_kernel the column log-sum-exps: those parts merged in row order, group by group
//   info_nce_weights_kernel  the backward's W = dL/dS tile by tile from the saved statistics
//                            (row part, and the column part of the symmetric loss), written for a
//                            chunk of rows in the products' input type, with each tile's
//                            sum of W s for dL/dscale
//   dX_chunk = W Y, dY += W^T X_chunk      cuda_gemm, dY accumulated in fp32 over the chunks
// Every sum has a fixed order and there are no atomics: the same result at every run.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "common/cuda_check.cuh"
#include "common/cuda_gemm.cuh"
#include "common/cuda_numeric.cuh"
#include "common/cuda_reduce.cuh"
#include "common/fast_exp.h"
#include "metric/metric_cuda.cuh"
#include "metric/metric_kernels.h"
#include "metric/pair_losses.h"

namespace fl::metric::cuda_detail {
namespace {

using cuda_gemm::kThreads;
using cuda_gemm::kTile;
using cuda_gemm::Operands;
using cuda_gemm::TileProduct;
using cuda_gemm::View;

constexpr float kNegInfinity = -INFINITY;

// (max, sum of e^(v - max)) pairs merged; a -inf maximum is an empty set.
__device__ __forceinline__ float2 merge_lse(float2 a, float2 b) {
  const float top = fmaxf(a.x, b.x);
  if (top == kNegInfinity) return make_float2(kNegInfinity, 0.0f);
  const float sa = a.x == kNegInfinity ? 0.0f : a.y * fast_exp(a.x - top);
  const float sb = b.x == kNegInfinity ? 0.0f : b.y * fast_exp(b.x - top);
  return make_float2(top, sa + sb);
}

// (max, sum) of e^(scale * v) over `count` values v[k * stride].
__device__ __forceinline__ float2 strided_lse(const float* v, int count, int stride, float scale) {
  float top = kNegInfinity;
  for (int k = 0; k < count; ++k) top = fmaxf(top, scale * v[k * stride]);
  float sum = 0.0f;
  if (top != kNegInfinity)
    for (int k = 0; k < count; ++k) sum += fast_exp(scale * v[k * stride] - top);
  return make_float2(top, sum);
}

// ---- forward ------------------------------------------------------------------------------------------

struct ForwardParams {
  int64_t n, m;
  float scale;
  const int64_t* targets;  // null: the diagonal
  float* terms;            // (n, kRowTerms)
  float* counts;
  float* stats;            // (n, kRowStats): LSE_i, s_i,target
  float2* col_parts;       // symmetric: (row blocks of this launch, m) column (max, sum) of each; else null
  int64_t first_tile;      // this launch's first row block (launches go over groups of row blocks)
  int64_t tiles_per_split; // column tiles of one block (blockIdx.y: the block's split of the columns)
  float2* row_parts;       // (splits, n): each split's (max, sum) of every row
  float* row_positive;     // (splits, n): s_i,target where the split holds the target, else NaN
};

// Extra shared memory after the tile: the two halves' column parts (2 x 128 float2).
constexpr size_t kColumnScratchBytes = 2 * kTile * sizeof(float2);

template <class TC, bool ARow, bool BRow, class T>
__global__ void __launch_bounds__(kThreads) info_nce_rows_kernel(Operands<T, T> op, ForwardParams f) {
  using P = TileProduct<TC, ARow, BRow>;
  extern __shared__ __align__(128) unsigned char smem[];
  float2* column_scratch = reinterpret_cast<float2*>(smem + P::kSmemBytes);
  const int64_t row0 = (f.first_tile + blockIdx.x) * kTile;
  // Rows: thread t takes row t / 2 and every other column of each tile (half = t % 2): a warp's 16
  // rows and 2 halves read 2-way conflicted banks (the row stride is 4 banks).
  const int rr = static_cast<int>(threadIdx.x) >> 1, half = static_cast<int>(threadIdx.x) & 1;
  const int64_t i = row0 + rr;
  const bool row_valid = i < f.n;
  const int64_t target = row_valid ? (f.targets != nullptr ? f.targets[i] : i) : -1;
  float2 row = make_float2(kNegInfinity, 0.0f);
  float positive = NAN;  // s_i,target: NaN until seen (stays NaN for a target outside [0, m))
  // Columns: thread t takes column t % 128 over rows (t / 128) * 64 + [0, 64).
  const int cc = static_cast<int>(threadIdx.x) % kTile, rows_half = static_cast<int>(threadIdx.x) / kTile;
  const int column_rows = static_cast<int>(std::min<int64_t>(64, std::max<int64_t>(0, f.n - row0 - rows_half * 64)));

  const int64_t split = blockIdx.y;
  const int64_t col_end = std::min(f.m, (split + 1) * f.tiles_per_split * kTile);
  for (int64_t col0 = split * f.tiles_per_split * kTile; col0 < col_end; col0 += kTile) {
    const float* tile = cuda_gemm::tile_product<TC, ARow, BRow>(op, row0, col0, smem);
    const int valid_cols = static_cast<int>(std::min<int64_t>(kTile, f.m - col0));
    if (row_valid) {
      const int count = (valid_cols - half + 1) / 2;  // columns half, half + 2, ... below valid_cols
      row = merge_lse(row, strided_lse(tile + rr * P::kTileLd + half, count, 2, f.scale));
      const int64_t local = target - col0;
      if (local >= 0 && local < valid_cols && (local & 1) == half) positive = tile[rr * P::kTileLd + local];
    }
    if (f.col_parts != nullptr) {
      float2 part = make_float2(kNegInfinity, 0.0f);
      if (cc < valid_cols) part = strided_lse(tile + rows_half * 64 * P::kTileLd + cc, column_rows, P::kTileLd, f.scale);
      column_scratch[rows_half * kTile + cc] = part;
      __syncthreads();
      if (rows_half == 0 && cc < valid_cols)
        f.col_parts[blockIdx.x * f.m + col0 + cc] = merge_lse(part, column_scratch[kTile + cc]);
    }
    __syncthreads();  // the next tile_product reuses the shared memory
  }
  // The two halves of each row are neighbouring lanes.
  const float2 other = make_float2(__shfl_xor_sync(0xffffffffu, row.x, 1), __shfl_xor_sync(0xffffffffu, row.y, 1));
  const float other_positive = __shfl_xor_sync(0xffffffffu, positive, 1);
  row = merge_lse(row, other);
  if (isnan(positive)) positive = other_positive;
  if (!row_valid || half != 0) return;
  f.row_parts[split * f.n + i] = row;
  f.row_positive[split * f.n + i] = positive;
}

// Each row's terms and statistics from its splits' parts, merged in column order.
__global__ void row_terms_kernel(ForwardParams f, int64_t splits) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= f.n) return;
  float2 row = make_float2(kNegInfinity, 0.0f);
  float positive = NAN;
  for (int64_t k = 0; k < splits; ++k) {
    row = merge_lse(row, f.row_parts[k * f.n + i]);
    const float candidate = f.row_positive[k * f.n + i];
    if (isnan(positive)) positive = candidate;
  }
  const RowResult<float> res = info_nce_result(row.x + logf(row.y), positive, f.scale);
  for (int k = 0; k < kRowTerms; ++k) {
    f.terms[i * kRowTerms + k] = res.terms[k];
    f.counts[i * kRowTerms + k] = res.counts[k];
  }
  for (int k = 0; k < kRowStats; ++k) f.stats[i * kRowStats + k] = res.stats[k];
}

// Folds a launch's row-block column parts into the running (max, sum) of each column, in row order.
__global__ void fold_column_parts_kernel(const float2* __restrict__ parts, int64_t row_blocks, int64_t m, bool first,
                                         float2* __restrict__ running) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= m) return;
  float2 total = first ? make_float2(kNegInfinity, 0.0f) : running[j];
  for (int64_t b = 0; b < row_blocks; ++b) total = merge_lse(total, parts[b * m + j]);
  running[j] = total;
}

// col_stats_j = LSE over the rows of scale * s_ij; col_terms_j = col_stats_j - scale * s_jj (s_jj is
// row j's positive, saved in its statistics: the symmetric loss is square with the diagonal as
// positives).
__global__ void column_terms_kernel(const float2* __restrict__ running, int64_t m, float scale,
                                    const float* __restrict__ row_stats, float* __restrict__ col_stats,
                                    float* __restrict__ col_terms) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= m) return;
  const float2 total = running[j];
  const float lse = total.y == 0.0f ? kNegInfinity : total.x + logf(total.y);
  col_stats[j] = lse;
  col_terms[j] = lse - scale * row_stats[j * kRowStats + 1];
}

// ---- backward -----------------------------------------------------------------------------------------

template <class TW>
struct WeightParams {
  int64_t n, m, r0, rows;  // the chunk: rows [r0, r0 + rows)
  float scale;
  const int64_t* targets;  // null: the diagonal
  const float* stats;      // (n, kRowStats): LSE_i at [0]
  const float* grad_row;   // (n, kRowTerms); null: 1 on every row (the fused gradient)
  const float* grad_col;   // (m) symmetric; else null
  const float* col_stats;  // (m) symmetric
  TW* w;                   // (rows, m)
  float* tile_sums;        // per tile of the whole problem: sum of W_ij s_ij
  int64_t col_tiles;
};

// W_ij = g_i scale (e^(scale s_ij - LSE_i) - [j = t_i]) + gc_j scale (e^(scale s_ij - CLSE_j) - [i = j]),
// the forward's info_nce_backward and add_column_grads of the CPU.
template <class TC, bool ARow, bool BRow, class T, class TW>
__global__ void __launch_bounds__(kThreads) info_nce_weights_kernel(Operands<T, T> op, WeightParams<TW> q) {
  using P = TileProduct<TC, ARow, BRow>;
  extern __shared__ __align__(128) unsigned char smem[];
  __shared__ float scratch[kThreads / 32];
  const int64_t row0 = static_cast<int64_t>(blockIdx.y) * kTile, col0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const float* tile = cuda_gemm::tile_product<TC, ARow, BRow>(op, row0, col0, smem);
  const float scale = q.scale;
  float sum = 0.0f;
  for (int e = static_cast<int>(threadIdx.x); e < kTile * kTile; e += kThreads) {
    const int r = e / kTile, c = e % kTile;  // consecutive threads, consecutive columns
    const int64_t local = row0 + r, j = col0 + c;
    if (local >= q.rows || j >= q.m) continue;
    const int64_t i = q.r0 + local;
    const float s = tile[r * P::kTileLd + c];
    const int64_t target = q.targets != nullptr ? q.targets[i] : i;
    const float g = q.grad_row != nullptr ? q.grad_row[i * kRowTerms] : 1.0f;
    float w = info_nce_weight(s, j == target, q.stats[i * kRowStats], g, scale);
    if (target < 0 || target >= q.m) w = NAN;  // (only with the host check of the targets off)
    if (q.grad_col != nullptr) w += info_nce_weight(s, i == j, q.col_stats[j], q.grad_col[j], scale);
    q.w[local * q.m + j] = CudaStore<TW>::from(w);
    sum += w * s;
  }
  sum = block_allreduce<kThreads>(sum, [](float a, float b) { return a + b; }, scratch);
  if (threadIdx.x == 0) q.tile_sums[(q.r0 / kTile + blockIdx.y) * q.col_tiles + blockIdx.x] = sum;
}

// out[0] = sum_i parts[i] / divisor, in a fixed order (one block).
__global__ void __launch_bounds__(kThreads) sum_kernel(const float* __restrict__ parts, int64_t count, float divisor,
                                                       float* __restrict__ out) {
  __shared__ float scratch[kThreads / 32];
  float sum = 0;
  for (int64_t e = threadIdx.x; e < count; e += kThreads) sum += parts[e];
  sum = block_allreduce<kThreads>(sum, [](float a, float b) { return a + b; }, scratch);
  if (threadIdx.x == 0) out[0] = sum / divisor;
}

__global__ void fill_kernel(float* __restrict__ out, int64_t count, float value) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e < count) out[e] = value;
}

// ---- host ---------------------------------------------------------------------------------------------

unsigned blocks_for(int64_t items, int64_t per_block) {
  return static_cast<unsigned>((items + per_block - 1) / per_block);
}

// The storage types of one call: T (x, y), TS (the compute type of S), TW (W and its products).
// float16's W goes in float32 (W's entries fall below float16's range); bfloat16 has the range.
template <class T>
struct Types;
template <>
struct Types<float> {
  using TS = float;
  using TW = float;
};
template <>
struct Types<__half> {
  using TS = __half;
  using TW = float;
};
template <>
struct Types<__nv_bfloat16> {
  using TS = __nv_bfloat16;
  using TW = __nv_bfloat16;
};

int64_t w_bytes_per_element(DType dtype) { return dtype == DType::BFloat16 ? 2 : 4; }

// Rows of a chunk of W: within the budget, a multiple of the tile when there are several chunks.
int64_t chunk_rows(const PairProblem& p) {
  int64_t rows = std::max<int64_t>(1, chunk_budget_bytes() / (p.m * w_bytes_per_element(p.dtype)));
  if (rows >= p.n) return p.n;
  return std::max<int64_t>(kTile, rows - rows % kTile);
}

// Row blocks whose column parts fit the budget at once (the symmetric forward's launches).
int64_t row_blocks_per_launch(const PairProblem& p) {
  const int64_t row_tiles = (p.n + kTile - 1) / kTile;
  if (!p.symmetric) return row_tiles;
  return std::min(row_tiles, std::max<int64_t>(1, chunk_budget_bytes() / (p.m * int64_t(sizeof(float2)))));
}

// The forward splits the columns over blocks when there are few row blocks, so that a launch has
// about 512 blocks (4 per SM on an H100) or every block has one column tile. Sizes only: the same
// on every GPU, so the workspace query needs no device.
struct ColumnSplits {
  int64_t splits, tiles_per_split;
};
ColumnSplits column_splits(const PairProblem& p) {
  const int64_t row_blocks = row_blocks_per_launch(p), col_tiles = (p.m + kTile - 1) / kTile;
  const int64_t wanted = std::min<int64_t>({col_tiles, 64, std::max<int64_t>(1, (512 + row_blocks - 1) / row_blocks)});
  const int64_t per_split = (col_tiles + wanted - 1) / wanted;
  return ColumnSplits{(col_tiles + per_split - 1) / per_split, per_split};
}

struct Layout {
  float2* row_parts = nullptr;    // forward: splits x n
  float* row_positive = nullptr;  // forward: splits x n
  float2* col_parts = nullptr;    // symmetric forward: row_blocks_per_launch x m
  float2* col_running = nullptr;  // symmetric forward: m
  void* w = nullptr;            // gradient: chunk_rows x m
  float* tile_sums = nullptr;   // gradient: row tiles x column tiles
  int64_t rows = 0;
};

int64_t layout(const PairProblem& p, bool forward, bool gradient, char* base, Layout& ws) {
  int64_t used = 0;
  auto take = [&](int64_t bytes) {
    char* at = base == nullptr ? nullptr : base + used;
    used += (bytes + 255) / 256 * 256;
    return at;
  };
  const int64_t row_tiles = (p.n + kTile - 1) / kTile, col_tiles = (p.m + kTile - 1) / kTile;
  if (forward) {
    const int64_t splits = column_splits(p).splits;
    ws.row_parts = reinterpret_cast<float2*>(take(splits * p.n * int64_t(sizeof(float2))));
    ws.row_positive = reinterpret_cast<float*>(take(splits * p.n * int64_t(sizeof(float))));
  }
  if (forward && p.symmetric) {
    ws.col_parts = reinterpret_cast<float2*>(take(row_blocks_per_launch(p) * p.m * int64_t(sizeof(float2))));
    ws.col_running = reinterpret_cast<float2*>(take(p.m * int64_t(sizeof(float2))));
  }
  if (gradient) {
    ws.rows = chunk_rows(p);
    ws.w = take(ws.rows * p.m * w_bytes_per_element(p.dtype));
    ws.tile_sums = reinterpret_cast<float*>(take(row_tiles * col_tiles * 4));
  }
  return used;
}

template <class Kernel>
void set_smem(Kernel kernel, size_t bytes) {
  FL_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
}

template <class T>
void run_typed(const PairProblem& p, const Pass& pass, void* workspace, int64_t workspace_bytes, cudaStream_t stream) {
  using TS = typename Types<T>::TS;
  using TW = typename Types<T>::TW;
  const bool forward = pass.terms != nullptr, gradient = pass.grad_x != nullptr;
  Layout ws;
  const int64_t needed = layout(p, forward, gradient, static_cast<char*>(workspace), ws);
  FL_CHECK_ARG(needed == 0 || (workspace != nullptr && workspace_bytes >= needed), p.op_name, ": workspace of ",
               workspace_bytes, " bytes is smaller than the ", needed, " bytes needed");
  const T* x = static_cast<const T*>(p.x);
  const T* y = static_cast<const T*>(p.y);
  const int64_t n = p.n, m = p.m, dim = p.dim;
  const float scale = static_cast<float>(p.p0);
  const int64_t row_tiles = (n + kTile - 1) / kTile, col_tiles = (m + kTile - 1) / kTile;
  bool a_row, b_row;

  if (forward) {
    const ColumnSplits splits = column_splits(p);
    ForwardParams f{n, m, scale, p.targets, pass.terms, pass.counts, pass.stats, ws.col_parts, 0,
                    splits.tiles_per_split, ws.row_parts, ws.row_positive};
    const Operands<T, T> op = cuda_gemm::operands(n, m, dim, View<T>{x, dim, 1}, View<T>{y, 1, dim}, a_row, b_row);
    const int64_t per_launch = row_blocks_per_launch(p);
    for (int64_t first = 0; first < row_tiles; first += per_launch) {
      const int64_t blocks = std::min(per_launch, row_tiles - first);
      f.first_tile = first;
      cuda_gemm::dispatch_layouts(a_row, b_row, [&](auto a_layout, auto b_layout) {
        constexpr bool kARow = decltype(a_layout)::value, kBRow = decltype(b_layout)::value;
        constexpr size_t kSmem = TileProduct<TS, kARow, kBRow>::kSmemBytes + kColumnScratchBytes;
        auto kernel = info_nce_rows_kernel<TS, kARow, kBRow, T>;
        set_smem(kernel, kSmem);
        const dim3 grid(static_cast<unsigned>(blocks), static_cast<unsigned>(splits.splits));
        kernel<<<grid, kThreads, kSmem, stream>>>(op, f);
        FL_CUDA_CHECK_LAUNCH(info_nce_rows_kernel);
      });
      if (p.symmetric) {
        fold_column_parts_kernel<<<blocks_for(m, kThreads), kThreads, 0, stream>>>(ws.col_parts, blocks, m, first == 0,
                                                                                   ws.col_running);
        FL_CUDA_CHECK_LAUNCH(fold_column_parts_kernel);
      }
    }
    row_terms_kernel<<<blocks_for(n, kThreads), kThreads, 0, stream>>>(f, splits.splits);
    FL_CUDA_CHECK_LAUNCH(row_terms_kernel);
    if (p.symmetric) {  // (after the row terms: it reads each row's positive from the statistics)
      column_terms_kernel<<<blocks_for(m, kThreads), kThreads, 0, stream>>>(ws.col_running, m, scale, pass.stats,
                                                                            pass.col_stats_out, pass.col_terms);
      FL_CUDA_CHECK_LAUNCH(column_terms_kernel);
    }
  }
  if (!gradient) return;

  // The fused gradient (unit upstream, not symmetric) marks every row active: a row of W is zero only
  // when its softmax is exactly one-hot, and a row marked active needlessly only makes the backward's
  // uniformity check stricter.
  if (pass.unit_grad) {
    fill_kernel<<<blocks_for(n, kThreads), kThreads, 0, stream>>>(pass.row_active, n, 1.0f);
    FL_CUDA_CHECK_LAUNCH(fill_kernel);
  }
  WeightParams<TW> q{};
  q.n = n;
  q.m = m;
  q.scale = scale;
  q.targets = p.targets;
  q.stats = pass.unit_grad ? pass.stats : pass.saved_stats;
  q.grad_row = pass.unit_grad ? nullptr : pass.grad_row;
  q.grad_col = !pass.unit_grad && p.symmetric ? pass.grad_col : nullptr;
  q.col_stats = pass.col_stats;
  q.w = static_cast<TW*>(ws.w);
  q.tile_sums = ws.tile_sums;
  q.col_tiles = col_tiles;
  for (int64_t r0 = 0; r0 < n; r0 += ws.rows) {
    const int64_t rows = std::min(ws.rows, n - r0);
    const T* x_chunk = x + r0 * dim;
    q.r0 = r0;
    q.rows = rows;
    const Operands<T, T> op =
        cuda_gemm::operands(rows, m, dim, View<T>{x_chunk, dim, 1}, View<T>{y, 1, dim}, a_row, b_row);
    cuda_gemm::dispatch_layouts(a_row, b_row, [&](auto a_layout, auto b_layout) {
      constexpr bool kARow = decltype(a_layout)::value, kBRow = decltype(b_layout)::value;
      constexpr size_t kSmem = TileProduct<TS, kARow, kBRow>::kSmemBytes;
      auto kernel = info_nce_weights_kernel<TS, kARow, kBRow, T, TW>;
      set_smem(kernel, kSmem);
      kernel<<<cuda_gemm::tile_grid(rows, m), kThreads, kSmem, stream>>>(op, q);
      FL_CUDA_CHECK_LAUNCH(info_nce_weights_kernel);
    });
    // dX rows = W Y;  dY (+)= W^T X_chunk, the first chunk overwriting whatever dY held.
    cuda_gemm::gemm<TW>(rows, dim, m, View<TW>{q.w, m, 1}, View<T>{y, dim, 1}, 1.0f, 0.0f, pass.grad_x + r0 * dim,
                        dim, stream);
    cuda_gemm::gemm<TW>(m, dim, rows, View<TW>{q.w, 1, m}, View<T>{x_chunk, dim, 1}, 1.0f, r0 == 0 ? 0.0f : 1.0f,
                        pass.grad_y, dim, stream);
  }
  sum_kernel<<<1, kThreads, 0, stream>>>(ws.tile_sums, row_tiles * col_tiles, scale, pass.grad_scale);
  FL_CUDA_CHECK_LAUNCH(sum_kernel);
}

}  // namespace

int64_t info_nce_workspace_bytes(const PairProblem& p, bool gradient) {
  Layout ws;
  // A forward with the fused gradient is never symmetric; a backward needs no column parts. (The
  // query cannot tell a one-way backward from a forward with the fused gradient: the former gets the
  // forward's row parts too, splits x n x 12 bytes.)
  return layout(p, !gradient || !p.symmetric, gradient, nullptr, ws);
}

void run_info_nce(const PairProblem& p, const Pass& pass, void* workspace, int64_t workspace_bytes,
                  cudaStream_t stream) {
  switch (p.dtype) {
    case DType::Float32: run_typed<float>(p, pass, workspace, workspace_bytes, stream); return;
    case DType::Float16: run_typed<__half>(p, pass, workspace, workspace_bytes, stream); return;
    case DType::BFloat16: run_typed<__nv_bfloat16>(p, pass, workspace, workspace_bytes, stream); return;
    case DType::Float64: break;
  }
  fl::throw_invalid_argument(p.op_name, ": the CUDA kernels take float32, float16 or bfloat16, got ",
                             dtype_name(p.dtype));
}

}  // namespace fl::metric::cuda_detail
