// Checking every CUDA call and launch, and the device guard. Include only from .cu files.
#pragma once

#include <cuda_runtime.h>

#include "common/error.h"

namespace fl {

[[noreturn]] inline void throw_cuda_error(cudaError_t status, const char* what, const char* file, int line) {
  throw_runtime_error("fastloss: CUDA error '", cudaGetErrorString(status), "' (", cudaGetErrorName(status),
                      ") from ", what, " at ", file, ":", line);
}

// Makes `device` current for the scope and restores the previous device after.
class CudaDeviceGuard {
 public:
  explicit CudaDeviceGuard(int device);
  ~CudaDeviceGuard();
  CudaDeviceGuard(const CudaDeviceGuard&) = delete;
  CudaDeviceGuard& operator=(const CudaDeviceGuard&) = delete;

 private:
  int previous_ = -1;
  bool switched_ = false;
};

// Number of streaming multiprocessors of `device` (cached per device).
int cuda_sm_count(int device);

}  // namespace fl

#define FL_CUDA_CHECK(expr)                                                     \
  do {                                                                          \
    const cudaError_t fl_status_ = (expr);                                      \
    if (fl_status_ != cudaSuccess) fl::throw_cuda_error(fl_status_, #expr, __FILE__, __LINE__); \
  } while (0)

// After every <<<...>>>: launch-configuration errors surface here, not at the next call.
// cudaGetLastError also clears the error, so one failed launch does not fail every later one.
#define FL_CUDA_CHECK_LAUNCH(kernel_name)                                                   \
  do {                                                                                      \
    const cudaError_t fl_status_ = cudaGetLastError();                                      \
    if (fl_status_ != cudaSuccess)                                                          \
      fl::throw_cuda_error(fl_status_, "the launch of " #kernel_name, __FILE__, __LINE__); \
  } while (0)
