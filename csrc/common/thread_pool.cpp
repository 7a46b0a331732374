// See thread_pool.h.
#include "common/thread_pool.h"

#include "common/omp_team.h"

#include <sched.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdlib>
#include <exception>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace fl {
namespace {

thread_local bool inside_piece = false;
int pool_size_limit();

// Marks the current thread as running a piece, so that a nested parallel loop runs serially.
struct PieceScope {
  PieceScope() { inside_piece = true; }
  ~PieceScope() { inside_piece = false; }
  PieceScope(const PieceScope&) = delete;
  PieceScope& operator=(const PieceScope&) = delete;
};

// FASTLOSS_CPU_POOL=own keeps fastloss's own pool even when an OpenMP runtime is loaded; the default
// borrows torch's OpenMP team (omp_team.h explains why).
bool use_openmp() {
  static const bool wanted = [] {
    const char* env = std::getenv("FASTLOSS_CPU_POOL");
    return env == nullptr || std::string(env) != "own";
  }();
  return wanted && omp_team_available();
}

int detect_thread_count() {
  if (const char* env = std::getenv("FASTLOSS_NUM_THREADS")) {
    const int n = std::atoi(env);
    if (n >= 1) return n;
  }
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) {
    const int n = CPU_COUNT(&set);
    if (n >= 1) return n;
  }
  const unsigned n = std::thread::hardware_concurrency();
  return n >= 1 ? static_cast<int>(n) : 1;
}

class Pool {
 public:
  explicit Pool(int threads) : owner_pid_(getpid()) {
    try {
      for (int i = 1; i < threads; ++i) workers_.emplace_back([this] { work(); });
    } catch (const std::exception&) {
      // Could not start them all (resource limits): work with the threads that did start.
    }
  }

  // Never joined: the pool lives for the process (joining at exit can deadlock in a Python teardown).
  ~Pool() = delete;

  int size() const { return static_cast<int>(workers_.size()) + 1; }
  pid_t owner_pid() const { return owner_pid_; }
  std::mutex& user_mutex() { return user_mutex_; }

  // The caller and the workers that wake up in time claim pieces one by one; the caller then waits
  // only for pieces already started. A worker that the scheduler has not run yet (the cores are
  // taken by torch's spinning OpenMP workers or another process) costs nothing: the caller does its
  // share, so a loop never waits a scheduler time slice for a thread that has not started.
  void run(int pieces, int helpers, const std::function<void(int)>& fn) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      task_ = &fn;
      pieces_ = pieces;
      next_ = 0;
      failure_ = nullptr;
    }
    for (int i = 0; i < helpers; ++i) wake_.notify_one();
    std::unique_lock<std::mutex> lock(mutex_);
    while (next_ < pieces_) {
      const int piece = next_++;
      lock.unlock();
      run_piece(fn, piece);
      lock.lock();
    }
    done_.wait(lock, [this] { return running_ == 0; });
    task_ = nullptr;
    pieces_ = 0;
    if (failure_) std::rethrow_exception(failure_);
  }

 private:
  void run_piece(const std::function<void(int)>& fn, int piece) {
    const PieceScope scope;
    try {
      fn(piece);
    } catch (...) {
      std::lock_guard<std::mutex> lock(mutex_);
      if (!failure_) failure_ = std::current_exception();
    }
  }

  void work() {
    std::unique_lock<std::mutex> lock(mutex_);
    for (;;) {
      wake_.wait(lock, [this] { return next_ < pieces_; });
      const int piece = next_++;
      ++running_;
      const std::function<void(int)>* task = task_;
      lock.unlock();
      run_piece(*task, piece);
      lock.lock();
      if (--running_ == 0) done_.notify_one();
    }
  }

  const pid_t owner_pid_;
  std::vector<std::thread> workers_;
  std::mutex user_mutex_;  // one parallel loop at a time
  std::mutex mutex_;
  std::condition_variable wake_;
  std::condition_variable done_;
  const std::function<void(int)>* task_ = nullptr;
  int pieces_ = 0;   // of the current loop; 0 between loops
  int next_ = 0;     // the next unclaimed piece
  int running_ = 0;  // pieces claimed by workers and not finished
  std::exception_ptr failure_;
};

Pool& pool() {
  static std::mutex create_mutex;
  static Pool* instance = nullptr;
  std::lock_guard<std::mutex> lock(create_mutex);
  // After fork() the child has no workers: start a new pool (the old one is left alone).
  if (instance == nullptr || instance->owner_pid() != getpid()) instance = new Pool(pool_size_limit());
  return *instance;
}

int pool_size_limit() {
  static const int count = detect_thread_count();  // detected once: the pool's size follows it
  return count;
}

std::atomic<int> thread_limit{0};  // 0: no limit set

}  // namespace

int cpu_thread_count() {
  const int limit = thread_limit.load(std::memory_order_relaxed);
  const int size = pool_size_limit();
  return limit > 0 && limit < size ? limit : size;
}

const char* cpu_pool_name() { return use_openmp() ? "openmp" : "fastloss"; }

void set_cpu_thread_limit(int threads) { thread_limit.store(threads > 0 ? threads : 1, std::memory_order_relaxed); }

void run_pieces(int pieces, const std::function<void(int)>& fn) {
  if (pieces <= 1 || inside_piece) {
    for (int i = 0; i < pieces; ++i) fn(i);
    return;
  }
  if (use_openmp()) {
    // One loop at a time, as with the pool: a second calling thread would get a second team.
    static std::mutex in_use_mutex;
    std::unique_lock<std::mutex> in_use(in_use_mutex, std::try_to_lock);
    if (!in_use.owns_lock()) {
      for (int i = 0; i < pieces; ++i) fn(i);
      return;
    }
    omp_team_run(pieces, std::min(pieces, cpu_thread_count()), [&](int piece) {
      const PieceScope scope;
      fn(piece);
    });
    return;
  }
  Pool& p = pool();
  std::unique_lock<std::mutex> in_use(p.user_mutex(), std::try_to_lock);
  if (!in_use.owns_lock()) {
    for (int i = 0; i < pieces; ++i) fn(i);
    return;
  }
  p.run(pieces, std::min(pieces, cpu_thread_count()) - 1, fn);
}

}  // namespace fl
