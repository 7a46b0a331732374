// CUDA kernels for the spherical-family losses on dense logits.
//
// Forward reads each logit once: lanes (a warp for short rows, a block for long
// ones) accumulate shifted sums, reduce them to row moments with Chan's merge,
// and apply the shared loss head. Long rows with few of them are split into
// chunks across blocks; a small finalize kernel then merges the chunk moments.
// Backward reads each logit once more and writes the gradient once, so
// forward + backward moves the floor of 2 reads + 1 write.
#include <algorithm>

#include "common/cuda_check.cuh"
#include "common/cuda_numeric.cuh"
#include "common/cuda_reduce.cuh"
#include "common/cuda_vector.cuh"
#include "spherical/dense_loss.h"

namespace fl {
namespace spherical {
namespace {

constexpr const char* kForwardName = "fastloss.spherical dense_loss_forward_cuda";
constexpr const char* kBackwardName = "fastloss.spherical dense_loss_backward_cuda";
constexpr int kThreads = 256;
constexpr int64_t kWarpRowMaxCols = 4096;    // rows up to this length: one warp each
constexpr int64_t kMinForwardChunk = 16384;  // a block reads at least this many elements of a row
constexpr int64_t kBackwardChunk = 8192;     // elements of a row per backward block
constexpr int64_t kFlatBackwardMaxCols = 2048;

template <class Acc>
struct MergeMoments {
  __device__ Moments<Acc> operator()(const Moments<Acc>& a, const Moments<Acc>& b) const { return merge_moments(a, b); }
};

struct ForwardPlan {
  int lanes_per_task;  // 32 (warp per row) or kThreads (block per row chunk)
  int64_t chunks;      // chunks per row
  int64_t chunk_len;
};

ForwardPlan plan_forward(int64_t rows, int64_t cols, int device) {
  if (cols <= kWarpRowMaxCols) return ForwardPlan{32, 1, cols};
  const int64_t target_blocks = 4 * static_cast<int64_t>(cuda_sm_count(device));
  const int64_t max_chunks = std::max<int64_t>(1, cols / kMinForwardChunk);
  int64_t chunks = std::min<int64_t>(max_chunks, std::max<int64_t>(1, (target_blocks + rows - 1) / std::max<int64_t>(rows, 1)));
  int64_t chunk_len = (cols + chunks - 1) / chunks;
  chunk_len = (chunk_len + 63) / 64 * 64;  // keeps chunk starts 16-byte aligned in aligned rows
  chunks = (cols + chunk_len - 1) / chunk_len;
  return ForwardPlan{kThreads, chunks, chunk_len};
}

__device__ __forceinline__ bool target_is_valid(int64_t t, int64_t cols) {
  return t >= 0 && t < cols;
}

template <class T, class Acc>
__device__ __forceinline__ void write_head(const DenseLossProblem& p, int64_t row, const Moments<Acc>& moments,
                                           Acc* loss, Acc* coef) {
  const int64_t t = p.target[row];
  const T* logits = static_cast<const T*>(p.logits);
  const bool valid = target_is_valid(t, p.cols);
  if (!valid) report_device_error(p.error, row, t, p.cols);
  const HeadResult<Acc> head =
      valid ? evaluate_head<Acc>(p.params, to_acc(logits[row * p.row_stride + t]), moments) : nan_head<Acc>();
  loss[row] = head.loss;
  store_row_gradient(coef + row * kCoefficientsPerRow, head.grad);
}

// One task = (row, chunk), handled by kLanes consecutive threads.
template <class T, class Acc, int kLanes>
__global__ void __launch_bounds__(kThreads) row_moments_kernel(DenseLossProblem p, int64_t chunks, int64_t chunk_len,
                                                               Acc* __restrict__ loss, Acc* __restrict__ coef,
                                                               Acc* __restrict__ partial) {
  constexpr int kTasksPerBlock = kThreads / kLanes;
  __shared__ Moments<Acc> scratch[kThreads / 32];
  const int64_t task = static_cast<int64_t>(blockIdx.x) * kTasksPerBlock + threadIdx.x / kLanes;
  const int lane = threadIdx.x % kLanes;
  if (task >= p.rows * chunks) return;  // uniform over a task's lanes (the whole block when kLanes == kThreads)
  const int64_t row = task / chunks;
  const int64_t chunk = task % chunks;
  const int64_t t = p.target[row];
  if (t == p.ignore_index) {
    if (chunks == 1 && lane == 0) {
      loss[row] = Acc(0);
      store_row_gradient(coef + row * kCoefficientsPerRow, zero_head<Acc>().grad);
    }
    return;
  }
  const int64_t begin = chunk * chunk_len;
  const int64_t end = p.cols < begin + chunk_len ? p.cols : begin + chunk_len;
  const T* x = static_cast<const T*>(p.logits) + row * p.row_stride;

  ShiftedSums<Acc> sums(to_acc(x[begin + (lane < end - begin ? lane : end - begin - 1)]));
  for_each_element(x, begin, end, lane, kLanes, [&](int64_t, T value) { sums.push(to_acc(value)); });
  Moments<Acc> moments = sums.moments();
  if constexpr (kLanes == 32) {
    moments = warp_allreduce<32>(moments, MergeMoments<Acc>{});
  } else {
    moments = block_allreduce<kThreads>(moments, MergeMoments<Acc>{}, scratch);
  }
  if (lane != 0) return;
  if (chunks == 1) {
    write_head<T, Acc>(p, row, moments, loss, coef);
  } else {
    partial[2 * task] = moments.mean;
    partial[2 * task + 1] = moments.m2;
  }
}

// One warp per row: merge the chunk moments and apply the head.
template <class T, class Acc>
__global__ void __launch_bounds__(kThreads) finalize_kernel(DenseLossProblem p, int64_t chunks, int64_t chunk_len,
                                                            const Acc* __restrict__ partial, Acc* __restrict__ loss,
                                                            Acc* __restrict__ coef) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (kThreads / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= p.rows) return;
  if (p.target[row] == p.ignore_index) {
    if (lane == 0) {
      loss[row] = Acc(0);
      store_row_gradient(coef + row * kCoefficientsPerRow, zero_head<Acc>().grad);
    }
    return;
  }
  Moments<Acc> moments{Acc(0), Acc(0), Acc(0)};
  for (int64_t c = lane; c < chunks; c += 32) {
    const int64_t begin = c * chunk_len;
    const Acc count = static_cast<Acc>((p.cols < begin + chunk_len ? p.cols : begin + chunk_len) - begin);
    const int64_t task = row * chunks + c;
    moments = merge_moments(moments, Moments<Acc>{count, partial[2 * task], partial[2 * task + 1]});
  }
  moments = warp_allreduce<32>(moments, MergeMoments<Acc>{});
  if (lane == 0) write_head<T, Acc>(p, row, moments, loss, coef);
}

template <class T, class Acc>
__device__ __forceinline__ T gradient_element(const RowGradient<Acc>& g, Acc upstream, T x, bool is_target) {
  return CudaStore<T>::from(element_gradient(g, upstream, to_acc(x), is_target));
}

// Long rows: blocks over (row, chunk), 16-byte loads and stores.
template <class T, class Acc>
__global__ void __launch_bounds__(kThreads) backward_rows_kernel(DenseLossProblem p, const Acc* __restrict__ grad_loss,
                                                                 int64_t grad_loss_stride, const Acc* __restrict__ coef,
                                                                 T* __restrict__ grad, int64_t chunks) {
  const int64_t task = blockIdx.x;
  const int64_t row = task / chunks;
  const int64_t begin = (task % chunks) * kBackwardChunk;
  const int64_t end = p.cols < begin + kBackwardChunk ? p.cols : begin + kBackwardChunk;
  const int64_t t = p.target[row];
  const T* x = static_cast<const T*>(p.logits) + row * p.row_stride;
  T* out = grad + row * p.cols;
  if (t == p.ignore_index) {  // ignored rows: exact zeros, whatever the logits hold (inf included)
    for (int64_t k = begin + threadIdx.x; k < end; k += kThreads) out[k] = CudaStore<T>::from(Acc(0));
    return;
  }
  const RowGradient<Acc> g = load_row_gradient(coef + row * kCoefficientsPerRow);
  const Acc upstream = grad_loss[row * grad_loss_stride];
  transform_elements(x, out, begin, end, threadIdx.x, kThreads,
                     [&](int64_t k, T value) { return gradient_element(g, upstream, value, k == t); });
}

// Short rows: one thread per element over the flattened rows x cols.
template <class T, class Acc>
__global__ void __launch_bounds__(kThreads) backward_flat_kernel(DenseLossProblem p, const Acc* __restrict__ grad_loss,
                                                                 int64_t grad_loss_stride, const Acc* __restrict__ coef,
                                                                 T* __restrict__ grad) {
  // The caller guarantees rows * cols < 2^31: 32-bit index math (a 64-bit divide is ~10x dearer).
  const int total = static_cast<int>(p.rows * p.cols);
  const int cols = static_cast<int>(p.cols);
  const T* logits = static_cast<const T*>(p.logits);
  for (int i = blockIdx.x * kThreads + threadIdx.x; i < total; i += gridDim.x * kThreads) {
    const int row = i / cols;
    const int k = i - row * cols;
    const int64_t t = p.target[row];
    if (t == p.ignore_index) {
      grad[i] = CudaStore<T>::from(Acc(0));
      continue;
    }
    const RowGradient<Acc> g = load_row_gradient(coef + row * kCoefficientsPerRow);
    grad[i] = gradient_element(g, grad_loss[row * grad_loss_stride], logits[row * p.row_stride + k], k == t);
  }
}

// Grid x is limited to 2^31 - 1 blocks.
void check_grid(int64_t blocks, const char* where) {
  FL_CHECK_ARG(blocks < (int64_t(1) << 31), where, ": problem too large for one launch (", blocks, " blocks)");
}

template <class T>
void forward_typed(const DenseLossProblem& p, void* loss_out, void* coef_out, void* workspace, int64_t workspace_bytes,
                   int device, cudaStream_t stream) {
  using Acc = typename AccType<T>::type;
  Acc* loss = static_cast<Acc*>(loss_out);
  Acc* coef = static_cast<Acc*>(coef_out);
  const ForwardPlan plan = plan_forward(p.rows, p.cols, device);
  const int64_t tasks = p.rows * plan.chunks;
  Acc* partial = static_cast<Acc*>(workspace);
  if (plan.chunks > 1) {
    const int64_t needed = tasks * 2 * static_cast<int64_t>(sizeof(Acc));
    FL_CHECK_ARG(partial != nullptr && workspace_bytes >= needed, kForwardName,
                 ": workspace of ", workspace_bytes, " bytes is smaller than the ", needed, " bytes needed");
  }
  if (plan.lanes_per_task == 32) {
    const int64_t blocks = (tasks + kThreads / 32 - 1) / (kThreads / 32);
    check_grid(blocks, kForwardName);
    row_moments_kernel<T, Acc, 32><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(p, plan.chunks, plan.chunk_len,
                                                                                          loss, coef, partial);
    FL_CUDA_CHECK_LAUNCH(row_moments_kernel);
  } else {
    check_grid(tasks, kForwardName);
    row_moments_kernel<T, Acc, kThreads><<<static_cast<unsigned>(tasks), kThreads, 0, stream>>>(p, plan.chunks, plan.chunk_len,
                                                                                               loss, coef, partial);
    FL_CUDA_CHECK_LAUNCH(row_moments_kernel);
  }
  if (plan.chunks > 1) {
    const int64_t blocks = (p.rows + kThreads / 32 - 1) / (kThreads / 32);
    finalize_kernel<T, Acc><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(p, plan.chunks, plan.chunk_len,
                                                                                    partial, loss, coef);
    FL_CUDA_CHECK_LAUNCH(finalize_kernel);
  }
}

template <class T>
void backward_typed(const DenseLossProblem& p, const void* grad_loss, int64_t grad_loss_stride, const void* coef,
                    void* grad, int device, cudaStream_t stream) {
  using Acc = typename AccType<T>::type;
  if (p.cols <= kFlatBackwardMaxCols && p.rows * p.cols <= (int64_t(1) << 30)) {
    const int64_t total = p.rows * p.cols;
    const int64_t max_blocks = 32 * static_cast<int64_t>(cuda_sm_count(device));
    const int64_t blocks = std::min<int64_t>(max_blocks, (total + kThreads - 1) / kThreads);
    backward_flat_kernel<T, Acc><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        p, static_cast<const Acc*>(grad_loss), grad_loss_stride, static_cast<const Acc*>(coef), static_cast<T*>(grad));
    FL_CUDA_CHECK_LAUNCH(backward_flat_kernel);
    return;
  }
  const int64_t chunks = (p.cols + kBackwardChunk - 1) / kBackwardChunk;
  check_grid(p.rows * chunks, kBackwardName);
  backward_rows_kernel<T, Acc><<<static_cast<unsigned>(p.rows * chunks), kThreads, 0, stream>>>(
      p, static_cast<const Acc*>(grad_loss), grad_loss_stride, static_cast<const Acc*>(coef), static_cast<T*>(grad),
      chunks);
  FL_CUDA_CHECK_LAUNCH(backward_rows_kernel);
}

}  // namespace

int64_t dense_loss_forward_cuda_workspace_bytes(int64_t rows, int64_t cols, int device) {
  if (rows <= 0 || cols <= 0) return 0;
  const ForwardPlan plan = plan_forward(rows, cols, device);
  if (plan.chunks == 1) return 0;
  return rows * plan.chunks * 2 * static_cast<int64_t>(sizeof(double));  // room for either accumulator type
}

void dense_loss_forward_cuda(const DenseLossProblem& problem, void* loss, void* coef, void* workspace,
                             int64_t workspace_bytes, int device, cudaStream_t stream) {
  const char* where = kForwardName;
  validate_dense_shape(problem, where);
  validate_loss_params(problem.params, where);
  if (problem.rows == 0) return;
  CudaDeviceGuard guard(device);
  dispatch_float_types<__half, __nv_bfloat16>(problem.dtype, where, [&](auto tag) {
    forward_typed<typename decltype(tag)::type>(problem, loss, coef, workspace, workspace_bytes, device, stream);
  });
}

void dense_loss_backward_cuda(const DenseLossProblem& problem, const void* grad_loss, int64_t grad_loss_stride,
                              const void* coef, void* grad_logits, int device, cudaStream_t stream) {
  const char* where = kBackwardName;
  validate_dense_shape(problem, where);
  FL_CHECK_ARG(grad_loss_stride >= 0, where, ": grad_loss_stride must be >= 0, got ", grad_loss_stride);
  if (problem.rows == 0) return;
  CudaDeviceGuard guard(device);
  dispatch_float_types<__half, __nv_bfloat16>(problem.dtype, where, [&](auto tag) {
    backward_typed<typename decltype(tag)::type>(problem, grad_loss, grad_loss_stride, coef, grad_logits, device,
                                                 stream);
  });
}

}  // namespace spherical
}  // namespace fl
