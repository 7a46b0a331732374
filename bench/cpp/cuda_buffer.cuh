// Device memory for the CUDA cases: an owning buffer, and checked copies to and
// from host vectors. Include only from .cu files.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <vector>

#include "common/cuda_check.cuh"

namespace fl_bench {

class DeviceBuffer {
 public:
  explicit DeviceBuffer(size_t bytes) : bytes_(bytes) {
    if (bytes_ > 0) FL_CUDA_CHECK(cudaMalloc(&data_, bytes_));
  }
  template <class T>
  explicit DeviceBuffer(const std::vector<T>& host) : DeviceBuffer(host.size() * sizeof(T)) {
    if (bytes_ > 0) FL_CUDA_CHECK(cudaMemcpy(data_, host.data(), bytes_, cudaMemcpyHostToDevice));
  }
  ~DeviceBuffer() {
    if (data_) cudaFree(data_);  // unchecked: a destructor must not throw
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;

  void* get() const { return data_; }
  size_t bytes() const { return bytes_; }

  // The whole buffer as `count` values of T; the caller has synchronized.
  template <class T>
  std::vector<T> download(size_t count) const {
    std::vector<T> host(count);
    if (count > 0) FL_CUDA_CHECK(cudaMemcpy(host.data(), data_, count * sizeof(T), cudaMemcpyDeviceToHost));
    return host;
  }

 private:
  void* data_ = nullptr;
  size_t bytes_ = 0;
};

}  // namespace fl_bench
