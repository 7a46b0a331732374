// Error reporting for the kernels. Argument errors are std::invalid_argument
// (ValueError in Python), everything else std::runtime_error (RuntimeError).
// Messages name the function and the argument, as the Python layer does.
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>

namespace fl {

template <class... Parts>
std::string concat(const Parts&... parts) {
  std::ostringstream out;
  (out << ... << parts);
  return out.str();
}

template <class... Parts>
[[noreturn]] void throw_invalid_argument(const Parts&... parts) {
  throw std::invalid_argument(concat(parts...));
}

template <class... Parts>
[[noreturn]] void throw_runtime_error(const Parts&... parts) {
  throw std::runtime_error(concat(parts...));
}

}  // namespace fl

// FL_CHECK_ARG(cond, "fastloss.zloss: ...", value, ...): raise before any work is done.
#define FL_CHECK_ARG(cond, ...)                 \
  do {                                          \
    if (!(cond)) fl::throw_invalid_argument(__VA_ARGS__); \
  } while (0)
