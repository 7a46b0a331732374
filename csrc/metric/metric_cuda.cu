// CUDA kernels of the metric family: the entry points, and for every loss but InfoNCE (whose fused
// tiles are in info_nce_cuda.cu) the CPU engine's design (whole rows of S, never the n x m matrix)
// on chunks of query rows sized to a fixed workspace budget.
//
// For each chunk of R rows:
//   S = X_chunk Y^T          cuda_gemm (tensor cores for 16-bit inputs, fp32 FMA for float32)
//   classify_kernel          the pair classes of the chunk (labels, targets, positive lists, self pair)
//   rows_kernel              a team per row (a warp, or a block for long rows): the loss's terms, counts
//                            and statistics (forward) and the row of W = dL/dS (gradient)
//   dX_chunk = W Y,  dY += W^T X_chunk     cuda_gemm, dY accumulated in fp32 across the chunks:
//                            bfloat16 inputs on tensor cores (W rounded to bfloat16, whose exponent
//                            range holds W's small entries), float32 and float16 inputs in fp32 on
//                            the FMA units (W's entries, about 1 / B^2, fall below float16's range)
// Everything is reduced in a fixed order, with no atomics: the same result at every run.
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
#include "metric/metric_rows_cuda.cuh"
#include "metric/pair_losses.h"

namespace fl::metric {
namespace {

using cuda_detail::Pass;
using cuda_gemm::View;
using cuda_rows::BlockTeam;
using cuda_rows::DeviceRow;
using cuda_rows::WarpTeam;

constexpr int kWarpsPerBlock = 8;
constexpr int kThreads = kWarpsPerBlock * 32;
// Rows longer than this get a block each (rows_kernel<BlockTeam>), shorter ones a warp: a chunk of
// long rows has few of them, and a warp each would leave most of the GPU idle.
constexpr int64_t kWarpRowMaxColumns = 4096;
// The chunk's S (fp32), classes (1 byte) and, with a gradient, W (fp32) per pair: 256 MB covers
// 3,584 rows at m = 8,192 and 448 at m = 65,536 (rows a multiple of 64 when there are several chunks).
constexpr int64_t kChunkBudgetBytes = int64_t(256) << 20;
int64_t chunk_budget = kChunkBudgetBytes;  // set_cuda_chunk_budget: tests make it small

bool uses_labels(LossKind kind) {
  return kind != LossKind::InfoNCE && kind != LossKind::AUC && kind != LossKind::DecoupledSoftmax;
}
bool uses_distance(const PairProblem& p) {
  return (p.kind == LossKind::Contrastive && p.option == 0) || p.kind == LossKind::Triplet;
}

int64_t chunk_rows(const PairProblem& p, bool gradient) {
  const int64_t per_row = std::max<int64_t>(1, p.m * ((gradient ? 8 : 4) + 1));
  int64_t rows = std::max<int64_t>(1, chunk_budget / per_row);
  if (rows >= p.n) return std::max<int64_t>(1, p.n);
  return rows >= cuda_gemm::kTile ? rows - rows % cuda_gemm::kTile : rows;
}

// The workspace, carved in 256-byte aligned parts.
struct Workspace {
  int64_t rows = 0;                          // per chunk
  float* s = nullptr;                        // rows x m
  float* w = nullptr;                        // rows x m (gradient passes)
  uint8_t* cls = nullptr;                    // rows x m
  float* x_sqnorm = nullptr;                 // n (euclidean losses)
  float* y_sqnorm = nullptr;                 // m
};

// Lays the parts out from `base` (null: only counts) and returns the bytes used.
int64_t layout(const PairProblem& p, bool gradient, char* base, Workspace& ws) {
  int64_t used = 0;
  auto take = [&](int64_t bytes) {
    char* at = base == nullptr ? nullptr : base + used;
    used += (bytes + 255) / 256 * 256;
    return at;
  };
  ws.rows = chunk_rows(p, gradient);
  const int64_t pairs = ws.rows * p.m;
  ws.s = reinterpret_cast<float*>(take(pairs * 4));
  ws.w = gradient ? reinterpret_cast<float*>(take(pairs * 4)) : nullptr;
  ws.cls = reinterpret_cast<uint8_t*>(take(pairs));
  ws.x_sqnorm = reinterpret_cast<float*>(take(p.n * 4));
  ws.y_sqnorm = reinterpret_cast<float*>(take(p.m * 4));
  return used;
}

// ---- small kernels ----------------------------------------------------------------------------------

template <class T>
__global__ void __launch_bounds__(kThreads) squared_norms_kernel(const T* __restrict__ v, int64_t rows, int64_t dim,
                                                                 float* __restrict__ out) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  if (r >= rows) return;
  const int lane = threadIdx.x % 32;
  float sum = 0;
  for (int64_t t = lane; t < dim; t += 32) {
    const float e = to_acc(v[r * dim + t]);
    sum += e * e;
  }
  sum = cuda_rows::team_sum(WarpTeam{lane}, sum);
  if (lane == 0) out[r] = sum;
}

// S (rows x m) replaced in place by the euclidean distances (pair_distance of pair_losses.h: the
// GEMM form, recomputed from the differences for close pairs), one pair per thread; the euclidean
// losses read only the distances.
template <class T>
__global__ void __launch_bounds__(kThreads) distances_kernel(const T* __restrict__ x, const T* __restrict__ y,
                                                             int64_t rows, int64_t m, int64_t dim,
                                                             const float* __restrict__ x_sqnorm,
                                                             const float* __restrict__ y_sqnorm, float* s) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; k < rows * m; k += stride) {
    const int64_t r = k / m, j = k % m;
    s[k] = pair_distance(x_sqnorm[r], y_sqnorm[j], s[k], [&] {
      float sum = 0;
      for (int64_t t = 0; t < dim; ++t) {
        const float diff = to_acc(x[r * dim + t]) - to_acc(y[j * dim + t]);
        sum += diff * diff;
      }
      return sum;
    });
  }
}

// The pair classes of rows [r0, r0 + rows), as Inputs::classify of metric_cpu.cpp: labels, or the
// target column (AUC; InfoNCE runs in info_nce_cuda.cu), then the self pair excluded. Positive lists come after
// (positive_lists_kernel).
struct ClassifyParams {
  int64_t r0, rows, m;
  bool labelled;
  const int64_t* labels_x;
  const int64_t* labels_y;
  bool has_target;
  const int64_t* targets;  // null: the diagonal
  int64_t self_offset;
  uint8_t* cls;
};

__global__ void classify_kernel(ClassifyParams c) {
  const int64_t total = c.rows * c.m;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = c.r0 + e / c.m, j = e % c.m;
    uint8_t value = kNegative;
    if (c.labelled) value = c.labels_y[j] == c.labels_x[i] ? kPositive : kNegative;
    else if (c.has_target && j == (c.targets != nullptr ? c.targets[i] : i)) value = kPositive;
    if (c.self_offset >= 0 && j == i + c.self_offset) value = kExcluded;
    c.cls[e] = value;
  }
}

// Decoupled softmax: row i's positives pos_idx[pos_ptr[i] ..) (a warp per row). An index outside
// [0, m) is skipped here; fastloss.metric checks them on the host first.
__global__ void __launch_bounds__(kThreads)
    positive_lists_kernel(ClassifyParams c, const int64_t* __restrict__ pos_ptr, const int64_t* __restrict__ pos_idx) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  if (r >= c.rows) return;
  const int64_t i = c.r0 + r;
  for (int64_t k = pos_ptr[i] + threadIdx.x % 32; k < pos_ptr[i + 1]; k += 32) {
    const int64_t j = pos_idx[k];
    if (j >= 0 && j < c.m && !(c.self_offset >= 0 && j == i + c.self_offset)) c.cls[r * c.m + j] = kPositive;
  }
}

// ---- the rows -----------------------------------------------------------------------------------------

struct RowParams {
  LossKind kind;
  float p0, p1, p2, p3;
  int option;
  int64_t m, r0, rows;
  const float* s;
  const uint8_t* cls;
  const int64_t* targets;  // null: the diagonal
  float* terms;  // forward outputs (null: no forward)
  float* counts;
  float* stats;
  float* w;               // gradient (null: none): the chunk's rows of W
  bool unit;              // the fused gradient: unit upstream on terms[:, 0], from this pass's statistics
  const float* saved_stats;
  const float* grad_row;
  float* active;          // unit: 1 where the row of W is not all zero
};

template <class Team>
__device__ RowResult<float> forward_row(const Team& t, const RowParams& q, const DeviceRow& row) {
  switch (q.kind) {
    case LossKind::InfoNCE: break;  // info_nce_cuda.cu
    case LossKind::NTXent: return cuda_rows::positives_vs_negatives_forward(t, row, 1.0f / q.p0, false);
    case LossKind::SupCon: return cuda_rows::supcon_forward(t, row, 1.0f / q.p0);
    case LossKind::MultiSimilarity:
      return cuda_rows::multi_similarity_forward(t, row, MsParams<float>{q.p0, q.p1, q.p2, q.p3, q.option != 0});
    case LossKind::Circle: return cuda_rows::circle_forward(t, row, CircleParams<float>(q.p0, q.p1));
    case LossKind::Contrastive: return cuda_rows::contrastive_forward(t, row, q.p0, q.p1, q.option != 0);
    case LossKind::Triplet:
      return cuda_rows::triplet_forward(t, row, TripletParams<float>{q.p0, q.p1, static_cast<TripletMining>(q.option)});
    case LossKind::AUC: return cuda_rows::auc_forward(t, row, 1.0f / q.p0);
    case LossKind::DecoupledSoftmax: return cuda_rows::positives_vs_negatives_forward(t, row, 1.0f / q.p0, true);
  }
  return RowResult<float>{};
}

template <class Team>
__device__ void backward_row(const Team& t, const RowParams& q, const DeviceRow& row, const float* stats,
                             const float* grad, float* w) {
  // Local copies: the weights are written through w, which the compiler cannot tell from these.
  const RowStats<float> saved(stats);
  const float upstream[kRowTerms] = {grad[0], grad[1]};
  stats = saved.v;
  grad = upstream;
  const float g = grad[0];
  const float inv_t = 1.0f / q.p0;
  switch (q.kind) {
    case LossKind::InfoNCE: return;  // info_nce_cuda.cu
    case LossKind::NTXent:
    case LossKind::DecoupledSoftmax:
      cuda_rows::write_weights(t, row, w, [&](int64_t j) { return positives_vs_negatives_weight(row.cls[j], row.s[j], stats, g, inv_t); });
      return;
    case LossKind::SupCon:
      cuda_rows::write_weights(t, row, w, [&](int64_t j) { return supcon_weight(row.cls[j], row.s[j], stats, g, inv_t); });
      return;
    case LossKind::MultiSimilarity: {
      const MsParams<float> ms{q.p0, q.p1, q.p2, q.p3, q.option != 0};
      cuda_rows::write_weights(t, row, w, [&](int64_t j) { return multi_similarity_weight(row.cls[j], row.s[j], stats, g, ms); });
      return;
    }
    case LossKind::Circle: {
      const CircleParams<float> circle(q.p0, q.p1);
      const float outer = circle_outer(stats, g);
      cuda_rows::write_weights(t, row, w, [&](int64_t j) { return circle_weight(row.cls[j], row.s[j], stats, outer, circle); });
      return;
    }
    case LossKind::Contrastive: {
      const bool cosine = q.option != 0;
      cuda_rows::write_weights(t, row, w, [&](int64_t j) {
        return contrastive_weight(row.cls[j], row.s[j], cosine ? 0.0f : row.dist(j), grad, q.p0, q.p1, cosine);
      });
      return;
    }
    case LossKind::Triplet:
      cuda_rows::triplet_backward(t, row, g, TripletParams<float>{q.p0, q.p1, static_cast<TripletMining>(q.option)}, w);
      return;
    case LossKind::AUC: cuda_rows::auc_backward(t, row, stats, g, inv_t, w); return;
  }
}

// The row's team: a warp of the block (WarpTeam, kWarpsPerBlock rows a block) or the whole block.
template <class Team>
__device__ __forceinline__ Team make_team(void* scratch);
template <>
__device__ __forceinline__ WarpTeam make_team<WarpTeam>(void*) {
  return WarpTeam{static_cast<int>(threadIdx.x) % 32};
}
template <>
__device__ __forceinline__ BlockTeam<kThreads> make_team<BlockTeam<kThreads>>(void* scratch) {
  return BlockTeam<kThreads>{static_cast<int>(threadIdx.x), scratch};
}

template <class Team>
__global__ void __launch_bounds__(kThreads) rows_kernel(RowParams q) {
  __shared__ __align__(16) unsigned char scratch[kWarpsPerBlock * 16];
  constexpr int kRowsPerBlock = kThreads / Team::kSize;
  const Team t = make_team<Team>(scratch);
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / Team::kSize;
  if (r >= q.rows) return;  // the whole team leaves together
  const int64_t i = q.r0 + r;
  const DeviceRow row{q.s + r * q.m,
                      q.cls + r * q.m,
                      q.m,
                      q.targets != nullptr ? q.targets[i] : i};
  // A target outside [0, m) (possible only with the host check turned off) makes the row NaN.
  const bool bad_target = q.kind == LossKind::AUC && (row.target < 0 || row.target >= q.m);
  float stats[kRowStats] = {0, 0, 0, 0};
  if (q.terms != nullptr) {
    RowResult<float> res;
    if (bad_target) {
      for (int k = 0; k < kRowTerms; ++k) res.terms[k] = res.counts[k] = NAN;
      for (int k = 0; k < kRowStats; ++k) res.stats[k] = NAN;
    } else {
      res = forward_row(t, q, row);
    }
    for (int k = 0; k < kRowStats; ++k) stats[k] = res.stats[k];
    if (t.rank == 0) {
      for (int k = 0; k < kRowTerms; ++k) {
        q.terms[i * kRowTerms + k] = res.terms[k];
        q.counts[i * kRowTerms + k] = res.counts[k];
      }
      for (int k = 0; k < kRowStats; ++k) q.stats[i * kRowStats + k] = res.stats[k];
    }
  }
  if (q.w == nullptr) return;
  float* w = q.w + r * q.m;
  const float unit_grad[kRowTerms] = {1.0f, 0.0f};
  if (bad_target) {
    FL_TEAM_COLUMNS(t, j, q.m) w[j] = NAN;
  } else {
    backward_row(t, q, row, q.unit ? stats : q.saved_stats + i * kRowStats,
                 q.unit ? unit_grad : q.grad_row + i * kRowTerms, w);
  }
  if (q.unit) {
    bool nonzero = false;
    FL_TEAM_COLUMNS(t, j, q.m) nonzero = nonzero || w[j] != 0;
    nonzero = cuda_rows::team_any(t, nonzero);
    if (t.rank == 0) q.active[i] = nonzero ? 1.0f : 0.0f;
  }
}

// ---- the chunk loop -----------------------------------------------------------------------------------

unsigned blocks_for(int64_t items, int64_t per_block) {
  return static_cast<unsigned>(std::min<int64_t>((items + per_block - 1) / per_block, int64_t(1) << 30));
}

// T: the storage type of x and y; TS: the compute type of S; TW: of the products with W.
template <class T, class TS, class TW>
void run_pass(const PairProblem& p, const Pass& pass, void* workspace, int64_t workspace_bytes, cudaStream_t stream) {
  FL_CHECK_ARG(p.kind != LossKind::InfoNCE, p.op_name, ": InfoNCE runs on the fused tiles of info_nce_cuda.cu");
  const bool gradient = pass.grad_x != nullptr;
  Workspace ws;
  const int64_t needed = layout(p, gradient, static_cast<char*>(workspace), ws);
  FL_CHECK_ARG(workspace != nullptr && workspace_bytes >= needed, p.op_name, ": workspace of ", workspace_bytes,
               " bytes is smaller than the ", needed, " bytes needed");
  const T* x = static_cast<const T*>(p.x);
  const T* y = static_cast<const T*>(p.y);
  const int64_t n = p.n, m = p.m, dim = p.dim;
  const bool distances = uses_distance(p);
  if (distances) {
    squared_norms_kernel<T><<<blocks_for(n, kWarpsPerBlock), kThreads, 0, stream>>>(x, n, dim, ws.x_sqnorm);
    FL_CUDA_CHECK_LAUNCH(squared_norms_kernel);
    squared_norms_kernel<T><<<blocks_for(m, kWarpsPerBlock), kThreads, 0, stream>>>(y, m, dim, ws.y_sqnorm);
    FL_CUDA_CHECK_LAUNCH(squared_norms_kernel);
  }
  RowParams q{};
  q.kind = p.kind;
  q.p0 = static_cast<float>(p.p0);
  q.p1 = static_cast<float>(p.p1);
  q.p2 = static_cast<float>(p.p2);
  q.p3 = static_cast<float>(p.p3);
  q.option = p.option;
  q.m = m;
  q.s = ws.s;
  q.cls = ws.cls;
  q.targets = p.targets;
  q.terms = pass.terms;
  q.counts = pass.counts;
  q.stats = pass.stats;
  q.w = gradient ? ws.w : nullptr;
  q.unit = pass.unit_grad;
  q.saved_stats = pass.saved_stats;
  q.grad_row = pass.grad_row;
  q.active = pass.row_active;
  ClassifyParams c{};
  c.m = m;
  c.labelled = uses_labels(p.kind);
  c.labels_x = p.labels_x;
  c.labels_y = p.labels_y;
  c.has_target = p.kind == LossKind::AUC;
  c.targets = p.targets;
  c.self_offset = p.self_offset;
  c.cls = ws.cls;

  for (int64_t r0 = 0; r0 < n; r0 += ws.rows) {
    const int64_t rows = std::min(ws.rows, n - r0);
    const T* x_chunk = x + r0 * dim;
    cuda_gemm::gemm<TS>(rows, m, dim, View<T>{x_chunk, dim, 1}, View<T>{y, 1, dim}, 1.0f, 0.0f, ws.s, m, stream);
    if (distances) {
      distances_kernel<T><<<blocks_for(rows * m, kThreads), kThreads, 0, stream>>>(x_chunk, y, rows, m, dim,
                                                                                 ws.x_sqnorm + r0, ws.y_sqnorm, ws.s);
      FL_CUDA_CHECK_LAUNCH(distances_kernel);
    }
    c.r0 = r0;
    c.rows = rows;
    classify_kernel<<<blocks_for(rows * m, kThreads * 4), kThreads, 0, stream>>>(c);
    FL_CUDA_CHECK_LAUNCH(classify_kernel);
    if (p.pos_ptr != nullptr) {
      positive_lists_kernel<<<blocks_for(rows, kWarpsPerBlock), kThreads, 0, stream>>>(c, p.pos_ptr, p.pos_idx);
      FL_CUDA_CHECK_LAUNCH(positive_lists_kernel);
    }
    q.r0 = r0;
    q.rows = rows;
    if (m <= kWarpRowMaxColumns) {
      rows_kernel<WarpTeam><<<blocks_for(rows, kWarpsPerBlock), kThreads, 0, stream>>>(q);
    } else {
      rows_kernel<BlockTeam<kThreads>><<<blocks_for(rows, 1), kThreads, 0, stream>>>(q);
    }
    FL_CUDA_CHECK_LAUNCH(rows_kernel);
    if (gradient) {
      // dX rows = W Y;  dY (+)= W^T X_chunk, the first chunk overwriting whatever dY held.
      cuda_gemm::gemm<TW>(rows, dim, m, View<float>{ws.w, m, 1}, View<T>{y, dim, 1}, 1.0f, 0.0f,
                          pass.grad_x + r0 * dim, dim, stream);
      cuda_gemm::gemm<TW>(m, dim, rows, View<float>{ws.w, 1, m}, View<T>{x_chunk, dim, 1}, 1.0f,
                          r0 == 0 ? 0.0f : 1.0f, pass.grad_y, dim, stream);
    }
  }
  // dL/dscale: only InfoNCE has a scale.
  if (gradient) FL_CUDA_CHECK(cudaMemsetAsync(pass.grad_scale, 0, sizeof(float), stream));
}

void run(const PairProblem& p, const Pass& pass, void* workspace, int64_t workspace_bytes, cudaStream_t stream) {
  if (p.kind == LossKind::InfoNCE) {  // no whole rows needed: the fused tiles of info_nce_cuda.cu
    cuda_detail::run_info_nce(p, pass, workspace, workspace_bytes, stream);
    return;
  }
  switch (p.dtype) {
    case DType::Float32: run_pass<float, float, float>(p, pass, workspace, workspace_bytes, stream); return;
    case DType::Float16:  // W's entries fall below float16's range: its products run in fp32
      run_pass<__half, __half, float>(p, pass, workspace, workspace_bytes, stream);
      return;
    case DType::BFloat16:
      run_pass<__nv_bfloat16, __nv_bfloat16, __nv_bfloat16>(p, pass, workspace, workspace_bytes, stream);
      return;
    case DType::Float64: break;
  }
  fl::throw_invalid_argument(p.op_name, ": the CUDA kernels take float32, float16 or bfloat16, got ",
                             dtype_name(p.dtype));
}

void require_cuda_problem(const PairProblem& p) {
  validate(p);
  FL_CHECK_ARG(p.dtype != DType::Float64, p.op_name,
               ": the CUDA kernels take float32, float16 or bfloat16 (float64 runs on the CPU), got float64");
}

// The index vectors' values (targets, pos_ptr, pos_idx), checked on the device and reported through
// p.error: no host read. One grid-stride pass over them.
__global__ void check_indices_kernel(PairProblem p, int64_t pos_entries) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < p.n + 1 + pos_entries;
       e += stride) {
    if (e < p.n) {
      if (p.targets != nullptr && (p.targets[e] < 0 || p.targets[e] >= p.m)) report_device_error(p.error, 0, e, p.targets[e]);
    } else if (e == p.n) {
      if (p.pos_ptr != nullptr && (p.pos_ptr[0] != 0 || p.pos_ptr[p.n] > pos_entries))
        report_device_error(p.error, 2, p.pos_ptr[0] != 0 ? 0 : p.n, p.pos_ptr[0] != 0 ? p.pos_ptr[0] : p.pos_ptr[p.n]);
    } else {
      const int64_t k = e - p.n - 1;
      if (p.pos_idx[k] < 0 || p.pos_idx[k] >= p.m) report_device_error(p.error, 1, k, p.pos_idx[k]);
    }
  }
  if (p.pos_ptr != nullptr) {
    for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < p.n; i += stride)
      if (p.pos_ptr[i + 1] < p.pos_ptr[i]) report_device_error(p.error, 2, i + 1, p.pos_ptr[i + 1]);
  }
}

void check_indices(const PairProblem& p, int64_t pos_entries, cudaStream_t stream) {
  if (p.error.claim == nullptr || (p.targets == nullptr && p.pos_ptr == nullptr)) return;
  const int64_t work = p.n + 1 + pos_entries;
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>((work + kThreads - 1) / kThreads, 1024));
  check_indices_kernel<<<blocks, kThreads, 0, stream>>>(p, pos_entries);
  FL_CUDA_CHECK_LAUNCH(check_indices_kernel);
}

// No rows: nothing reaches y or the scale.
void zero_gradients_of_empty_batch(const PairProblem& p, void* grad_y, void* grad_scale, cudaStream_t stream) {
  if (grad_y != nullptr && p.m * p.dim > 0)
    FL_CUDA_CHECK(cudaMemsetAsync(grad_y, 0, static_cast<size_t>(p.m * p.dim) * sizeof(float), stream));
  if (grad_scale != nullptr) FL_CUDA_CHECK(cudaMemsetAsync(grad_scale, 0, sizeof(float), stream));
}

}  // namespace

int64_t cuda_detail::chunk_budget_bytes() { return chunk_budget; }

void set_cuda_chunk_budget(int64_t bytes) { chunk_budget = bytes > 0 ? bytes : kChunkBudgetBytes; }

int64_t cuda_workspace_bytes(const PairProblem& p, bool gradient) {
  validate(p);
  if (p.n == 0) return 0;
  if (p.kind == LossKind::InfoNCE) return cuda_detail::info_nce_workspace_bytes(p, gradient);
  Workspace ws;
  return layout(p, gradient, nullptr, ws);
}

void forward_cuda(const PairProblem& p, const ForwardOut& out, void* workspace, int64_t workspace_bytes, int device,
                  cudaStream_t stream) {
  require_cuda_problem(p);
  FL_CHECK_ARG(out.unit_grad_x == nullptr || (!p.symmetric && p.kind != LossKind::Contrastive), p.op_name,
               ": the fused gradient is for single-term row losses (not symmetric InfoNCE or contrastive)");
  CudaDeviceGuard guard(device);
  if (p.n == 0) {
    zero_gradients_of_empty_batch(p, out.unit_grad_y, out.unit_grad_scale, stream);
    return;
  }
  check_indices(p, p.pos_ptr != nullptr ? p.pos_entries : 0, stream);
  run(p, forward_pass<float>(out), workspace, workspace_bytes, stream);
}

void backward_cuda(const PairProblem& p, const BackwardArgs& a, void* workspace, int64_t workspace_bytes, int device,
                   cudaStream_t stream) {
  require_cuda_problem(p);
  CudaDeviceGuard guard(device);
  if (p.n == 0) {
    zero_gradients_of_empty_batch(p, a.grad_y, a.grad_scale, stream);
    return;
  }
  run(p, backward_pass<float>(a), workspace, workspace_bytes, stream);
}

}  // namespace fl::metric
