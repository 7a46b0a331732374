// The CUDA runtime of the simulated device (see sim_runtime.h). Work "on a stream" runs at once on
// the calling thread, so every stream and event is always complete; the calls that would make the
// host wait on a GPU are counted in stats().sync_calls, and the queries by which it polls the device's
// progress in stats().host_polls, so tests can tell which ops synchronize or read device state.
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>

#include "sim_core.h"
#include "sim_runtime.h"

struct CUstream_st {
  unsigned flags;
};
struct CUevent_st {
  std::chrono::steady_clock::time_point when;
  bool recorded;
};

namespace fl_sim {
namespace {

thread_local cudaError_t g_last_error = cudaSuccess;
thread_local int g_device = 0;

std::mutex& attribute_mutex() {
  static std::mutex m;
  return m;
}
std::map<const void*, size_t>& dynamic_limits() {
  static std::map<const void*, size_t> limits;
  return limits;
}

cudaError_t check_device(int device) { return device == 0 ? cudaSuccess : cudaErrorInvalidDevice; }

cudaError_t record(cudaError_t status) {
  if (status != cudaSuccess) g_last_error = status;
  return status;
}

}  // namespace

void set_last_error(cudaError_t error) { g_last_error = error; }

size_t max_dynamic_shared_bytes(const void* kernel) {
  std::lock_guard<std::mutex> lock(attribute_mutex());
  const auto it = dynamic_limits().find(kernel);
  return it == dynamic_limits().end() ? static_cast<size_t>(device_limits::kSharedPerBlock) : it->second;
}

}  // namespace fl_sim

using namespace fl_sim;

cudaError_t cudaGetLastError() {
  const cudaError_t e = g_last_error;
  g_last_error = cudaSuccess;
  return e;
}
cudaError_t cudaPeekAtLastError() { return g_last_error; }

const char* cudaGetErrorName(cudaError_t error) {
  switch (error) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorMemoryAllocation: return "cudaErrorMemoryAllocation";
    case cudaErrorInitializationError: return "cudaErrorInitializationError";
    case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
    case cudaErrorInvalidDevicePointer: return "cudaErrorInvalidDevicePointer";
    case cudaErrorInvalidResourceHandle: return "cudaErrorInvalidResourceHandle";
    case cudaErrorInvalidDeviceFunction: return "cudaErrorInvalidDeviceFunction";
    case cudaErrorNoDevice: return "cudaErrorNoDevice";
    case cudaErrorInvalidDevice: return "cudaErrorInvalidDevice";
    case cudaErrorNotReady: return "cudaErrorNotReady";
    case cudaErrorIllegalAddress: return "cudaErrorIllegalAddress";
    case cudaErrorLaunchOutOfResources: return "cudaErrorLaunchOutOfResources";
    case cudaErrorLaunchFailure: return "cudaErrorLaunchFailure";
    case cudaErrorNotSupported: return "cudaErrorNotSupported";
    case cudaErrorStreamCaptureUnsupported: return "cudaErrorStreamCaptureUnsupported";
    default: return "cudaErrorUnknown";
  }
}

const char* cudaGetErrorString(cudaError_t error) {
  switch (error) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorMemoryAllocation: return "out of memory";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorInvalidDevice: return "invalid device ordinal";
    case cudaErrorNotReady: return "device not ready";
    case cudaErrorLaunchOutOfResources: return "too many resources requested for launch";
    default: return cudaGetErrorName(error);
  }
}

cudaError_t cudaRuntimeGetVersion(int* version) {
  *version = 13000;
  return cudaSuccess;
}
cudaError_t cudaDriverGetVersion(int* version) {
  *version = 13000;
  return cudaSuccess;
}

cudaError_t cudaGetDeviceCount(int* count) {
  *count = 1;
  return cudaSuccess;
}
cudaError_t cudaGetDevice(int* device) {
  *device = g_device;
  return cudaSuccess;
}
cudaError_t cudaSetDevice(int device) {
  if (const cudaError_t e = check_device(device)) return record(e);
  g_device = device;
  return cudaSuccess;
}

cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attribute, int device) {
  if (const cudaError_t e = check_device(device)) return record(e);
  namespace L = device_limits;
  switch (attribute) {
    case cudaDevAttrMaxThreadsPerBlock: *value = L::kMaxThreadsPerBlock; break;
    case cudaDevAttrMaxBlockDimX: *value = 1024; break;
    case cudaDevAttrMaxBlockDimY: *value = 1024; break;
    case cudaDevAttrMaxBlockDimZ: *value = 64; break;
    case cudaDevAttrMaxGridDimX: *value = 2147483647; break;
    case cudaDevAttrMaxGridDimY: *value = 65535; break;
    case cudaDevAttrMaxGridDimZ: *value = 65535; break;
    case cudaDevAttrMaxSharedMemoryPerBlock: *value = L::kSharedPerBlock; break;
    case cudaDevAttrWarpSize: *value = 32; break;
    case cudaDevAttrMaxRegistersPerBlock: *value = L::kRegistersPerBlock; break;
    case cudaDevAttrMaxRegistersPerMultiprocessor: *value = L::kRegistersPerBlock; break;
    case cudaDevAttrMultiProcessorCount: *value = L::kMultiProcessors; break;
    case cudaDevAttrL2CacheSize: *value = L::kL2Bytes; break;
    case cudaDevAttrMaxThreadsPerMultiProcessor: *value = L::kMaxThreadsPerMultiprocessor; break;
    case cudaDevAttrComputeCapabilityMajor: *value = 9; break;
    case cudaDevAttrComputeCapabilityMinor: *value = 0; break;
    case cudaDevAttrMaxSharedMemoryPerMultiprocessor: *value = L::kSharedPerMultiprocessor; break;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = L::kSharedPerBlockOptin; break;
    case cudaDevAttrMaxBlocksPerMultiprocessor: *value = L::kMaxBlocksPerMultiprocessor; break;
    default: return record(cudaErrorInvalidValue);
  }
  return cudaSuccess;
}

cudaError_t cudaGetDeviceProperties(cudaDeviceProp* prop, int device) {
  if (const cudaError_t e = check_device(device)) return record(e);
  namespace L = device_limits;
  std::memset(prop, 0, sizeof(*prop));
  std::strncpy(prop->name, "fastloss simulated H200", sizeof(prop->name) - 1);
  prop->totalGlobalMem = size_t{141} << 30;
  prop->sharedMemPerBlock = L::kSharedPerBlock;
  prop->regsPerBlock = L::kRegistersPerBlock;
  prop->warpSize = 32;
  prop->maxThreadsPerBlock = L::kMaxThreadsPerBlock;
  prop->maxThreadsDim[0] = 1024;
  prop->maxThreadsDim[1] = 1024;
  prop->maxThreadsDim[2] = 64;
  prop->maxGridSize[0] = 2147483647;
  prop->maxGridSize[1] = 65535;
  prop->maxGridSize[2] = 65535;
  prop->major = 9;
  prop->minor = 0;
  prop->multiProcessorCount = L::kMultiProcessors;
  prop->l2CacheSize = L::kL2Bytes;
  prop->maxThreadsPerMultiProcessor = L::kMaxThreadsPerMultiprocessor;
  prop->sharedMemPerMultiprocessor = L::kSharedPerMultiprocessor;
  prop->regsPerMultiprocessor = L::kRegistersPerBlock;
  prop->sharedMemPerBlockOptin = L::kSharedPerBlockOptin;
  prop->maxBlocksPerMultiProcessor = L::kMaxBlocksPerMultiprocessor;
  return cudaSuccess;
}

cudaError_t cudaDeviceSynchronize() {
  ++stats().sync_calls;
  return cudaSuccess;
}

cudaError_t cudaMalloc(void** pointer, size_t bytes) {
  *pointer = std::aligned_alloc(256, (bytes + 255) / 256 * 256 + 256);
  return *pointer ? cudaSuccess : record(cudaErrorMemoryAllocation);
}
cudaError_t cudaFree(void* pointer) {
  std::free(pointer);
  return cudaSuccess;
}
cudaError_t cudaHostAlloc(void** pointer, size_t bytes, unsigned int) { return cudaMalloc(pointer, bytes); }
cudaError_t cudaMallocHost(void** pointer, size_t bytes) { return cudaMalloc(pointer, bytes); }
cudaError_t cudaFreeHost(void* pointer) { return cudaFree(pointer); }

cudaError_t cudaMemcpy(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind) {
  if (kind != cudaMemcpyHostToDevice && kind != cudaMemcpyHostToHost) ++stats().sync_calls;  // the host waits
  if (bytes) std::memmove(dst, src, bytes);
  return cudaSuccess;
}
cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind, cudaStream_t) {
  (void)kind;
  if (bytes) std::memmove(dst, src, bytes);
  return cudaSuccess;
}
cudaError_t cudaMemset(void* dst, int value, size_t bytes) {
  if (bytes) std::memset(dst, value, bytes);
  return cudaSuccess;
}
cudaError_t cudaMemsetAsync(void* dst, int value, size_t bytes, cudaStream_t) { return cudaMemset(dst, value, bytes); }

cudaError_t cudaStreamCreate(cudaStream_t* stream) { return cudaStreamCreateWithFlags(stream, 0); }
cudaError_t cudaStreamCreateWithFlags(cudaStream_t* stream, unsigned int flags) {
  *stream = new CUstream_st{flags};
  return cudaSuccess;
}
cudaError_t cudaStreamDestroy(cudaStream_t stream) {
  delete stream;
  return cudaSuccess;
}
cudaError_t cudaStreamSynchronize(cudaStream_t) {
  ++stats().sync_calls;
  return cudaSuccess;
}
cudaError_t cudaStreamQuery(cudaStream_t) {
  ++stats().host_polls;
  return cudaSuccess;
}
cudaError_t cudaStreamWaitEvent(cudaStream_t, cudaEvent_t, unsigned int) { return cudaSuccess; }
cudaError_t cudaStreamIsCapturing(cudaStream_t, cudaStreamCaptureStatus* status) {
  *status = cudaStreamCaptureStatusNone;
  return cudaSuccess;
}

cudaError_t cudaEventCreate(cudaEvent_t* event) { return cudaEventCreateWithFlags(event, 0); }
cudaError_t cudaEventCreateWithFlags(cudaEvent_t* event, unsigned int) {
  *event = new CUevent_st{std::chrono::steady_clock::now(), false};
  return cudaSuccess;
}
cudaError_t cudaEventDestroy(cudaEvent_t event) {
  delete event;
  return cudaSuccess;
}
cudaError_t cudaEventRecord(cudaEvent_t event, cudaStream_t) {
  if (event == nullptr) return record(cudaErrorInvalidResourceHandle);
  event->when = std::chrono::steady_clock::now();
  event->recorded = true;
  return cudaSuccess;
}
cudaError_t cudaEventQuery(cudaEvent_t event) {
  if (event == nullptr) return record(cudaErrorInvalidResourceHandle);
  ++stats().host_polls;
  return cudaSuccess;
}
cudaError_t cudaEventSynchronize(cudaEvent_t event) {
  if (event == nullptr) return record(cudaErrorInvalidResourceHandle);
  ++stats().sync_calls;
  return cudaSuccess;
}
cudaError_t cudaEventElapsedTime(float* ms, cudaEvent_t start, cudaEvent_t end) {
  if (start == nullptr || end == nullptr || !start->recorded || !end->recorded)
    return record(cudaErrorInvalidResourceHandle);
  *ms = std::chrono::duration<float, std::milli>(end->when - start->when).count();
  return cudaSuccess;
}

cudaError_t cudaFuncSetAttribute(const void* kernel, cudaFuncAttribute attribute, int value) {
  if (attribute == cudaFuncAttributeMaxDynamicSharedMemorySize) {
    if (value < 0 || value > device_limits::kSharedPerBlockOptin) return record(cudaErrorInvalidValue);
    std::lock_guard<std::mutex> lock(attribute_mutex());
    dynamic_limits()[kernel] = static_cast<size_t>(value);
    return cudaSuccess;
  }
  if (attribute == cudaFuncAttributePreferredSharedMemoryCarveout) return cudaSuccess;
  return record(cudaErrorInvalidValue);
}

cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, const void*, int block_size,
                                                           size_t dynamic_shared_bytes) {
  namespace L = device_limits;
  if (block_size <= 0 || block_size > L::kMaxThreadsPerBlock) return record(cudaErrorInvalidValue);
  const int warps = (block_size + 31) / 32;
  int by_threads = L::kMaxThreadsPerMultiprocessor / (warps * 32);
  // 1 KB of each block's shared memory is reserved by the system on sm_80+.
  const int by_shared = static_cast<int>(L::kSharedPerMultiprocessor / (dynamic_shared_bytes + 1024));
  int result = by_threads < by_shared ? by_threads : by_shared;
  if (result > L::kMaxBlocksPerMultiprocessor) result = L::kMaxBlocksPerMultiprocessor;
  *blocks = result;
  return cudaSuccess;
}
