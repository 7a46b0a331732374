// See omp_team.h.
#include "common/omp_team.h"

#include <dlfcn.h>
#include <pthread.h>

#include <atomic>
#include <exception>
#include <mutex>

namespace fl {
namespace {

using GompParallel = void (*)(void (*)(void*), void*, unsigned, unsigned);

struct Runtime {
  GompParallel parallel = nullptr;
};

// Only a runtime that is already loaded (RTLD_NOLOAD): torch's Linux wheels load libgomp.so.1 with
// libtorch_cpu. Loading one ourselves would add the second spinning runtime this file avoids.
Runtime find_runtime() {
  void* lib = dlopen("libgomp.so.1", RTLD_LAZY | RTLD_NOLOAD);
  if (lib == nullptr) return {};
  Runtime r;
  r.parallel = reinterpret_cast<GompParallel>(dlsym(lib, "GOMP_parallel"));
  return r;
}

const Runtime& runtime() {
  static const Runtime r = find_runtime();  // looked up on the first parallel loop, after torch loaded
  return r;
}

// libgomp keeps the parent's worker handles in a forked child and can hang there; a child uses the
// fastloss pool instead, which restarts after fork.
bool forked_child = false;
const int atfork_registered = pthread_atfork(nullptr, nullptr, [] { forked_child = true; });

struct Region {
  const std::function<void(int)>* fn;
  int pieces;
  const Runtime* rt;
  std::atomic<int> next{0};
  std::mutex failure_mutex;
  std::exception_ptr failure;
};

// The region body: every team thread claims pieces until none are left, so a thread that starts
// late (its core was taken) gets fewer, and a team smaller than asked (nested region) gets them all.
void region_body(void* data) {
  Region& region = *static_cast<Region*>(data);
  for (int piece = region.next++; piece < region.pieces; piece = region.next++) {
    try {
      (*region.fn)(piece);
    } catch (...) {
      std::lock_guard<std::mutex> lock(region.failure_mutex);
      if (!region.failure) region.failure = std::current_exception();
    }
  }
}

}  // namespace

bool omp_team_available() {
  (void)atfork_registered;
  return !forked_child && runtime().parallel != nullptr;
}

void omp_team_run(int pieces, int threads, const std::function<void(int)>& fn) {
  Region region;
  region.fn = &fn;
  region.pieces = pieces;
  region.rt = &runtime();
  region.rt->parallel(&region_body, &region, static_cast<unsigned>(threads), 0);
  if (region.failure) std::rethrow_exception(region.failure);
}

}  // namespace fl
