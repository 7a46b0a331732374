// Tests of the simulator's core (scheduler.cpp, shared_memory.cpp, warp_ops.cpp, runtime.cpp): each
// kernel below is correct, or carries one bug of the kind the simulator exists to catch, and the
// test checks that the correct ones give the right answer under every schedule and that each bug
// stops the launch with a message naming it. Built only for the simulator (FASTLOSS_BUILD_SIM_TESTS).
#include <cuda_runtime.h>

#include <cmath>
#include <cstdio>
#include <functional>
#include <string>
#include <vector>

namespace {

int g_passed = 0, g_failed = 0;

void check(bool ok, const std::string& what) {
  if (ok) {
    ++g_passed;
  } else {
    ++g_failed;
    std::printf("FAILED: %s\n", what.c_str());
  }
}

// Runs `launch` and checks that it throws fl_sim::Error mentioning `needle` (or `other`: which of two
// reports comes first can depend on the schedule).
void expect_error(const std::string& what, const std::string& needle, const std::function<void()>& launch,
                  const std::string& other = "") {
  try {
    launch();
    check(false, what + ": no error (expected '" + needle + "')");
  } catch (const fl_sim::Error& e) {
    const std::string message = e.what();
    const bool found = message.find(needle) != std::string::npos ||
                       (!other.empty() && message.find(other) != std::string::npos);
    check(found, what + ": error '" + message + "' does not mention '" + needle + "'");
  }
}

const char* kSchedules[] = {"forward", "reverse", "random", "warp-major"};

void use_schedule(const char* name, uint64_t seed = 7) {
  fl_sim::Schedule s;
  fl_sim::parse_schedule(name, &s);
  fl_sim::set_schedule(s, seed);
}

// ---- correct kernels ---------------------------------------------------------------------------
__global__ void __launch_bounds__(256) block_sum_kernel(const float* x, int n, float* out) {
  __shared__ float partial[8];
  float v = 0;
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += blockDim.x * gridDim.x) v += x[i];
  for (int m = 16; m > 0; m /= 2) v += __shfl_xor_sync(0xffffffffu, v, m);
  if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = v;
  __syncthreads();
  if (threadIdx.x == 0) {
    float total = 0;
    for (int w = 0; w < static_cast<int>(blockDim.x / 32); ++w) total += partial[w];
    out[blockIdx.x] = total;
  }
}

__global__ void shuffles_kernel(int* out) {
  const int lane = threadIdx.x % 32;
  out[threadIdx.x * 6 + 0] = __shfl_sync(0xffffffffu, lane * 10, 5);
  out[threadIdx.x * 6 + 1] = __shfl_up_sync(0xffffffffu, lane, 3);
  out[threadIdx.x * 6 + 2] = __shfl_down_sync(0xffffffffu, lane, 3, 8);
  out[threadIdx.x * 6 + 3] = __shfl_xor_sync(0xffffffffu, lane, 6);
  out[threadIdx.x * 6 + 4] = static_cast<int>(__ballot_sync(0xffffffffu, lane % 3 == 0));
  out[threadIdx.x * 6 + 5] = __syncthreads_count(lane < 4) * 100 + __any_sync(0xffffffffu, lane == 7) * 10 +
                             __all_sync(0xffffffffu, lane < 40);
}

__global__ void half_warps_kernel(int* out) {
  // Two independent collectives in one warp, on disjoint masks.
  const int lane = threadIdx.x % 32;
  const unsigned mask = lane < 16 ? 0x0000ffffu : 0xffff0000u;
  out[lane] = __shfl_sync(mask, lane, lane < 16 ? 0 : 16);
}

__global__ void grid_2d_kernel(int* out) {
  const int x = blockIdx.x * blockDim.x + threadIdx.x, y = blockIdx.y * blockDim.y + threadIdx.y;
  out[(blockIdx.z * 64 + y) * 64 + x] = static_cast<int>(gridDim.x * 1000000 + blockDim.y * 10000 + y * 100 + x % 100);
}

__global__ void atomic_kernel(int* counter, float* sum) {
  atomicAdd(counter, 1);
  atomicAdd(sum, 0.5f);
}

__global__ void dynamic_shared_kernel(float* out) {
  extern __shared__ __align__(16) float s[];
  s[threadIdx.x] = static_cast<float>(threadIdx.x);
  __syncthreads();
  out[threadIdx.x] = s[(threadIdx.x + 32) % blockDim.x];
}

// ---- kernels with one bug each --------------------------------------------------------------
__global__ void missing_barrier_kernel(float* out) {
  extern __shared__ __align__(16) float s[];
  s[threadIdx.x] = static_cast<float>(threadIdx.x);
  out[threadIdx.x] = s[(threadIdx.x + 32) % blockDim.x];  // no __syncthreads: reads another warp's slot
}

__global__ void divergent_barrier_kernel(int* out) {
  if (threadIdx.x < 16) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1;
}

__global__ void deadlock_kernel(int* out) {
  if (threadIdx.x < 32 && threadIdx.x != 5) __shfl_sync(0xffffffffu, 1, 0);  // warp 0 waits for lane 5...
  __syncthreads();  // ... which waits here for them: never
  out[threadIdx.x] = 1;
}

__global__ void exited_lane_kernel(float* out) {
  if (threadIdx.x == 3) return;
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.0f, 1);
}

__global__ void mask_without_caller_kernel(float* out) {
  out[threadIdx.x] = __shfl_sync(0x0000fffeu, 1.0f, 1);
}

__global__ void mismatched_collectives_kernel(int* out) {
  const int lane = threadIdx.x % 32;
  out[lane] = lane < 16 ? __shfl_xor_sync(0xffffffffu, lane, 1) : static_cast<int>(__ballot_sync(0xffffffffu, 1));
}

__global__ void partial_warp_mask_kernel(float* out) {
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.0f, 1);  // a block of 48: lanes 16-31 of warp 1 do not exist
}

// The overruns below are what the simulator's red zones must report; in a sanitized build ASan/UBSan
// would stop the program first, so these two kernels are left uninstrumented.
#if defined(__SANITIZE_ADDRESS__)
#define FL_TEST_UNSANITIZED __attribute__((no_sanitize_address, no_sanitize_undefined))
#else
#define FL_TEST_UNSANITIZED
#endif

FL_TEST_UNSANITIZED __global__ void shared_overrun_kernel(float* out) {
  __shared__ float s[8];
  s[threadIdx.x] = 1.0f;  // 16 threads
  out[0] = s[0];
}

FL_TEST_UNSANITIZED __global__ void dynamic_overrun_kernel(float* out) {
  extern __shared__ __align__(16) float s[];
  s[threadIdx.x + 1] = 1.0f;
  out[0] = s[0];
}

__global__ void __launch_bounds__(64) bounded_kernel(float* out) { out[threadIdx.x] = 1.0f; }

__global__ void too_much_static_kernel(float* out) {
  __shared__ float big[13000];  // 52 KB > 48 KB
  big[threadIdx.x] = 1.0f;
  out[0] = big[0];
}

void test_correct_kernels() {
  std::vector<float> x(10007);
  for (size_t i = 0; i < x.size(); ++i) x[i] = static_cast<float>(i % 13) * 0.25f;
  double expected = 0;
  for (float v : x) expected += v;
  for (const char* schedule : kSchedules) {
    use_schedule(schedule);
    std::vector<float> partial(7, NAN);
    block_sum_kernel<<<7, 256>>>(x.data(), static_cast<int>(x.size()), partial.data());
    check(cudaGetLastError() == cudaSuccess, "block sum launches");
    double total = 0;
    for (float v : partial) total += v;
    check(std::fabs(total - expected) < 1e-2, std::string("block sum under ") + schedule);

    std::vector<int> s(64 * 6, -1);
    shuffles_kernel<<<1, 64>>>(s.data());
    bool ok = true;
    for (int t = 0; t < 64; ++t) {
      const int lane = t % 32;
      ok &= s[t * 6 + 0] == 50;
      ok &= s[t * 6 + 1] == (lane < 3 ? lane : lane - 3);
      ok &= s[t * 6 + 2] == (lane % 8 + 3 >= 8 ? lane : lane + 3);
      ok &= s[t * 6 + 3] == (lane ^ 6);
      ok &= static_cast<unsigned>(s[t * 6 + 4]) == 0x49249249u;
      ok &= s[t * 6 + 5] == 8 * 100 + 10 + 1;
    }
    check(ok, std::string("shuffles, votes and __syncthreads_count under ") + schedule);

    std::vector<int> h(32, -1);
    half_warps_kernel<<<1, 32>>>(h.data());
    ok = true;
    for (int l = 0; l < 32; ++l) ok &= h[l] == (l < 16 ? 0 : 16);
    check(ok, std::string("disjoint-mask collectives under ") + schedule);

    std::vector<float> d(128, NAN);
    dynamic_shared_kernel<<<1, 128, 128 * sizeof(float)>>>(d.data());
    ok = true;
    for (int t = 0; t < 128; ++t) ok &= d[t] == static_cast<float>((t + 32) % 128);
    check(ok, std::string("dynamic shared memory with a barrier under ") + schedule);
  }
  std::vector<int> g(2 * 64 * 64, -1);
  grid_2d_kernel<<<dim3(4, 8, 2), dim3(16, 8)>>>(g.data());
  bool ok = true;
  for (int z = 0; z < 2; ++z)
    for (int y = 0; y < 64; ++y)
      for (int x = 0; x < 64; ++x) ok &= g[(z * 64 + y) * 64 + x] == 4 * 1000000 + 8 * 10000 + y * 100 + x % 100;
  check(ok, "3-D grid and 2-D blocks: every coordinate");
  int counter = 0;
  float sum = 0;
  atomic_kernel<<<3, 100>>>(&counter, &sum);
  check(counter == 300 && sum == 150.0f, "atomics");
}

void test_planted_bugs() {
  for (const char* schedule : kSchedules) {
    use_schedule(schedule);
    std::vector<float> out(64, 0.0f);
    missing_barrier_kernel<<<1, 64, 64 * sizeof(float)>>>(out.data());
    int nans = 0;
    for (float v : out) nans += std::isnan(v);
    check(nans > 0, std::string("a missing __syncthreads reads poison (NaN) under ") + schedule);
  }
  std::vector<int> ints(64);
  std::vector<float> floats(64);
  expect_error("divergent barrier", "divergent __syncthreads", [&] { divergent_barrier_kernel<<<1, 64>>>(ints.data()); });
  for (const char* schedule : kSchedules) {
    use_schedule(schedule);
    expect_error(std::string("deadlock under ") + schedule, "deadlock", [&] { deadlock_kernel<<<1, 64>>>(ints.data()); },
                 "wait for this lane");
  }
  use_schedule("random");
  expect_error("exited lane", "exited", [&] { exited_lane_kernel<<<1, 32>>>(floats.data()); });
  expect_error("mask without the caller", "does not name the calling lane",
               [&] { mask_without_caller_kernel<<<1, 32>>>(floats.data()); });
  expect_error("different collectives", "different warp collectives",
               [&] { mismatched_collectives_kernel<<<1, 32>>>(ints.data()); });
  expect_error("mask naming a lane that does not exist", "does not exist",
               [&] { partial_warp_mask_kernel<<<1, 48>>>(floats.data()); });
  expect_error("static shared overrun", "past the end of __shared__ s",
               [&] { shared_overrun_kernel<<<1, 16>>>(floats.data()); });
  expect_error("dynamic shared overrun", "past the end of the dynamic shared memory",
               [&] { dynamic_overrun_kernel<<<1, 16, 16 * sizeof(float)>>>(floats.data()); });
  expect_error("__launch_bounds__ exceeded", "__launch_bounds__(64)", [&] { bounded_kernel<<<1, 128>>>(floats.data()); });
  expect_error("static shared over 48 KB", "48 KB", [&] { too_much_static_kernel<<<1, 32>>>(floats.data()); });

  // Configurations the GPU refuses: the launch sets the error and runs nothing.
  floats.assign(64, -1.0f);
  bounded_kernel<<<0, 32>>>(floats.data());
  check(cudaGetLastError() == cudaErrorInvalidConfiguration && floats[0] == -1.0f, "an empty grid is refused");
  bounded_kernel<<<1, 2048>>>(floats.data());
  check(cudaGetLastError() == cudaErrorInvalidConfiguration, "2048 threads per block are refused");
  bounded_kernel<<<dim3(1, 70000), 32>>>(floats.data());
  check(cudaGetLastError() == cudaErrorInvalidConfiguration, "gridDim.y > 65535 is refused");
  dynamic_shared_kernel<<<1, 32, 64 * 1024>>>(floats.data());
  check(cudaGetLastError() == cudaErrorInvalidValue, "64 KB of dynamic shared memory without the attribute");
  check(cudaFuncSetAttribute(dynamic_shared_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, 64 * 1024) ==
            cudaSuccess,
        "cudaFuncSetAttribute raises the limit");
  dynamic_shared_kernel<<<1, 32, 64 * 1024>>>(floats.data());
  check(cudaGetLastError() == cudaSuccess, "64 KB of dynamic shared memory with the attribute");
  check(cudaFuncSetAttribute(dynamic_shared_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, 240 * 1024) ==
            cudaErrorInvalidValue,
        "no kernel may opt in to more than 227 KB");
  cudaGetLastError();
}

void test_runtime() {
  const uint64_t before = fl_sim::stats().sync_calls;
  cudaStream_t stream;
  cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking);
  int value = 0, host = 5;
  cudaMemcpyAsync(&value, &host, sizeof(int), cudaMemcpyHostToDevice, stream);
  check(fl_sim::stats().sync_calls == before, "an async copy does not synchronize");
  cudaStreamSynchronize(stream);
  cudaMemcpy(&host, &value, sizeof(int), cudaMemcpyDeviceToHost);
  check(fl_sim::stats().sync_calls == before + 2, "a stream synchronize and a blocking copy to the host are counted");
  cudaStreamDestroy(stream);
  int sms = 0, optin = 0;
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0);
  cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, 0);
  check(sms == 132 && optin == 232448, "H200 attributes");
  check(cudaSetDevice(1) == cudaErrorInvalidDevice, "one device");
  cudaGetLastError();
}

}  // namespace

int main() {
  test_correct_kernels();
  test_planted_bugs();
  test_runtime();
  std::printf("sim_core_test: %d passed, %d failed\n", g_passed, g_failed);
  return g_failed == 0 ? 0 : 1;
}
