// CPU parallel loop over the fastloss thread pool (thread_pool.h), serial for small work.
#pragma once

#include <algorithm>
#include <cstdint>

#include "common/thread_pool.h"

namespace fl {

// Pieces per thread: the threads claim pieces as they come (thread_pool.h), so a worker that starts
// late (its core was busy) still takes a share, and the caller is never left waiting for a long piece.
inline constexpr int64_t kPiecesPerThread = 4;

// Calls body(begin, end) over [0, n) in contiguous pieces of at least `grain` items each, at most
// kPiecesPerThread per thread of cpu_thread_count(); with one thread, or when n <= grain, body runs
// inline on the calling thread. An exception thrown by a piece is rethrown on the calling thread.
template <class Body>
void parallel_for(int64_t n, int64_t grain, Body&& body) {
  if (n <= 0) return;
  grain = std::max<int64_t>(grain, 1);
  const int threads = cpu_thread_count();
  const int64_t pieces = threads <= 1 ? 1 : std::min<int64_t>((n + grain - 1) / grain, threads * kPiecesPerThread);
  if (pieces <= 1) {
    body(int64_t(0), n);
    return;
  }
  run_pieces(static_cast<int>(pieces), [&](int piece) { body(n * piece / pieces, n * (piece + 1) / pieces); });
}

}  // namespace fl
