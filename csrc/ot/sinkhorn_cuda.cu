// CUDA launchers of the Sinkhorn family and the solver backend. The loop itself is sinkhorn_loop.h;
// here it gets device-side convergence: a reduction kernel marks converged problems in done_at, the
// count of running problems is copied to pinned host memory behind an event, and the host reads it
// only once the event has passed (or when kMaxChecksInFlight checks are pending), so it never waits
// on an iteration in progress. Under CUDA-graph capture nothing is read: max_iter iterations are
// recorded and converged problems skip their work.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <mutex>
#include <type_traits>
#include <vector>

#include "common/cuda_check.cuh"
#include "ot/cuda_kernels.cuh"
#include "ot/ot_kernels.h"
#include "ot/sinkhorn_loop.h"
#include "ot/solve_workspace.h"

namespace fl::ot {
namespace {

using namespace fl::ot::cuda;

constexpr int64_t kMaxGridY = 65535;

void check_batch(const Geometry& g, const char* op) {
  FL_CHECK_ARG(g.batch <= kMaxGridY, op, ": at most ", kMaxGridY, " problems per call on CUDA, got ", g.batch);
}

unsigned blocks_for(int64_t count, int64_t per_block) { return static_cast<unsigned>((count + per_block - 1) / per_block); }

// ---- softmin --------------------------------------------------------------------------------

template <class T, class Acc>
void launch_softmin(const SoftminArgs& a, cudaStream_t stream) {
  const Geometry& g = a.geom;
  if (g.batch == 0 || g.n == 0 || g.m == 0) return;
  using DT = typename DeviceType<T>::type;
  SoftminParams<DT, Acc> p{};
  static_cast<OrientedGeometry<DT, Acc>&>(p) = orient<DT, Acc>(g, a.transpose);
  p.h = static_cast<const Acc*>(a.h);
  p.log_w = static_cast<const Acc*>(a.log_w);
  p.out = static_cast<Acc*>(a.out);
  p.old = static_cast<const Acc*>(a.old);
  p.log_w_dst = static_cast<const Acc*>(a.log_w_dst);
  p.row_err = static_cast<Acc*>(a.row_err);
  p.done_at = a.done_at;
  p.iteration = a.iteration;
  p.eps = static_cast<Acc>(a.eps);
  p.inv_eps = Acc(1) / p.eps;
  p.damping = static_cast<Acc>(a.damping);
  const unsigned batch = static_cast<unsigned>(g.batch);
  if (g.p == 0 && !a.transpose) {
    dense_rows_softmin_kernel<DT, Acc><<<dim3(blocks_for(g.n, kWarps), batch), kThreads, 0, stream>>>(p);
    FL_CUDA_CHECK_LAUNCH(dense_rows_softmin_kernel);
  } else if (g.p == 0) {
    dense_cols_softmin_kernel<DT, Acc><<<dim3(blocks_for(g.m, kColTile), batch), kThreads, 0, stream>>>(p);
    FL_CUDA_CHECK_LAUNCH(dense_cols_softmin_kernel);
  } else {
    if constexpr (std::is_same_v<T, Acc>) {
      constexpr int kTile = 16 * tile_per_thread<Acc>();
      points_softmin_kernel<Acc><<<dim3(blocks_for(p.len_dst, kTile), batch), kThreads, 0, stream>>>(p);
      FL_CUDA_CHECK_LAUNCH(points_softmin_kernel);
    } else {
      throw_invalid_argument("fastloss.ot: points must be float32 or float64");
    }
  }
}

// ---- transport and plan ---------------------------------------------------------------------

template <class T, class Acc>
void launch_transport(const TransportArgs& a, cudaStream_t stream) {
  const Geometry& g = a.geom;
  if (g.batch == 0 || g.n == 0 || g.m == 0) return;
  using DT = typename DeviceType<T>::type;
  TransportParams<DT, Acc> p{};
  static_cast<OrientedGeometry<DT, Acc>&>(p) = orient<DT, Acc>(g, a.transpose);
  p.pot_dst = static_cast<const Acc*>(a.transpose ? a.g : a.f);
  p.pot_src = static_cast<const Acc*>(a.transpose ? a.f : a.g);
  p.lw_dst = static_cast<const Acc*>(a.transpose ? a.log_b : a.log_a);
  p.lw_src = static_cast<const Acc*>(a.transpose ? a.log_a : a.log_b);
  p.mass = static_cast<Acc*>(a.mass);
  p.cost_out = static_cast<Acc*>(a.cost);
  p.grad = static_cast<Acc*>(a.grad);
  p.src_weight = static_cast<const Acc*>(a.src_weight);
  p.inv_eps = Acc(1) / static_cast<Acc>(a.eps);  // the same expression as the softmin and the CPU
  const unsigned batch = static_cast<unsigned>(g.batch);
  if (g.p == 0 && !a.transpose) {
    dense_rows_transport_kernel<DT, Acc><<<dim3(blocks_for(g.n, kWarps), batch), kThreads, 0, stream>>>(p);
    FL_CUDA_CHECK_LAUNCH(dense_rows_transport_kernel);
  } else if (g.p == 0) {
    dense_cols_transport_kernel<DT, Acc><<<dim3(blocks_for(g.m, kColTile), batch), kThreads, 0, stream>>>(p);
    FL_CUDA_CHECK_LAUNCH(dense_cols_transport_kernel);
  } else {
    if constexpr (std::is_same_v<T, Acc>) {
      constexpr int kTile = 16 * tile_per_thread<Acc>();
      const unsigned dim_chunks = a.grad != nullptr ? blocks_for(g.dim, kTile) : 1;
      FL_CHECK_ARG(dim_chunks <= kMaxGridY, "fastloss.ot.transport: dim too large for one launch");
      points_transport_kernel<Acc>
          <<<dim3(blocks_for(p.len_dst, kTile), dim_chunks, batch), kThreads, 0, stream>>>(p);
      FL_CUDA_CHECK_LAUNCH(points_transport_kernel);
    } else {
      throw_invalid_argument("fastloss.ot: points must be float32 or float64");
    }
  }
}

template <class DT, class Acc>
__global__ void __launch_bounds__(kThreads)
    plan_kernel(const DT* cost, const Acc* x, const Acc* y, int64_t batch, int64_t n, int64_t m, int64_t dim, int p,
                const Acc* f, const Acc* g, const Acc* log_a, const Acc* log_b, Acc inv_eps, Acc* plan) {
  const int64_t total = batch * n * m;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t j = e % m, i = (e / m) % n, b = e / (n * m);
    Acc c;
    if (p == 0) {
      c = to_acc(cost[e]);
    } else {
      const Acc* xi = x + (b * n + i) * dim;
      const Acc* yj = y + (b * m + j) * dim;
      Acc x_sq = 0, y_sq = 0, dot = 0;
      for (int64_t k = 0; k < dim; ++k) {
        x_sq += xi[k] * xi[k];
        y_sq += yj[k] * yj[k];
        dot += xi[k] * yj[k];
      }
      c = point_cost<Acc>(p, x_sq, y_sq, dot);
    }
    const Acc fa = scaled(f, log_a, b * n + i, inv_eps);
    const Acc gb = scaled(g, log_b, b * m + j, inv_eps);
    plan[e] = fast_exp(plan_exponent<Acc>(fa, gb, c * inv_eps));
  }
}

template <class T, class Acc>
void launch_plan(const PlanArgs& a, cudaStream_t stream) {
  const Geometry& g = a.geom;
  const int64_t total = g.batch * g.n * g.m;
  if (total == 0) return;
  using DT = typename DeviceType<T>::type;
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>((total + kThreads - 1) / kThreads, 65535 * 8));
  plan_kernel<DT, Acc><<<blocks, kThreads, 0, stream>>>(
      static_cast<const DT*>(g.cost), static_cast<const Acc*>(g.x), static_cast<const Acc*>(g.y), g.batch, g.n, g.m,
      g.dim, g.p, static_cast<const Acc*>(a.f), static_cast<const Acc*>(a.g), static_cast<const Acc*>(a.log_a),
      static_cast<const Acc*>(a.log_b), Acc(1) / static_cast<Acc>(a.eps), static_cast<Acc*>(a.plan));
  FL_CUDA_CHECK_LAUNCH(plan_kernel);
}

// ---- the solver -----------------------------------------------------------------------------

// Sums each problem's row errors (fixed order: deterministic). Check mode (final == null): problems
// still running whose error <= tol get done_at = iteration. Final mode: writes the sums.
template <class Acc>
__global__ void __launch_bounds__(kThreads)
    reduce_errors_kernel(const Acc* row_err, int64_t n, Acc tol, int32_t* done_at, int32_t iteration, Acc* final) {
  __shared__ Acc scratch[kWarps];
  const int64_t b = blockIdx.x;
  if (final == nullptr && done_at[b] >= 0) return;  // uniform over the block
  Acc sum = 0;
  for (int64_t i = threadIdx.x; i < n; i += kThreads) sum += row_err[b * n + i];
  sum = block_allreduce<kThreads>(sum, [](Acc u, Acc v) { return u + v; }, scratch);
  if (threadIdx.x != 0) return;
  if (final != nullptr) {
    final[b] = sum;
  } else if (sum <= tol) {  // NaN never converges
    done_at[b] = iteration;
  }
}

__global__ void __launch_bounds__(kThreads) count_running_kernel(const int32_t* done_at, int64_t batch, int32_t* running) {
  __shared__ int32_t scratch[kWarps];
  int32_t count = 0;
  for (int64_t b = threadIdx.x; b < batch; b += kThreads) count += done_at[b] < 0 ? 1 : 0;
  count = block_allreduce<kThreads>(count, [](int32_t u, int32_t v) { return u + v; }, scratch);
  if (threadIdx.x == 0) *running = count;
}

__global__ void n_iter_kernel(const int32_t* done_at, int64_t batch, int32_t iterations, int32_t* n_iter) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b < batch) n_iter[b] = done_at[b] >= 0 ? done_at[b] + 1 : iterations;
}

// Pinned host words the running-problem counts are copied into. Leased per solve and returned only
// after its last copy has completed, so a later solve never sees a stale count.
constexpr int kMaxChecksInFlight = 3;
constexpr int kCountSlots = kMaxChecksInFlight + 1;

class PinnedCounts {
 public:
  static int32_t* lease() {
    std::lock_guard<std::mutex> lock(mutex_);
    if (!free_.empty()) {
      int32_t* slots = free_.back();
      free_.pop_back();
      return slots;
    }
    void* slots = nullptr;
    FL_CUDA_CHECK(cudaHostAlloc(&slots, kCountSlots * sizeof(int32_t), cudaHostAllocPortable));
    return static_cast<int32_t*>(slots);
  }
  static void give_back(int32_t* slots) {
    std::lock_guard<std::mutex> lock(mutex_);
    free_.push_back(slots);
  }

 private:
  static inline std::mutex mutex_;
  static inline std::vector<int32_t*> free_;
};

template <class T, class Acc>
struct CudaBackend {
  const SolveArgs& a;
  SolveWorkspace w;
  cudaStream_t stream;
  bool capturing = false;
  int32_t* counts = nullptr;
  cudaEvent_t events[kCountSlots] = {};
  std::vector<int> pending;  // slots of checks not read yet, oldest first
  int64_t checks = 0;
  bool finished = false;

  CudaBackend(const SolveArgs& args, cudaStream_t s) : a(args), w(carve_workspace(args.geom, args.workspace)), stream(s) {
    cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
    FL_CUDA_CHECK(cudaStreamIsCapturing(stream, &status));
    capturing = status != cudaStreamCaptureStatusNone;
    FL_CUDA_CHECK(cudaMemsetAsync(w.done_at, 0xff, a.geom.batch * sizeof(int32_t), stream));  // -1: running
    if (!capturing && a.check_every > 0) {
      for (auto& e : events) {
        const cudaError_t status_e = cudaEventCreateWithFlags(&e, cudaEventDisableTiming);
        if (status_e != cudaSuccess) {
          destroy_events();
          FL_CUDA_CHECK(status_e);
        }
      }
      counts = PinnedCounts::lease();  // last: nothing after it can throw in the constructor
    }
  }
  ~CudaBackend() {
    if (counts == nullptr) {
      destroy_events();
      return;
    }
    // finish() has drained every copy into the pinned words. Leaving through an exception instead, a
    // queued copy may not be tracked by an event: wait for the stream before the words are reused.
    if (!finished) cudaStreamSynchronize(stream);
    destroy_events();
    PinnedCounts::give_back(counts);
  }

  void destroy_events() {
    for (auto& e : events) {
      if (e != nullptr) cudaEventDestroy(e);
      e = nullptr;
    }
  }

  void update_rows(double eps, double damping, bool with_error, int32_t iteration) {
    launch_softmin<T, Acc>(half_step(a, w, false, eps, damping, iteration, with_error), stream);
  }
  void update_cols(double eps, double damping, int32_t iteration) {
    launch_softmin<T, Acc>(half_step(a, w, true, eps, damping, iteration, false), stream);
  }

  void mark_converged(int32_t iteration) {
    reduce_errors_kernel<Acc><<<static_cast<unsigned>(a.geom.batch), kThreads, 0, stream>>>(
        static_cast<const Acc*>(w.row_err), a.geom.n, static_cast<Acc>(a.tol), w.done_at, iteration, nullptr);
    FL_CUDA_CHECK_LAUNCH(reduce_errors_kernel);
    if (counts == nullptr) return;
    count_running_kernel<<<1, kThreads, 0, stream>>>(w.done_at, a.geom.batch, w.active);
    FL_CUDA_CHECK_LAUNCH(count_running_kernel);
    const int slot = static_cast<int>(checks++ % kCountSlots);
    FL_CUDA_CHECK(cudaMemcpyAsync(counts + slot, w.active, sizeof(int32_t), cudaMemcpyDeviceToHost, stream));
    FL_CUDA_CHECK(cudaEventRecord(events[slot], stream));
    pending.push_back(slot);
  }

  // Reads every check that has completed (waiting only when too many are in flight); true once one
  // of them saw no running problem.
  bool all_converged() {
    while (!pending.empty()) {
      const int slot = pending.front();
      if (static_cast<int>(pending.size()) > kMaxChecksInFlight - 1) {
        FL_CUDA_CHECK(cudaEventSynchronize(events[slot]));
      } else {
        const cudaError_t status = cudaEventQuery(events[slot]);
        if (status == cudaErrorNotReady) return false;
        FL_CUDA_CHECK(status);
      }
      pending.erase(pending.begin());
      if (counts[slot] == 0) return true;
    }
    return false;
  }

  void finish(int32_t iterations) {
    const Geometry& g = a.geom;
    n_iter_kernel<<<blocks_for(g.batch, kThreads), kThreads, 0, stream>>>(w.done_at, g.batch, iterations, a.n_iter);
    FL_CUDA_CHECK_LAUNCH(n_iter_kernel);
    launch_softmin<T, Acc>(final_error_step(a, w), stream);
    reduce_errors_kernel<Acc><<<static_cast<unsigned>(g.batch), kThreads, 0, stream>>>(
        static_cast<const Acc*>(w.row_err), g.n, Acc(0), w.done_at, 0, static_cast<Acc*>(a.error));
    FL_CUDA_CHECK_LAUNCH(reduce_errors_kernel);
    for (int slot : pending) FL_CUDA_CHECK(cudaEventSynchronize(events[slot]));
    pending.clear();
    finished = true;
  }
};

template <class T, class Acc>
void launch_solve(const SolveArgs& a, cudaStream_t stream) {
  const Geometry& g = a.geom;
  if (g.batch == 0) return;
  if (g.n == 0 || g.m == 0) {
    FL_CUDA_CHECK(cudaMemsetAsync(a.n_iter, 0, g.batch * sizeof(int32_t), stream));
    FL_CUDA_CHECK(cudaMemsetAsync(a.error, 0, g.batch * sizeof(Acc), stream));
    return;
  }
  CudaBackend<T, Acc> backend(a, stream);
  run_sinkhorn(backend, a);
}

template <template <class, class> class Fn, class Args>
void dispatch(const Args& a, cudaStream_t stream) {
  switch (a.geom.dtype) {
    case DType::Float32: Fn<float, float>::run(a, stream); break;
    case DType::Float64: Fn<double, double>::run(a, stream); break;
    case DType::Float16: Fn<Half, float>::run(a, stream); break;
    case DType::BFloat16: Fn<BFloat16, float>::run(a, stream); break;
  }
}

template <class T, class Acc>
struct SoftminFn {
  static void run(const SoftminArgs& a, cudaStream_t s) { launch_softmin<T, Acc>(a, s); }
};
template <class T, class Acc>
struct SolveFn {
  static void run(const SolveArgs& a, cudaStream_t s) { launch_solve<T, Acc>(a, s); }
};
template <class T, class Acc>
struct TransportFn {
  static void run(const TransportArgs& a, cudaStream_t s) { launch_transport<T, Acc>(a, s); }
};
template <class T, class Acc>
struct PlanFn {
  static void run(const PlanArgs& a, cudaStream_t s) { launch_plan<T, Acc>(a, s); }
};

}  // namespace

void softmin_cuda(const SoftminArgs& a, int device, cudaStream_t stream) {
  validate_softmin(a);
  check_batch(a.geom, "fastloss.ot.softmin");
  CudaDeviceGuard guard(device);
  dispatch<SoftminFn>(a, stream);
}
void solve_cuda(const SolveArgs& a, int device, cudaStream_t stream) {
  validate_solve(a);
  check_batch(a.geom, "fastloss.ot.sinkhorn");
  CudaDeviceGuard guard(device);
  dispatch<SolveFn>(a, stream);
}
void transport_cuda(const TransportArgs& a, int device, cudaStream_t stream) {
  validate_transport(a);
  check_batch(a.geom, "fastloss.ot.transport");
  CudaDeviceGuard guard(device);
  dispatch<TransportFn>(a, stream);
}
void plan_cuda(const PlanArgs& a, int device, cudaStream_t stream) {
  validate_plan(a);
  CudaDeviceGuard guard(device);
  dispatch<PlanFn>(a, stream);
}

}  // namespace fl::ot
