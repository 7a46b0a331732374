// Errors found on the device, reported to the host without a synchronization (as torch's
// device-side asserts are, but without killing the context).
//
// A kernel that meets an input it cannot stop on (an out-of-range class index) keeps its defined
// behaviour (NaN for that row) and also reports the first such error of the device through a
// DeviceErrorSlot:
//   claim  one int64 in device memory, 0 when free: the reporting thread takes it with atomicCAS, so
//          exactly one error's details are written (device atomics stay in device memory);
//   words  four int64 in pinned host memory (the same pointer on the device under UVA): word0 the
//          error code (0: none), words 1..3 its details. The details are written first, then a
//          system-wide fence, then the code: a host that sees the code sees its details.
// The host reads word0 with a plain volatile load, no cudart call and no wait
// (python/fastloss/_library.py: raise_pending_device_errors, fastloss.check_device_errors), then
// clears the words and, in stream order, the claim.
// On the simulated device both are host memory.
#pragma once

#include <cstdint>

#include "common/host_device.h"
#include "common/stream.h"

namespace fl {

constexpr int kDeviceErrorWords = 4;

struct DeviceErrorSlot {
  int64_t* claim = nullptr;  // device memory; null: do not report
  int64_t* words = nullptr;  // pinned host memory, kDeviceErrorWords entries
  int64_t code = 0;          // what this call reports (Python keeps the code -> message table)
};

#if defined(__CUDACC__)
// Reports (a, b, c) under the slot's code unless another error holds the slot. Any thread may call it.
__device__ inline void report_device_error(const DeviceErrorSlot& slot, int64_t a, int64_t b, int64_t c) {
  if (slot.claim == nullptr || slot.words == nullptr || slot.code == 0) return;
  unsigned long long* claim = reinterpret_cast<unsigned long long*>(slot.claim);
  if (*reinterpret_cast<volatile unsigned long long*>(claim) != 0ull) return;  // taken: skip the atomic
  if (atomicCAS(claim, 0ull, 1ull) != 0ull) return;
  volatile int64_t* words = slot.words;
  words[1] = a;
  words[2] = b;
  words[3] = c;
  __threadfence_system();
  words[0] = slot.code;
  __threadfence_system();
}
#endif

#if defined(FASTLOSS_WITH_CUDA)
// One thread: if *flag != 0, reports (details[0], details[1], details[2]) under slot.code. For errors
// that torch ops compute on the device (the factored layer's guard). flag and details in device memory.
void report_device_error_if_cuda(const DeviceErrorSlot& slot, const int64_t* flag, const int64_t* details, int device,
                                 cudaStream_t stream);
#endif

}  // namespace fl
