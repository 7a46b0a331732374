// The CUDA backend: each sample is bracketed by cudaEvents on a non-blocking
// stream (so no implicit sync with the legacy default stream adds to it), after
// a memset of twice the L2 size, so that every sample reads its inputs from
// HBM as in training, where the logits were written long before the loss runs.
#include <cuda_runtime.h>

#include <algorithm>
#include <string>

#include "common/cuda_check.cuh"
#include "harness.h"
#include "registry.h"

namespace fl_bench {
namespace {

class CudaBackend final : public Backend {
 public:
  Device device() const override { return Device::Cuda; }

  std::string unavailable_reason() override {
    probe();
    return reason_;
  }

  std::string description() override {
    probe();
    return name_;
  }

  DeviceContext context() override {
    probe();
    return DeviceContext{device_, stream_};
  }

  double time_sample(PreparedCase& work) override {
    FL_CUDA_CHECK(cudaMemsetAsync(flush_, 0, flush_bytes_, stream_));
    FL_CUDA_CHECK(cudaEventRecord(start_, stream_));
    work.run();
    FL_CUDA_CHECK(cudaEventRecord(stop_, stream_));
    // Also where an asynchronous kernel fault surfaces, as a thrown error.
    FL_CUDA_CHECK(cudaEventSynchronize(stop_));
    float milliseconds = 0;
    FL_CUDA_CHECK(cudaEventElapsedTime(&milliseconds, start_, stop_));
    return static_cast<double>(milliseconds) * 1e-3;
  }

  void shutdown() override {
    // Return codes ignored: this runs on the way out, after any error was reported.
    if (stop_) cudaEventDestroy(stop_);
    if (start_) cudaEventDestroy(start_);
    if (stream_) cudaStreamDestroy(stream_);
    if (flush_) cudaFree(flush_);
    stop_ = start_ = nullptr;
    stream_ = nullptr;
    flush_ = nullptr;
  }

 private:
  // Looks for a GPU once. No GPU (or no driver) is a skip, not an error.
  void probe() {
    if (probed_) return;
    int count = 0;
    const cudaError_t status = cudaGetDeviceCount(&count);
    if (status != cudaSuccess || count == 0) {
      cudaGetLastError();  // clear the error so that it does not resurface in a later check
      reason_ = status != cudaSuccess
                    ? std::string("no usable CUDA device (cudaGetDeviceCount: ") + cudaGetErrorName(status) + ")"
                    : std::string("no CUDA device");
      probed_ = true;
      return;
    }
    FL_CUDA_CHECK(cudaSetDevice(device_));
    cudaDeviceProp properties{};
    FL_CUDA_CHECK(cudaGetDeviceProperties(&properties, device_));
    name_ = properties.name;
    int l2_bytes = 0;
    FL_CUDA_CHECK(cudaDeviceGetAttribute(&l2_bytes, cudaDevAttrL2CacheSize, device_));
    flush_bytes_ = 2 * static_cast<size_t>(std::max(l2_bytes, 1));
    FL_CUDA_CHECK(cudaMalloc(&flush_, flush_bytes_));
    FL_CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
    FL_CUDA_CHECK(cudaEventCreate(&start_));
    FL_CUDA_CHECK(cudaEventCreate(&stop_));
    probed_ = true;  // only now: a setup that threw is retried (and throws) again
  }

  bool probed_ = false;
  std::string reason_;
  std::string name_;
  int device_ = 0;
  void* flush_ = nullptr;
  size_t flush_bytes_ = 0;
  cudaStream_t stream_ = nullptr;
  cudaEvent_t start_ = nullptr;
  cudaEvent_t stop_ = nullptr;
};

const BackendRegistrar registrar(std::make_unique<CudaBackend>());

}  // namespace
}  // namespace fl_bench
