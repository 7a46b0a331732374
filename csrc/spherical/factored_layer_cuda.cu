// CUDA kernels of the factored output layer (see factored_layer.h). Every step is one launch:
// head and prepare give a warp to each sample (lanes split the d features), gram a thread to each
// entry of the m x m matrix, scatter a block to each target entry (atomic) or to each distinct
// class in sorted order (deterministic: one block writes a row, adding its entries in order).
#include "common/cuda_check.cuh"
#include "common/cuda_reduce.cuh"
#include "spherical/factored_dispatch.h"
#include "spherical/factored_head.h"
#include "spherical/factored_layer.h"

namespace fl {
namespace spherical {
namespace {

constexpr const char* kHeadName = "fastloss.spherical factored_head_cuda";
constexpr const char* kPrepareName = "fastloss.spherical factored_prepare_cuda";
constexpr const char* kGramName = "fastloss.spherical factored_gram_cuda";
constexpr const char* kScatterName = "fastloss.spherical factored_scatter_cuda";
constexpr const char* kGroupName = "fastloss.spherical factored_group_cuda";
constexpr int kThreads = 256;
constexpr int kWarpsPerBlock = kThreads / 32;
constexpr int kGramTile = 16;

struct Sum {
  template <class T>
  __device__ T operator()(T a, T b) const {
    return a + b;
  }
};

template <class T, class W>
__device__ __forceinline__ T warp_dot(const T* x, const W* y, int64_t n, int lane) {
  T sum = T(0);
  for (int64_t i = lane; i < n; i += 32) sum += x[i] * static_cast<T>(y[i]);
  return warp_allreduce<32>(sum, Sum{});
}

unsigned blocks_for(int64_t items, int64_t per_block) {
  return static_cast<unsigned>((items + per_block - 1) / per_block);
}

// One block per target entry (scatter, group): the grid and a block width that covers d.
struct EntryGrid {
  unsigned blocks;
  int threads;
};

EntryGrid entry_grid(const FactoredProblem& p, const char* where) {
  const int64_t entries = p.samples * p.targets_per_sample;
  FL_CHECK_ARG(entries < (int64_t(1) << 31), where, ": too many target entries (", entries, ")");
  const int threads = p.features >= kThreads ? kThreads : static_cast<int>((p.features + 31) / 32 * 32);
  return EntryGrid{static_cast<unsigned>(entries), threads};
}

template <class T, class W>
__global__ void __launch_bounds__(kThreads) head_kernel(FactoredProblem p, T* __restrict__ loss, T* __restrict__ partials) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (j >= p.samples) return;
  const int64_t d = p.features, K = p.targets_per_sample;
  const T* row = static_cast<const T*>(p.sh) + j * packed_width(d);
  const W* v = static_cast<const W*>(p.weight_rows);
  const int64_t* classes_of = p.target + j * K;
  T* out = partials + j * (K + 2);
  for (int64_t k = 0; k < K; ++k) {
    const int64_t c = classes_of[k];
    const bool valid = entry_is_target(c, p.classes);  // uniform over the warp
    const T a = valid ? warp_dot(row, v + c * d, d, lane) + row[omega_slot(d)] : T(0);
    if (lane == 0) out[k] = a;
    if (lane == 0 && !valid && c != p.ignore_index) report_device_error(p.error, j * K + k, c, p.classes);
  }
  const T q = warp_dot(static_cast<const T*>(p.h) + j * d, row + quad_offset(d), d, lane);
  if (lane != 0) return;
  const T* weights = p.target_weight ? static_cast<const T*>(p.target_weight) + j * K : nullptr;
  const SamplePartials<T> r =
      sample_head<T>(p.params, classes_of, weights, out, out, K, p.ignore_index, p.classes, row[wbar_slot(d)], q);
  loss[j] = r.loss;
  out[K] = r.d_sum;
  out[K + 1] = r.d_sum_of_squares;
}

template <class T, class W>
__global__ void __launch_bounds__(kThreads)
    prepare_kernel(FactoredProblem p, const T* __restrict__ partials, const T* __restrict__ grad_loss,
                   int64_t grad_stride, T* __restrict__ ytilde, T* __restrict__ scaled, T* __restrict__ coef) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (j >= p.samples) return;
  const int64_t d = p.features, K = p.targets_per_sample;
  const T g = has_target(p, j) ? grad_loss[j * grad_stride] : T(0);
  const T* in = partials + j * (K + 2);
  const int64_t* classes_of = p.target + j * K;
  const W* v = static_cast<const W*>(p.weight_rows);
  for (int64_t k = lane; k < K + 2; k += 32) scaled[j * (K + 2) + k] = g * in[k];
  T ybar = T(0);
  for (int64_t k = 0; k < K; ++k)
    if (entry_is_target(classes_of[k], p.classes)) ybar += g * in[k];
  const T gs = g * in[K], gq = g * in[K + 1];
  const T* hj = static_cast<const T*>(p.h) + j * d;
  T* y = ytilde + j * packed_width(d);
  for (int64_t i = lane; i < d; i += 32) {
    T acc = T(0);
    for (int64_t k = 0; k < K; ++k) {
      const int64_t c = classes_of[k];
      if (entry_is_target(c, p.classes)) acc += g * in[k] * static_cast<T>(v[c * d + i]);
    }
    y[i] = acc;
    y[quad_offset(d) + i] = T(2) * gq * hj[i];
  }
  if (lane != 0) return;
  const T* row = static_cast<const T*>(p.sh) + j * packed_width(d);
  y[omega_slot(d)] = ybar;
  y[wbar_slot(d)] = gs;
  coef[2 * j] = T(2) * gq * row[omega_slot(d)] + gs;
  coef[2 * j + 1] = ybar + T(2) * gq * row[wbar_slot(d)] + T(p.classes) * gs;
}

template <class T>
__global__ void gram_kernel(FactoredProblem p, const T* __restrict__ scaled, const T* __restrict__ hg,
                            const T* __restrict__ mh, T* __restrict__ gram) {
  const int64_t i = static_cast<int64_t>(blockIdx.y) * kGramTile + threadIdx.y;
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kGramTile + threadIdx.x;
  const int64_t m = p.samples, K = p.targets_per_sample;
  if (i >= m || j >= m) return;
  gram[i * m + j] = gram_entry<T>(p.target + i * K, scaled + i * (K + 2), p.target + j * K, scaled + j * (K + 2), K,
                                  p.classes, hg[i * m + j], hg[j * m + i], mh[i * m + j]);
}

template <class T, class W>
__global__ void __launch_bounds__(kThreads)
    scatter_atomic_kernel(FactoredProblem p, W* __restrict__ v, const T* __restrict__ scaled, const T* __restrict__ r,
                          T lr) {
  const int64_t e = blockIdx.x;
  const int64_t K = p.targets_per_sample, d = p.features;
  const int64_t c = p.target[e];
  if (!entry_is_target(c, p.classes)) return;
  const int64_t j = e / K;
  const T step = lr * scaled[j * (K + 2) + e % K];
  for (int64_t i = threadIdx.x; i < d; i += blockDim.x) atomicAdd(v + c * d + i, static_cast<W>(-step * r[j * d + i]));
}

template <class T, class W>
__global__ void __launch_bounds__(kThreads)
    scatter_sorted_kernel(FactoredProblem p, W* __restrict__ v, const T* __restrict__ scaled, const T* __restrict__ r,
                          T lr, const int64_t* __restrict__ order) {
  const int64_t position = blockIdx.x;
  const int64_t K = p.targets_per_sample, d = p.features, entries = p.samples * K;
  const int64_t c = p.target[order[position]];
  if (!entry_is_target(c, p.classes)) return;
  for (int64_t i = threadIdx.x; i < d; i += blockDim.x) {
    T sum;
    if (!class_segment_sum<T>(p.target, order, entries, position, K, scaled, [&](int64_t j) { return r[j * d + i]; }, sum))
      return;  // not the first entry of its class (uniform over the block)
    v[c * d + i] = static_cast<W>(static_cast<T>(v[c * d + i]) - lr * sum);
  }
}

template <class T>
__global__ void __launch_bounds__(kThreads)
    group_kernel(FactoredProblem p, const T* __restrict__ scaled, const int64_t* __restrict__ order, T* __restrict__ grouped) {
  const int64_t position = blockIdx.x;
  const int64_t K = p.targets_per_sample, d = p.features, entries = p.samples * K;
  const T* h = static_cast<const T*>(p.h);
  for (int64_t i = threadIdx.x; i < d; i += blockDim.x) {
    T sum = T(0);
    class_segment_sum<T>(p.target, order, entries, position, K, scaled, [&](int64_t j) { return h[j * d + i]; }, sum);
    grouped[position * d + i] = sum;
  }
}

}  // namespace

void factored_head_cuda(const FactoredProblem& p, void* loss, void* partials, int device, cudaStream_t stream) {
  validate_factored_problem(p, kHeadName);
  if (p.samples == 0) return;
  CudaDeviceGuard guard(device);
  dispatch_factored_types(p, kHeadName, [&](auto st, auto wt) {
    using T = typename decltype(st)::type;
    using W = typename decltype(wt)::type;
    head_kernel<T, W><<<blocks_for(p.samples, kWarpsPerBlock), kThreads, 0, stream>>>(p, static_cast<T*>(loss),
                                                                                       static_cast<T*>(partials));
    FL_CUDA_CHECK_LAUNCH(head_kernel);
  });
}

void factored_prepare_cuda(const FactoredProblem& p, const void* partials, const void* grad_loss, int64_t grad_stride,
                           void* ytilde, void* scaled, void* coef, int device, cudaStream_t stream) {
  validate_factored_problem(p, kPrepareName);
  FL_CHECK_ARG(grad_stride >= 0, kPrepareName, ": grad_stride must be >= 0, got ", grad_stride);
  if (p.samples == 0) return;
  CudaDeviceGuard guard(device);
  dispatch_factored_types(p, kPrepareName, [&](auto st, auto wt) {
    using T = typename decltype(st)::type;
    using W = typename decltype(wt)::type;
    prepare_kernel<T, W><<<blocks_for(p.samples, kWarpsPerBlock), kThreads, 0, stream>>>(
        p, static_cast<const T*>(partials), static_cast<const T*>(grad_loss), grad_stride, static_cast<T*>(ytilde),
        static_cast<T*>(scaled), static_cast<T*>(coef));
    FL_CUDA_CHECK_LAUNCH(prepare_kernel);
  });
}

void factored_gram_cuda(const FactoredProblem& p, const void* scaled, const void* hg, const void* mh, void* gram,
                        int device, cudaStream_t stream) {
  validate_factored_problem(p, kGramName);
  if (p.samples == 0) return;
  FL_CHECK_ARG(blocks_for(p.samples, kGramTile) <= 65535u, kGramName, ": the m x m form takes at most ",
               65535 * kGramTile, " samples, got ", p.samples);
  CudaDeviceGuard guard(device);
  dispatch_factored_types(p, kGramName, [&](auto st, auto) {
    using T = typename decltype(st)::type;
    const dim3 grid(blocks_for(p.samples, kGramTile), blocks_for(p.samples, kGramTile));
    gram_kernel<T><<<grid, dim3(kGramTile, kGramTile), 0, stream>>>(
        p, static_cast<const T*>(scaled), static_cast<const T*>(hg), static_cast<const T*>(mh), static_cast<T*>(gram));
    FL_CUDA_CHECK_LAUNCH(gram_kernel);
  });
}

void factored_scatter_cuda(const FactoredProblem& p, void* weight_rows, const void* scaled, const void* r, double lr,
                           const int64_t* order, int device, cudaStream_t stream) {
  validate_factored_problem(p, kScatterName);
  if (p.samples == 0) return;
  const EntryGrid grid = entry_grid(p, kScatterName);
  CudaDeviceGuard guard(device);
  dispatch_factored_types(p, kScatterName, [&](auto st, auto wt) {
    using T = typename decltype(st)::type;
    using W = typename decltype(wt)::type;
    if (order == nullptr) {
      scatter_atomic_kernel<T, W><<<grid.blocks, grid.threads, 0, stream>>>(
          p, static_cast<W*>(weight_rows), static_cast<const T*>(scaled), static_cast<const T*>(r), static_cast<T>(lr));
      FL_CUDA_CHECK_LAUNCH(scatter_atomic_kernel);
    } else {
      scatter_sorted_kernel<T, W><<<grid.blocks, grid.threads, 0, stream>>>(
          p, static_cast<W*>(weight_rows), static_cast<const T*>(scaled), static_cast<const T*>(r), static_cast<T>(lr),
          order);
      FL_CUDA_CHECK_LAUNCH(scatter_sorted_kernel);
    }
  });
}

void factored_group_cuda(const FactoredProblem& p, const void* scaled, const int64_t* order, void* grouped, int device,
                         cudaStream_t stream) {
  validate_factored_problem(p, kGroupName);
  if (p.samples == 0) return;
  const EntryGrid grid = entry_grid(p, kGroupName);
  CudaDeviceGuard guard(device);
  dispatch_factored_types(p, kGroupName, [&](auto st, auto) {
    using T = typename decltype(st)::type;
    group_kernel<T><<<grid.blocks, grid.threads, 0, stream>>>(p, static_cast<const T*>(scaled), order,
                                                                              static_cast<T*>(grouped));
    FL_CUDA_CHECK_LAUNCH(group_kernel);
  });
}

}  // namespace spherical
}  // namespace fl
