// CPU parallel loop. Uses OpenMP when the build found it (the threads follow
// OMP_NUM_THREADS), runs serially otherwise or when the work is small.
#pragma once

#include <algorithm>
#include <cstdint>
#include <exception>

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace fl {

inline int cpu_thread_count() {
#if defined(_OPENMP)
  return omp_get_max_threads();
#else
  return 1;
#endif
}

// Calls body(begin, end) over [0, n) in pieces of at least `grain` items.
// An exception thrown by a piece is rethrown on the calling thread.
template <class Body>
void parallel_for(int64_t n, int64_t grain, Body&& body) {
  if (n <= 0) return;
  grain = std::max<int64_t>(grain, 1);
  const int64_t max_pieces = (n + grain - 1) / grain;
  const int64_t pieces = std::min<int64_t>(max_pieces, cpu_thread_count());
  if (pieces <= 1) {
    body(int64_t(0), n);
    return;
  }
#if defined(_OPENMP)
  std::exception_ptr failure = nullptr;
#pragma omp parallel for num_threads(static_cast<int>(pieces)) schedule(static, 1)
  for (int64_t piece = 0; piece < pieces; ++piece) {
    const int64_t begin = n * piece / pieces;
    const int64_t end = n * (piece + 1) / pieces;
    try {
      body(begin, end);
    } catch (...) {
#pragma omp critical(fastloss_parallel_for_failure)
      if (!failure) failure = std::current_exception();
    }
  }
  if (failure) std::rethrow_exception(failure);
#else
  body(int64_t(0), n);
#endif
}

}  // namespace fl
