// The one-thread kernel that turns a device-side flag computed by torch ops into a device error
// report (see device_error.h).
#include "common/cuda_check.cuh"
#include "common/device_error.h"

namespace fl {
namespace {

__global__ void report_if_kernel(DeviceErrorSlot slot, const int64_t* flag, const int64_t* details) {
  if (*flag != 0) report_device_error(slot, details[0], details[1], details[2]);
}

}  // namespace

void report_device_error_if_cuda(const DeviceErrorSlot& slot, const int64_t* flag, const int64_t* details, int device,
                                 cudaStream_t stream) {
  CudaDeviceGuard guard(device);
  report_if_kernel<<<1, 1, 0, stream>>>(slot, flag, details);
  FL_CUDA_CHECK_LAUNCH(report_if_kernel);
}

}  // namespace fl
