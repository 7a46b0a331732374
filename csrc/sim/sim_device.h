// Force-included (-include) into every CUDA source compiled for the simulated device
// (FASTLOSS_CUDA=SIMULATE): CUDA's qualifiers, built-in variables and device functions, written for
// host C++ on top of the simulator's core (sim_core.h). csrc/sim/rewrite_cuda.py turns the syntax
// a header cannot express (<<<...>>>, __shared__ declarations, __launch_bounds__, inline PTX) into
// calls to the functions below; everything else in the project's .cu files compiles as it is.
#pragma once

#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>

#include "sim_core.h"
#include "sim_runtime.h"

// ---- qualifiers ------------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __align__(n) __attribute__((aligned(n)))
#define __builtin_align__(n) __attribute__((aligned(n)))
#define __grid_constant__
#define __managed__

// ---- built-in variables (per simulated thread) -----------------------------------------------
#define threadIdx (::fl_sim::thread_index())
#define blockIdx (::fl_sim::block_index())
#define blockDim (::fl_sim::block_dim())
#define gridDim (::fl_sim::grid_dim())
constexpr int warpSize = 32;

// ---- block barriers (the call site identifies the barrier: different sites are a divergence) --
// The site is file and line (GCC 12 has no __builtin_COLUMN: two barriers on one line count as one).
#define FL_SIM_SITE_ARGS const char *file = __builtin_FILE(), int line = __builtin_LINE()
inline void __syncthreads(FL_SIM_SITE_ARGS) { ::fl_sim::block_barrier(::fl_sim::BarrierKind::Sync, 1, file, line); }
inline int __syncthreads_count(int predicate, FL_SIM_SITE_ARGS) {
  return ::fl_sim::block_barrier(::fl_sim::BarrierKind::Count, predicate, file, line);
}
inline int __syncthreads_and(int predicate, FL_SIM_SITE_ARGS) {
  return ::fl_sim::block_barrier(::fl_sim::BarrierKind::And, predicate, file, line);
}
inline int __syncthreads_or(int predicate, FL_SIM_SITE_ARGS) {
  return ::fl_sim::block_barrier(::fl_sim::BarrierKind::Or, predicate, file, line);
}
// Memory fences order one thread's accesses; the simulator runs one thread at a time, so they hold.
inline void __threadfence() {}
inline void __threadfence_block() {}
inline void __threadfence_system() {}
inline void __nanosleep(unsigned) {}

// ---- warp collectives ------------------------------------------------------------------------
namespace fl_sim {

template <ShuffleKind Kind, class T>
T shuffle(const char* name, uint32_t mask, T value, int operand, int width, const char* file, int line) {
  static_assert(std::is_trivially_copyable<T>::value && sizeof(T) <= 8, "shuffle of a type CUDA does not shuffle");
  if (width <= 0 || width > 32 || (width & (width - 1)) != 0)
    fail(std::string(name) + ": width " + std::to_string(width) + " is not a power of two in [1, 32]");
  ShuffleLane lane{};
  std::memcpy(lane.value, &value, sizeof(T));
  lane.operand = operand;
  lane.width = width;
  static ShuffleKind kind = Kind;
  warp_collective(mask, name, &lane, complete_shuffle, &kind, file, line);
  T out;
  std::memcpy(&out, lane.result, sizeof(T));
  return out;
}


}  // namespace fl_sim

template <class T>
inline T __shfl_sync(unsigned mask, T var, int src_lane, int width = 32, FL_SIM_SITE_ARGS) {
  return ::fl_sim::shuffle<::fl_sim::ShuffleKind::Index>("__shfl_sync", mask, var, src_lane, width, file, line);
}
template <class T>
inline T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = 32, FL_SIM_SITE_ARGS) {
  return ::fl_sim::shuffle<::fl_sim::ShuffleKind::Up>("__shfl_up_sync", mask, var, static_cast<int>(delta), width,
                                                      file, line);
}
template <class T>
inline T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = 32, FL_SIM_SITE_ARGS) {
  return ::fl_sim::shuffle<::fl_sim::ShuffleKind::Down>("__shfl_down_sync", mask, var, static_cast<int>(delta),
                                                        width, file, line);
}
template <class T>
inline T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = 32, FL_SIM_SITE_ARGS) {
  return ::fl_sim::shuffle<::fl_sim::ShuffleKind::Xor>("__shfl_xor_sync", mask, var, lane_mask, width, file, line);
}
inline unsigned __ballot_sync(unsigned mask, int predicate, FL_SIM_SITE_ARGS) {
  return ::fl_sim::vote("__ballot_sync", mask, predicate, file, line);
}
inline int __any_sync(unsigned mask, int predicate, FL_SIM_SITE_ARGS) {
  return ::fl_sim::vote("__any_sync", mask, predicate, file, line) != 0;
}
inline int __all_sync(unsigned mask, int predicate, FL_SIM_SITE_ARGS) {
  return ::fl_sim::vote("__all_sync", mask, predicate, file, line) == mask;
}
// Lanes may meet at different __syncwarp calls (sm_70+), so the site is not compared.
inline void __syncwarp(unsigned mask = 0xffffffffu) {
  ::fl_sim::vote("__syncwarp", mask, 1, nullptr, 0);
}
inline unsigned __activemask() { return ::fl_sim::active_lanes(); }

// ---- atomics: one simulated thread runs at a time, so a read-modify-write is atomic ------------
template <class T>
inline T __fl_sim_atomic_update(T* address, T value, T (*op)(T, T)) {
  const T old = *address;
  *address = op(old, value);
  return old;
}
template <class T>
inline T atomicAdd(T* address, T value) {
  return __fl_sim_atomic_update<T>(address, value, [](T a, T b) -> T { return a + b; });
}
template <class T>
inline T atomicSub(T* address, T value) {
  return __fl_sim_atomic_update<T>(address, value, [](T a, T b) -> T { return a - b; });
}
template <class T>
inline T atomicMax(T* address, T value) {
  return __fl_sim_atomic_update<T>(address, value, [](T a, T b) -> T { return a < b ? b : a; });
}
template <class T>
inline T atomicMin(T* address, T value) {
  return __fl_sim_atomic_update<T>(address, value, [](T a, T b) -> T { return b < a ? b : a; });
}
template <class T>
inline T atomicExch(T* address, T value) {
  return __fl_sim_atomic_update<T>(address, value, [](T, T b) -> T { return b; });
}
template <class T>
inline T atomicAnd(T* address, T value) {
  return __fl_sim_atomic_update<T>(address, value, [](T a, T b) -> T { return a & b; });
}
template <class T>
inline T atomicOr(T* address, T value) {
  return __fl_sim_atomic_update<T>(address, value, [](T a, T b) -> T { return a | b; });
}
template <class T>
inline T atomicXor(T* address, T value) {
  return __fl_sim_atomic_update<T>(address, value, [](T a, T b) -> T { return a ^ b; });
}
template <class T>
inline T atomicCAS(T* address, T compare, T value) {
  const T old = *address;
  if (old == compare) *address = value;
  return old;
}
inline unsigned atomicInc(unsigned* address, unsigned limit) {
  const unsigned old = *address;
  *address = old >= limit ? 0u : old + 1u;
  return old;
}
inline unsigned atomicDec(unsigned* address, unsigned limit) {
  const unsigned old = *address;
  *address = (old == 0u || old > limit) ? limit : old - 1u;
  return old;
}

// ---- shared memory ---------------------------------------------------------------------------
// A per-site (and per template instantiation) address: the key of a static __shared__ variable.
#define FL_SIM_SHARED_TAG ([]() -> const void* { static const char fl_sim_tag = 0; return &fl_sim_tag; }())
inline size_t __cvta_generic_to_shared(const void* p) { return ::fl_sim::shared_offset(p); }
inline bool __isShared(const void* p) {
  (void)p;
  return true;
}

// ---- kernel launch: rewrite_cuda.py turns `k<<<grid, block, smem, stream>>>(args)` into
// `::fl_sim::launch("k", k, grid, block, smem, stream)(args)` --------------------------------
namespace fl_sim {

template <class... Params>
class KernelLaunch {
 public:
  KernelLaunch(void (*kernel)(Params...), const LaunchConfig& config) : kernel_(kernel), config_(config) {}

  template <class... Args>
  void operator()(Args&&... args) const {
    static_assert(sizeof...(Args) == sizeof...(Params), "kernel launched with the wrong number of arguments");
    // Converted once, as the runtime copies the arguments at launch; every thread gets its own copy.
    std::tuple<std::decay_t<Params>...> arguments(static_cast<std::decay_t<Params>>(std::forward<Args>(args))...);
    struct Call {
      void (*kernel)(Params...);
      std::tuple<std::decay_t<Params>...>* arguments;
      static void run(void* self) {
        auto* call = static_cast<Call*>(self);
        std::apply([call](const auto&... a) { call->kernel(a...); }, *call->arguments);
      }
    } call{kernel_, &arguments};
    run_grid(config_, &Call::run, &call);
  }

 private:
  void (*kernel_)(Params...);
  LaunchConfig config_;
};

template <class... Params>
KernelLaunch<Params...> launch(const char* name, void (*kernel)(Params...), dim3 grid, dim3 block,
                               size_t dynamic_shared_bytes = 0, cudaStream_t stream = nullptr) {
  return KernelLaunch<Params...>(
      kernel, LaunchConfig{name, reinterpret_cast<const void*>(kernel), grid, block, dynamic_shared_bytes, stream});
}

}  // namespace fl_sim

#define FL_SIM_LAUNCH_BOUNDS(max_threads, ...) \
  ::fl_sim::check_launch_bounds(static_cast<long long>(max_threads), __FILE__ ":" FL_SIM_STRINGIFY(__LINE__))
#define FL_SIM_STRINGIFY_(x) #x
#define FL_SIM_STRINGIFY(x) FL_SIM_STRINGIFY_(x)

// ---- numbers, vector types, tensor cores, inline PTX -----------------------------------------
#include "sim_vector_types.h"
#include "sim_half.h"
#include "sim_math.h"
#include "sim_wmma.h"
#include "sim_ptx.h"
