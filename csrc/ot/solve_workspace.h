// The solver's scratch memory, carved out of the one workspace buffer the caller allocates
// (solve_workspace_bytes): per-problem convergence state, per-row errors and a scratch potential.
#pragma once

#include <algorithm>
#include <cstdint>

#include "ot/ot_kernels.h"

namespace fl::ot {

struct SolveWorkspace {
  int32_t* done_at;  // (batch): iteration at which the problem converged, -1 while running
  int32_t* active;   // (1): problems still running after the last check (CUDA)
  void* row_err;     // (batch, max(n, m)) accumulator type
  void* scratch;     // (batch, max(n, m)) accumulator type
};

inline int64_t align_up(int64_t bytes) { return (bytes + 255) / 256 * 256; }

inline int64_t accumulator_bytes(const Geometry& g) { return g.dtype == DType::Float64 ? 8 : 4; }

inline SolveWorkspace carve_workspace(const Geometry& g, void* base, int64_t* total_bytes = nullptr) {
  const int64_t longest = g.batch * std::max(g.n, g.m) * accumulator_bytes(g);
  int64_t offset = 0;
  auto take = [&](int64_t bytes) {
    char* p = static_cast<char*>(base) + offset;
    offset += align_up(bytes);
    return static_cast<void*>(p);
  };
  SolveWorkspace w;
  w.done_at = static_cast<int32_t*>(take(g.batch * 4));
  w.active = static_cast<int32_t*>(take(4));
  w.row_err = take(longest);
  w.scratch = take(longest);
  if (total_bytes) *total_bytes = offset;
  return w;
}

}  // namespace fl::ot
