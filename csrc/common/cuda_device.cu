// Device guard and cached device properties (see cuda_check.cuh).
#include <mutex>
#include <vector>

#include "common/cuda_check.cuh"

namespace fl {

CudaDeviceGuard::CudaDeviceGuard(int device) {
  FL_CUDA_CHECK(cudaGetDevice(&previous_));
  if (previous_ != device) {
    FL_CUDA_CHECK(cudaSetDevice(device));
    switched_ = true;
  }
}

CudaDeviceGuard::~CudaDeviceGuard() {
  if (switched_) cudaSetDevice(previous_);  // no throw from a destructor
}

int cuda_sm_count(int device) {
  static std::mutex mutex;
  static std::vector<int> cache;
  std::lock_guard<std::mutex> lock(mutex);
  if (device < 0) throw_invalid_argument("fastloss: invalid CUDA device index ", device);
  if (static_cast<size_t>(device) >= cache.size()) cache.resize(device + 1, 0);
  if (cache[device] == 0) {
    int count = 0;
    FL_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
    cache[device] = count;
  }
  return cache[device];
}

}  // namespace fl
