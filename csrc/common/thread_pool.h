// The CPU thread pool behind fl::parallel_for.
//
// Why not OpenMP: the torch wheel carries its own OpenMP runtime, and two runtimes in one
// process whose idle threads spin-wait take turns on the cores in scheduler time slices; on a
// 2-core machine that made both torch's ops and ours about 10x slower. These workers sleep on a
// condition variable when idle, so they never take a core from torch.
#pragma once

#include <functional>

namespace fl {

// Threads a parallel loop may use, the calling thread included: the limit set with
// set_cpu_thread_limit (the Python layer passes torch.get_num_threads()), else
// FASTLOSS_NUM_THREADS if set, else the CPUs this process may run on.
int cpu_thread_count();

// Caps the threads of later parallel loops (>= 1; values above the pool's size are clipped).
void set_cpu_thread_limit(int threads);

// Calls fn(piece) for every piece in [0, pieces), spread over the pool; the caller runs piece 0
// and returns when all are done. Runs serially when called from inside a piece, or while another
// thread is using the pool. The first exception thrown by a piece is rethrown here.
void run_pieces(int pieces, const std::function<void(int)>& fn);

}  // namespace fl
