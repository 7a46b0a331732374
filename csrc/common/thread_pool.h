// The CPU thread pool behind fl::parallel_for.
//
// By default the pieces run on the team of the OpenMP runtime torch has loaded (omp_team.h), whose
// threads spin for a while after each torch op and so pick our pieces up at once. The pool here is
// for when there is none (no torch, FASTLOSS_CPU_POOL=own, a forked child): why it is not an OpenMP
// runtime of its own: two runtimes in one process whose idle threads spin-wait take turns on the
// cores in scheduler time slices; on a 2-core machine that made both torch's ops and ours about 10x
// slower. Its workers sleep on a condition variable when idle, so they never take a core from torch.
#pragma once

#include <functional>

namespace fl {

// Threads a parallel loop may use, the calling thread included: the limit set with
// set_cpu_thread_limit (the Python layer passes torch.get_num_threads()), else
// FASTLOSS_NUM_THREADS if set, else the CPUs this process may run on.
int cpu_thread_count();

// What runs the pieces of parallel loops: "openmp" (the team of the OpenMP runtime torch loaded,
// omp_team.h) or "fastloss" (the pool here: no OpenMP runtime loaded, FASTLOSS_CPU_POOL=own, or a
// forked child).
const char* cpu_pool_name();

// Caps the threads of later parallel loops (>= 1; values above the pool's size are clipped).
void set_cpu_thread_limit(int threads);

// Calls fn(piece) for every piece in [0, pieces): the caller and the threads that arrive claim
// pieces one by one, and the caller returns when all are done. Runs serially when called from inside
// a piece, or while another thread is running a loop. The first exception thrown by a piece is
// rethrown here.
void run_pieces(int pieces, const std::function<void(int)>& fn);

}  // namespace fl
