// CPU parallel loop over the fastloss thread pool (thread_pool.h), serial for small work.
#pragma once

#include <algorithm>
#include <cstdint>

#include "common/thread_pool.h"

namespace fl {

// Calls body(begin, end) over [0, n) in at most cpu_thread_count() contiguous pieces of at
// least `grain` items each. An exception thrown by a piece is rethrown on the calling thread.
template <class Body>
void parallel_for(int64_t n, int64_t grain, Body&& body) {
  if (n <= 0) return;
  grain = std::max<int64_t>(grain, 1);
  const int64_t pieces = std::min<int64_t>((n + grain - 1) / grain, cpu_thread_count());
  if (pieces <= 1) {
    body(int64_t(0), n);
    return;
  }
  run_pieces(static_cast<int>(pieces), [&](int piece) { body(n * piece / pieces, n * (piece + 1) / pieces); });
}

}  // namespace fl
