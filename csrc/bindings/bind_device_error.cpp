// The host side of the device error slots (common/device_error.h): a volatile read of the pinned
// words (no cudart call, so no synchronization and nothing a CUDA graph could not hold), and the
// report kernel for flags computed by torch ops.
#include <pybind11/pybind11.h>

#include <cstdint>

#include "bindings/pointers.h"
#include "common/device_error.h"

namespace py = pybind11;
using fl::bindings::ptr;

void bind_device_error(py::module_& m) {
  m.attr("device_error_words") = fl::kDeviceErrorWords;
  m.def(
      "device_error_peek", [](uintptr_t words) { return static_cast<int64_t>(ptr<volatile int64_t>(words)[0]); },
      "The error code in a slot's pinned words (0: none), read without waiting for the device.");
  m.def(
      "device_error_take",
      [](uintptr_t address) -> py::tuple {
        volatile int64_t* words = ptr<volatile int64_t>(address);
        const int64_t code = words[0];
        if (code == 0) return py::make_tuple(int64_t(0), int64_t(0), int64_t(0), int64_t(0));
        const int64_t a = words[1], b = words[2], c = words[3];  // written before the code (device_error.h)
        words[1] = 0;
        words[2] = 0;
        words[3] = 0;
        words[0] = 0;
        return py::make_tuple(code, a, b, c);
      },
      "Reads and clears a slot's pinned words: (code, detail, detail, detail); the caller resets the claim.");
#if defined(FASTLOSS_WITH_CUDA)
  m.def(
      "device_error_report_if_cuda",
      [](uintptr_t claim, uintptr_t words, int64_t code, uintptr_t flag, uintptr_t details, int device,
         uintptr_t stream) {
        fl::DeviceErrorSlot slot{ptr<int64_t>(claim), ptr<int64_t>(words), code};
        fl::report_device_error_if_cuda(slot, ptr<const int64_t>(flag), ptr<const int64_t>(details), device,
                                        reinterpret_cast<cudaStream_t>(stream));
      },
      py::call_guard<py::gil_scoped_release>());
#endif
}
