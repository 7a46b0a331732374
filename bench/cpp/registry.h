// Kernel families and device backends register themselves from their own files
// through static registrar objects, so adding a family means adding
// bench_<family>.cpp (and bench_<family>_cuda.cu) with no edit to main.cpp.
// The bench sources are compiled straight into the executable, not into a
// static library, so the linker keeps every registrar.
#pragma once

#include <memory>
#include <vector>

#include "harness.h"

namespace fl_bench {

// Returns a family's cases; `quick` asks for the small CI shapes.
using CaseGenerator = std::vector<CaseSpec> (*)(bool quick);

struct FamilyRegistrar {
  // `key` orders the families in the output ("spherical/cpu", "spherical/cuda").
  FamilyRegistrar(const char* key, CaseGenerator generate);
};

struct BackendRegistrar {
  explicit BackendRegistrar(std::unique_ptr<Backend> backend);
};

// All registered cases, families in key order, each family's cases in its own order.
std::vector<CaseSpec> registered_cases(bool quick);

// The backend for `device`, or null when this build has none (CUDA off).
Backend* find_backend(Device device);

void shutdown_backends();

}  // namespace fl_bench
