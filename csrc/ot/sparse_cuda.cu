// CUDA kernels of the sparsity-constrained quadratic OT dual (sparse_cpu.cpp is the CPU twin).
// Column pass: one thread per column (coalesced: neighbouring threads read neighbouring columns of a
// row), keeping the column's k largest scores alpha_i - C_ij in a sorted register array (k <= 32),
// then the column sums. Row pass: one warp per row for the row sums.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "common/cuda_check.cuh"
#include "common/cuda_numeric.cuh"
#include "ot/ot_kernels.h"
#include "ot/sparse_dual.h"

namespace fl::ot {
namespace {

constexpr int kThreads = 256;

template <class DT, class Acc>
__global__ void __launch_bounds__(kThreads)
    sparse_columns_kernel(const DT* cost, int64_t n, int64_t m, int64_t k, const Acc* alpha, const Acc* beta,
                          Acc inv_gamma, Acc* col_sum, Acc* col_cost, Acc* col_sq, Acc* threshold) {
  const int64_t b = blockIdx.y;
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (j >= m) return;
  const DT* c = cost + b * n * m + j;
  const Acc* al = alpha + b * n;
  const int64_t index = b * m + j;
  Acc tau = -static_cast<Acc>(INFINITY);
  if (k > 0 && k < n) {
    // top[0] >= top[1] >= ... >= top[k-1]: insertion keeps the k largest seen so far.
    Acc top[kSparseMaxKCuda];
    for (int t = 0; t < kSparseMaxKCuda; ++t) top[t] = -static_cast<Acc>(INFINITY);
    bool has_nan = false;
    for (int64_t i = 0; i < n; ++i) {
      const Acc score = sparse_score<Acc>(al[i], to_acc(c[i * m]));
      has_nan |= score != score;
      if (!(score > top[k - 1])) continue;
      int pos = static_cast<int>(k) - 1;
      while (pos > 0 && top[pos - 1] < score) {
        top[pos] = top[pos - 1];
        --pos;
      }
      top[pos] = score;
    }
    tau = has_nan ? quiet_nan<Acc>() : top[k - 1];  // a NaN score has no rank: as the CPU
  }
  threshold[index] = tau;
  Acc sum = 0, weighted = 0, sq = 0;
  for (int64_t i = 0; i < n; ++i) {
    const Acc cij = to_acc(c[i * m]);
    const Acc t = sparse_plan_entry<Acc>(sparse_score<Acc>(al[i], cij), beta[index], tau, inv_gamma);
    sum += t;
    weighted += t != Acc(0) ? t * cij : Acc(0);  // 0 * inf is no cost; NaN stays
    sq += t * t;
  }
  col_sum[index] = sum;
  col_cost[index] = weighted;
  col_sq[index] = sq;
}

template <class DT, class Acc>
__global__ void __launch_bounds__(kThreads)
    sparse_rows_kernel(const DT* cost, int64_t n, int64_t m, const Acc* alpha, const Acc* beta, const Acc* threshold,
                       Acc inv_gamma, Acc* row_sum) {
  const int64_t b = blockIdx.y;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * (kThreads / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (i >= n) return;
  const DT* row = cost + (b * n + i) * m;
  const Acc a_i = alpha[b * n + i];
  Acc sum = 0;
  for (int64_t j = lane; j < m; j += 32)
    sum += sparse_plan_entry<Acc>(sparse_score<Acc>(a_i, to_acc(row[j])), beta[b * m + j], threshold[b * m + j],
                                  inv_gamma);
#pragma unroll
  for (int mask = 16; mask > 0; mask /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, mask);
  if (lane == 0) row_sum[b * n + i] = sum;
}

template <class T, class Acc>
void launch(const SparseDualArgs& a, cudaStream_t stream) {
  const Geometry& g = a.geom;
  if (g.batch == 0 || g.n == 0 || g.m == 0) return;
  FL_CHECK_ARG(g.batch <= 65535, "fastloss.ot.sparse_ot: at most 65535 problems per call on CUDA, got ", g.batch);
  using DT = typename DeviceType<T>::type;
  const DT* cost = static_cast<const DT*>(g.cost);
  const Acc inv_gamma = static_cast<Acc>(1.0 / a.gamma);
  const auto* alpha = static_cast<const Acc*>(a.alpha);
  const auto* beta = static_cast<const Acc*>(a.beta);
  auto* threshold = static_cast<Acc*>(a.threshold);
  const unsigned batch = static_cast<unsigned>(g.batch);
  sparse_columns_kernel<DT, Acc><<<dim3(static_cast<unsigned>((g.m + kThreads - 1) / kThreads), batch), kThreads, 0,
                                   stream>>>(cost, g.n, g.m, a.k, alpha, beta, inv_gamma, static_cast<Acc*>(a.col_sum),
                                             static_cast<Acc*>(a.col_cost), static_cast<Acc*>(a.col_sq), threshold);
  FL_CUDA_CHECK_LAUNCH(sparse_columns_kernel);
  constexpr int kRowsPerBlock = kThreads / 32;
  sparse_rows_kernel<DT, Acc><<<dim3(static_cast<unsigned>((g.n + kRowsPerBlock - 1) / kRowsPerBlock), batch),
                                kThreads, 0, stream>>>(cost, g.n, g.m, alpha, beta, threshold, inv_gamma,
                                                       static_cast<Acc*>(a.row_sum));
  FL_CUDA_CHECK_LAUNCH(sparse_rows_kernel);
}

}  // namespace

void sparse_dual_cuda(const SparseDualArgs& a, int device, cudaStream_t stream) {
  validate_sparse_dual(a, true);
  CudaDeviceGuard guard(device);
  switch (a.geom.dtype) {
    case DType::Float32: launch<float, float>(a, stream); break;
    case DType::Float64: launch<double, double>(a, stream); break;
    case DType::Float16: launch<Half, float>(a, stream); break;
    case DType::BFloat16: launch<BFloat16, float>(a, stream); break;
  }
}

}  // namespace fl::ot
