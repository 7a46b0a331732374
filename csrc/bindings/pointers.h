// Pointers travel from Python as integers (tensor.data_ptr()); every binding file turns them back
// with ptr<T>(address).
#pragma once

#include <cstdint>

namespace fl::bindings {

template <class T = void>
T* ptr(uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

}  // namespace fl::bindings
