// Runs parallel pieces on the OpenMP runtime that is already loaded in the process (torch's libgomp),
// found at run time with dlopen(RTLD_NOLOAD): fastloss itself neither links nor bundles OpenMP.
//
// Why: after each parallel region torch's OpenMP workers spin-wait for more work (libgomp's default
// GOMP_SPINCOUNT). A second pool whose workers are woken from a condition variable then waits for
// the scheduler to take a core from a spinner, which made fastloss ops 1.3-60x slower right after a
// torch op (bench/threads.py). Handing our pieces to those same workers costs nothing when they
// spin, and they spin exactly as long as they would after a torch op.
#pragma once

#include <functional>

namespace fl {

// True when an OpenMP runtime with the GOMP entry points is loaded in this process (not in a child
// forked after this process used it: libgomp's team does not survive fork).
bool omp_team_available();

// Calls fn(piece) for every piece in [0, pieces) on a team of `threads` OpenMP threads (the caller
// is one), which claim pieces as they come. The team must not outnumber the cores: libgomp keeps
// every thread it ever started spinning after a region. Pieces never throw out of the region: the
// first exception is rethrown here.
void omp_team_run(int pieces, int threads, const std::function<void(int)>& fn);

}  // namespace fl
