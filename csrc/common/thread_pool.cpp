// See thread_pool.h.
#include "common/thread_pool.h"

#include <sched.h>
#include <unistd.h>

#include <atomic>
#include <condition_variable>
#include <cstdlib>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

namespace fl {
namespace {

thread_local bool inside_piece = false;
int pool_size_limit();

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
      for (int i = 1; i < threads; ++i) workers_.emplace_back([this, i] { work(i); });
    } catch (const std::exception&) {
      // Could not start them all (resource limits): work with the threads that did start.
    }
  }

  // Never joined: the pool lives for the process (joining at exit can deadlock in a Python teardown).
  ~Pool() = delete;

  int size() const { return static_cast<int>(workers_.size()) + 1; }
  pid_t owner_pid() const { return owner_pid_; }
  std::mutex& user_mutex() { return user_mutex_; }

  void run(int pieces, const std::function<void(int)>& fn) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      task_ = &fn;
      pieces_ = pieces;
      pending_ = pieces - 1;
      failure_ = nullptr;
      ++generation_;
    }
    wake_.notify_all();
    run_piece(fn, 0);
    std::unique_lock<std::mutex> lock(mutex_);
    done_.wait(lock, [this] { return pending_ == 0; });
    task_ = nullptr;
    if (failure_) std::rethrow_exception(failure_);
  }

 private:
  void run_piece(const std::function<void(int)>& fn, int piece) {
    inside_piece = true;
    try {
      fn(piece);
    } catch (...) {
      std::lock_guard<std::mutex> lock(mutex_);
      if (!failure_) failure_ = std::current_exception();
    }
    inside_piece = false;
  }

  void work(int index) {
    unsigned long long seen = 0;
    for (;;) {
      const std::function<void(int)>* task;
      {
        std::unique_lock<std::mutex> lock(mutex_);
        wake_.wait(lock, [&] { return generation_ != seen; });
        seen = generation_;
        if (index >= pieces_) continue;  // not needed for this loop
        task = task_;
      }
      run_piece(*task, index);
      std::lock_guard<std::mutex> lock(mutex_);
      if (--pending_ == 0) done_.notify_one();
    }
  }

  const pid_t owner_pid_;
  std::vector<std::thread> workers_;
  std::mutex user_mutex_;  // one parallel loop at a time
  std::mutex mutex_;
  std::condition_variable wake_;
  std::condition_variable done_;
  const std::function<void(int)>* task_ = nullptr;
  int pieces_ = 0;
  int pending_ = 0;
  unsigned long long generation_ = 0;
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

void set_cpu_thread_limit(int threads) { thread_limit.store(threads > 0 ? threads : 1, std::memory_order_relaxed); }

void run_pieces(int pieces, const std::function<void(int)>& fn) {
  if (pieces <= 1 || inside_piece) {
    for (int i = 0; i < pieces; ++i) fn(i);
    return;
  }
  Pool& p = pool();
  std::unique_lock<std::mutex> in_use(p.user_mutex(), std::try_to_lock);
  if (!in_use.owns_lock() || pieces > p.size()) {
    for (int i = 0; i < pieces; ++i) fn(i);
    return;
  }
  p.run(pieces, fn);
}

}  // namespace fl
