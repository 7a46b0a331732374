// The simulated device's core, shared by the device-side headers (sim_device.h, sim_wmma.h,
// sim_ptx.h) and the runtime (scheduler.cpp, runtime.cpp): the coordinates of the running
// thread, blocking operations (block barriers, warp collectives), shared memory, and failure.
//
// One block runs at a time on the calling OS thread; its threads are cooperative fibers that
// switch only where a GPU thread may wait for others (a barrier, a warp collective), in the order
// the schedule picks (docs/simulator.md). Everything here is torch-free.
#pragma once

#include <cstddef>
#include <cstdint>
#include <deque>
#include <stdexcept>
#include <string>
#include <vector>

// CUDA's built-in vector types for coordinates, as <vector_types.h> declares them.
struct uint3 {
  unsigned int x, y, z;
};
struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1) : x(vx), y(vy), z(vz) {}
  constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
  constexpr operator uint3() const { return uint3{x, y, z}; }
};

namespace fl_sim {

// What a failed simulated launch throws: a kernel bug the simulator caught (a divergent barrier,
// a deadlock, a bad warp mask, an out-of-bounds shared-memory access, ...), with the kernel, the
// block and the thread where it was caught.
class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// Stops the running block: the launch throws fl_sim::Error with this message and the coordinates.
// Outside a kernel (host code of the runtime) it throws at once.
[[noreturn]] void fail(const std::string& message);

// The running thread's coordinates (what threadIdx & co. read).
const uint3& thread_index();
const uint3& block_index();
const dim3& block_dim();
const dim3& grid_dim();
unsigned linear_thread();  // threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z)
unsigned lane_id();        // linear_thread() % 32
unsigned warp_id();        // linear_thread() / 32

// ---- blocking operations ---------------------------------------------------------------------
enum class BarrierKind { Sync, Count, And, Or };
// __syncthreads and its count/and/or forms: returns the reduction of `predicate` over the block.
// `file`/`line` identify the call site: threads waiting at different sites is a divergent barrier.
int block_barrier(BarrierKind kind, int predicate, const char* file, int line);

// Blocks the calling lane until every lane named in `mask` has called warp_collective with the same
// `kind` (and, when `site` is not null, from the same site); the last lane to arrive then runs
// complete(lane_data of all 32 lanes (null where not in mask), mask, context) once while every lane of
// the collective waits, and all of them continue. Fails on a mask without the calling lane, a mask
// naming a lane that has exited or does not exist, and lanes meeting at different collectives.
using CollectiveFn = void (*)(void* const* lane_data, uint32_t mask, void* context);
void warp_collective(uint32_t mask, const char* kind, void* lane_data, CollectiveFn complete, void* context,
                     const char* site = nullptr, int line = 0);
uint32_t active_lanes();  // lanes of the calling warp that exist and have not exited

// ---- shuffles and votes (warp_ops.cpp; the intrinsics are in sim_device.h) -------------------
enum class ShuffleKind { Index, Up, Down, Xor };

struct ShuffleLane {
  unsigned char value[8];
  unsigned char result[8];
  int operand;  // source lane, delta or lane mask
  int width;
};

// Source lane of `lane` for a shuffle of `kind` within segments of `width` lanes; the lane itself
// where CUDA returns the caller's own value.
inline unsigned shuffle_source(ShuffleKind kind, unsigned lane, int operand, int width) {
  const unsigned segment = lane - lane % static_cast<unsigned>(width);
  switch (kind) {
    case ShuffleKind::Index: return segment + static_cast<unsigned>(operand) % static_cast<unsigned>(width);
    case ShuffleKind::Up:
      return lane % width < static_cast<unsigned>(operand) ? lane : lane - static_cast<unsigned>(operand);
    case ShuffleKind::Down:
      return lane % width + static_cast<unsigned>(operand) >= static_cast<unsigned>(width)
                 ? lane : lane + static_cast<unsigned>(operand);
    case ShuffleKind::Xor: {
      const unsigned source = lane ^ static_cast<unsigned>(operand);
      return source - source % static_cast<unsigned>(width) == segment ? source : lane;
    }
  }
  return lane;
}

void complete_shuffle(void* const* lanes, uint32_t mask, void* kind);
uint32_t vote(const char* name, uint32_t mask, int predicate, const char* file, int line);

// ---- shared memory ---------------------------------------------------------------------------
// The block's dynamic shared memory (extern __shared__), `align` honoured.
void* dynamic_shared(size_t align);
// A static __shared__ variable of `bytes`: one per `tag` (a per-site address) and block, allocated at
// first use, poisoned at block start, surrounded by red zones checked at block end. Fails beyond the
// 48 KB of static shared memory a kernel may have.
void* static_shared(const void* tag, size_t bytes, size_t align, const char* name);
template <class T>
T& static_shared_as(const void* tag, size_t align, const char* name) {
  return *static_cast<T*>(static_shared(tag, sizeof(T), align < alignof(T) ? alignof(T) : align, name));
}
template <class T>
T* dynamic_shared_as(size_t align) {
  return static_cast<T*>(dynamic_shared(align < alignof(T) ? alignof(T) : align));
}
// What __cvta_generic_to_shared returns: the offset of p in the block's shared memory (fails when p is
// not in it); shared_pointer turns [offset, offset + bytes) back into a pointer, bounds checked.
uint32_t shared_offset(const void* p);
void* shared_pointer(uint32_t offset, size_t bytes);

// ---- per-thread state of the tensor-core and async-copy models -------------------------------
bool permuted_fragments();  // FASTLOSS_SIM_PERMUTE_FRAGMENTS=1: wmma fragments use a scrambled layout
struct PendingCopy {
  uint32_t dst_offset;
  uint32_t bytes;
  unsigned char data[16];
};
struct CpAsyncState {
  std::vector<PendingCopy> open;                   // issued, not yet committed
  std::deque<std::vector<PendingCopy>> committed;  // oldest first
};
CpAsyncState& cp_async_state();  // the calling simulated thread's; empty at block start

// ---- launching -------------------------------------------------------------------------------
struct LaunchConfig {
  const char* kernel_name;
  const void* kernel;  // the kernel's address: the key of cudaFuncSetAttribute
  dim3 grid;
  dim3 block;
  size_t dynamic_shared_bytes;
  void* stream;
};
// Runs body(context) as every thread of every block of the grid, one block at a time. A launch
// configuration the GPU refuses sets the runtime's last error (as cudaLaunchKernel does) and runs
// nothing; a bug caught while running throws fl_sim::Error.
void run_grid(const LaunchConfig& config, void (*body)(void*), void* context);
// __launch_bounds__(max_threads, ...) of the running kernel: fails when the block is larger.
void check_launch_bounds(long long max_threads, const char* kernel_site);

// ---- settings and counters (bind_sim.cpp exposes them to Python) -----------------------------
enum class Schedule { Forward, Reverse, Random, WarpMajor };
void set_schedule(Schedule schedule, uint64_t seed);
Schedule schedule();
const char* schedule_name(Schedule schedule);
bool parse_schedule(const std::string& name, Schedule* out);
uint64_t schedule_seed();
struct Stats {
  uint64_t launches = 0;
  uint64_t blocks = 0;
  uint64_t threads = 0;
  uint64_t context_switches = 0;
  uint64_t sync_calls = 0;  // synchronizing runtime calls: stream/event/device synchronize, blocking copies
  uint64_t host_polls = 0;  // the host asking how far the device is (event/stream queries): a host read of
                            // device progress that decides what the host does next, so not capturable
};
Stats& stats();

}  // namespace fl_sim
