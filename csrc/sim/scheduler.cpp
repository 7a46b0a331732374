// The simulated device's execution: a grid runs one block at a time; a block's threads are fibers
// that switch only at barriers and warp collectives, in the order the schedule picks. Barrier,
// collective and shared-memory rules are checked as the CUDA programming guide states them, and a
// violation stops the block with a message naming the kernel, the block and the threads.
#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <sstream>

#include "fiber.h"
#include "shared_memory.h"
#include "sim_core.h"
#include "sim_runtime.h"

namespace fl_sim {
namespace {

constexpr int kMaxThreads = device_limits::kMaxThreadsPerBlock;
constexpr int kWords = kMaxThreads / 64;

enum class Status : uint8_t { Runnable, AtBarrier, AtWarp, Exited };

struct SimThread {
  uint3 index{};
  unsigned linear = 0;
  Status status = Status::Exited;
  Fiber fiber;
  BarrierKind barrier_kind = BarrierKind::Sync;
  const char* barrier_file = nullptr;
  int barrier_line = 0;
  int predicate = 0;
  int barrier_result = 0;
  CpAsyncState cp_async;
};

struct Collective {
  uint32_t mask = 0;
  uint32_t arrived = 0;
  const char* kind = nullptr;
  const char* site = nullptr;
  int line = 0;
  void* lane_data[32] = {};
};

// Settings: process-wide, set from the environment at load and from Python (bind_sim.cpp).
struct Settings {
  Schedule schedule = Schedule::Random;
  uint64_t seed = 0x5eed;
  bool permuted_fragments = false;
  size_t stack_bytes = 256 * 1024;
  Settings() {
    if (const char* s = std::getenv("FASTLOSS_SIM_SCHEDULE")) {
      if (!parse_schedule(s, &schedule)) {
        std::fprintf(stderr, "fastloss simulator: unknown FASTLOSS_SIM_SCHEDULE '%s', using random\n", s);
      }
    }
    if (const char* s = std::getenv("FASTLOSS_SIM_SEED")) seed = std::strtoull(s, nullptr, 0);
    if (const char* s = std::getenv("FASTLOSS_SIM_PERMUTE_FRAGMENTS")) permuted_fragments = std::atoi(s) != 0;
#if defined(__SANITIZE_ADDRESS__)
    stack_bytes = 1024 * 1024;  // instrumented frames are larger
#endif
    if (const char* s = std::getenv("FASTLOSS_SIM_STACK_KB")) stack_bytes = std::strtoull(s, nullptr, 0) * 1024;
  }
};
Settings& settings() {
  static Settings instance;
  return instance;
}
Stats g_stats;

// The state of the grid being run on this OS thread.
struct Machine {
  const LaunchConfig* config = nullptr;
  void (*body)(void*) = nullptr;
  void* body_context = nullptr;
  uint3 block_index{};
  unsigned threads = 0;
  std::vector<std::unique_ptr<SimThread>> pool;  // fibers and stacks, kept across launches
  Fiber scheduler;
  SimThread* current = nullptr;
  uint64_t runnable[kWords] = {};
  unsigned live = 0;
  unsigned at_barrier = 0;
  std::vector<Collective> pending[kMaxThreads / 32];
  unsigned current_warp = 0;  // warp-major schedule
  uint64_t rng = 1;
  SharedMemory shared;
  bool failed = false;
  std::string failure;
};
thread_local Machine g_machine;

uint64_t next_random(uint64_t& state) {  // xorshift64*
  state ^= state >> 12;
  state ^= state << 25;
  state ^= state >> 27;
  return state * 0x2545F4914F6CDD1DULL;
}

void set_runnable(Machine& m, unsigned t, bool on) {
  if (on)
    m.runnable[t / 64] |= uint64_t{1} << (t % 64);
  else
    m.runnable[t / 64] &= ~(uint64_t{1} << (t % 64));
}

int first_runnable(const Machine& m, unsigned from) {
  for (unsigned w = from / 64; w < kWords; ++w) {
    uint64_t bits = m.runnable[w];
    if (w == from / 64) bits &= ~uint64_t{0} << (from % 64);
    if (bits) return static_cast<int>(w * 64 + __builtin_ctzll(bits));
  }
  return -1;
}

int pick(Machine& m) {
  switch (settings().schedule) {
    case Schedule::Forward: return first_runnable(m, 0);
    case Schedule::Reverse:
      for (int w = kWords - 1; w >= 0; --w)
        if (m.runnable[w]) return w * 64 + 63 - __builtin_clzll(m.runnable[w]);
      return -1;
    case Schedule::Random: {
      const int at = first_runnable(m, static_cast<unsigned>(next_random(m.rng) % m.threads));
      return at >= 0 ? at : first_runnable(m, 0);
    }
    case Schedule::WarpMajor: {
      // The current warp runs until every lane of it waits; then the next warp with work.
      const unsigned warps = (m.threads + 31) / 32;
      for (unsigned step = 0; step < warps; ++step) {
        const unsigned w = (m.current_warp + step) % warps;
        const uint64_t word = m.runnable[w / 2] >> (32 * (w % 2));
        const uint32_t lanes = static_cast<uint32_t>(word);
        if (lanes) {
          m.current_warp = w;
          return static_cast<int>(w * 32 + __builtin_ctz(lanes));
        }
      }
      return -1;
    }
  }
  return -1;
}

std::string coordinates(const Machine& m, const SimThread* t) {
  std::ostringstream out;
  out << "kernel " << (m.config ? m.config->kernel_name : "?") << ", block (" << m.block_index.x << ","
      << m.block_index.y << "," << m.block_index.z << ")";
  if (t) out << ", thread (" << t->index.x << "," << t->index.y << "," << t->index.z << ")";
  return out.str();
}

// Switches from the running simulated thread back to the scheduler.
void block_current(Machine& m) { Fiber::switch_to(m.current->fiber, m.scheduler); }

std::string lane_list(uint32_t lanes) {
  std::ostringstream out;
  bool first = true;
  for (int l = 0; l < 32; ++l) {
    if (!(lanes >> l & 1u)) continue;
    int end = l;
    while (end + 1 < 32 && (lanes >> (end + 1) & 1u)) ++end;
    out << (first ? "" : ",") << l;
    if (end > l) out << "-" << end;
    first = false;
    l = end;
  }
  return out.str();
}

std::string site(const char* file, int line) { return std::string(file) + ":" + std::to_string(line); }

std::string hex(uint32_t v) {
  char buffer[16];
  std::snprintf(buffer, sizeof(buffer), "0x%08x", v);
  return buffer;
}

// Releases the block barrier once every live thread waits at it (exited threads count as arrived,
// as on sm_70+), after checking that they wait at the same __syncthreads of the same kind.
void maybe_release_barrier(Machine& m) {
  if (m.at_barrier == 0 || m.at_barrier < m.live) return;
  const SimThread* first = nullptr;
  int count = 0, all = 1, any = 0;
  for (unsigned t = 0; t < m.threads; ++t) {
    const SimThread& s = *m.pool[t];
    if (s.status != Status::AtBarrier) continue;
    if (first == nullptr) first = &s;
    if (s.barrier_line != first->barrier_line || std::strcmp(s.barrier_file, first->barrier_file) != 0 ||
        s.barrier_kind != first->barrier_kind) {
      std::ostringstream message;
      message << "divergent __syncthreads: thread " << first->linear << " waits at " << site(first->barrier_file, first->barrier_line)
              << " while thread " << s.linear << " waits at " << site(s.barrier_file, s.barrier_line)
              << " (every thread of a block must reach the same barrier)";
      fail(message.str());
    }
    count += s.predicate != 0;
    all &= s.predicate != 0;
    any |= s.predicate != 0;
  }
  const int result = first->barrier_kind == BarrierKind::Count ? count
                     : first->barrier_kind == BarrierKind::And ? all
                     : first->barrier_kind == BarrierKind::Or  ? any
                                                               : 0;
  for (unsigned t = 0; t < m.threads; ++t) {
    SimThread& s = *m.pool[t];
    if (s.status != Status::AtBarrier) continue;
    s.status = Status::Runnable;
    s.barrier_result = result;
    set_runnable(m, t, true);
  }
  m.at_barrier = 0;
}

void thread_exited(Machine& m, SimThread& t) {
  t.status = Status::Exited;
  set_runnable(m, t.linear, false);
  --m.live;
  const unsigned lane = t.linear % 32;
  for (const Collective& c : m.pending[t.linear / 32]) {
    if (c.mask >> lane & 1u) {
      fail("lane " + std::to_string(lane) + " exited while lanes " + lane_list(c.arrived) + " wait for it at " +
           c.kind + " with mask " + hex(c.mask));
    }
  }
  maybe_release_barrier(m);
}

void thread_entry() {
  Fiber::entered();
  Machine& m = g_machine;
  SimThread& t = *m.current;
  try {
    m.body(m.body_context);
  } catch (const std::exception& e) {
    fail(std::string("a C++ exception escaped the kernel: ") + e.what());
  }
  thread_exited(m, t);
  block_current(m);  // never resumed
  std::abort();
}

[[noreturn]] void deadlock(Machine& m) {
  std::ostringstream message;
  message << "deadlock: no thread can continue;";
  for (unsigned t = 0; t < m.threads; ++t) {
    const SimThread& s = *m.pool[t];
    if (s.status == Status::AtBarrier) {
      message << " thread " << t << " waits at __syncthreads " << site(s.barrier_file, s.barrier_line) << ";";
      break;
    }
  }
  for (unsigned w = 0; w < (m.threads + 31) / 32; ++w) {
    for (const Collective& c : m.pending[w]) {
      message << " warp " << w << " lanes " << lane_list(c.arrived) << " wait at " << c.kind << " with mask "
              << hex(c.mask) << " for lanes " << lane_list(c.mask & ~c.arrived) << ";";
    }
  }
  message << " " << m.at_barrier << " of " << m.live << " live threads at the block barrier";
  throw Error("fastloss simulated CUDA: " + message.str() + " (" + coordinates(m, nullptr) + ")");
}

void run_block(Machine& m) {
  const size_t stack_bytes = settings().stack_bytes;
  const dim3 block = m.config->block;
  std::fill(std::begin(m.runnable), std::end(m.runnable), 0);  // a failed block may have left threads behind
  for (unsigned t = 0; t < m.threads; ++t) {
    SimThread& s = *m.pool[t];
    s.linear = t;
    s.index = uint3{t % block.x, (t / block.x) % block.y, t / (block.x * block.y)};
    s.status = Status::Runnable;
    s.cp_async.open.clear();
    s.cp_async.committed.clear();
    s.fiber.start(&thread_entry, stack_bytes);
    set_runnable(m, t, true);
  }
  m.live = m.threads;
  m.at_barrier = 0;
  m.current_warp = 0;
  for (auto& warp : m.pending) warp.clear();
  m.shared.begin_block();
  ++g_stats.blocks;
  g_stats.threads += m.threads;
  for (;;) {
    const int next = pick(m);
    if (next < 0) {
      if (m.live == 0) break;
      deadlock(m);
    }
    m.current = m.pool[next].get();
    ++g_stats.context_switches;
    Fiber::switch_to(m.scheduler, m.current->fiber);
    m.current = nullptr;
    if (m.failed) throw Error(m.failure);
  }
  const std::string overrun = m.shared.end_block();
  if (!overrun.empty()) throw Error("fastloss simulated CUDA: " + overrun + " (" + coordinates(m, nullptr) + ")");
}

bool launch_configuration_ok(const LaunchConfig& c) {
  const unsigned long long threads = 1ULL * c.block.x * c.block.y * c.block.z;
  if (c.block.x == 0 || c.block.y == 0 || c.block.z == 0 || threads > kMaxThreads || c.block.x > 1024 ||
      c.block.y > 1024 || c.block.z > 64)
    return false;
  if (c.grid.x == 0 || c.grid.y == 0 || c.grid.z == 0 || c.grid.x > 2147483647u || c.grid.y > 65535 ||
      c.grid.z > 65535)
    return false;
  return true;
}

}  // namespace

// ---- the core API ----------------------------------------------------------------------------
void fail(const std::string& message) {
  Machine& m = g_machine;
  if (m.current == nullptr) throw Error("fastloss simulated CUDA: " + message);
  m.failed = true;
  m.failure = "fastloss simulated CUDA: " + message + " (" + coordinates(m, m.current) + ")";
  block_current(m);  // the scheduler throws; this thread is never resumed
  std::abort();
}

const uint3& thread_index() { return g_machine.current->index; }
const uint3& block_index() { return g_machine.block_index; }
const dim3& block_dim() { return g_machine.config->block; }
const dim3& grid_dim() { return g_machine.config->grid; }
unsigned linear_thread() { return g_machine.current->linear; }
unsigned lane_id() { return g_machine.current->linear % 32; }
unsigned warp_id() { return g_machine.current->linear / 32; }

int block_barrier(BarrierKind kind, int predicate, const char* file, int line) {
  Machine& m = g_machine;
  SimThread& t = *m.current;
  for (const Collective& c : m.pending[t.linear / 32]) {
    if (c.mask >> (t.linear % 32) & 1u)
      fail("__syncthreads at " + site(file, line) + " while lanes " +
           lane_list(c.arrived) + " of this warp wait for this lane at " + c.kind);
  }
  t.status = Status::AtBarrier;
  t.barrier_kind = kind;
  t.barrier_file = file;
  t.barrier_line = line;
  t.predicate = predicate;
  set_runnable(m, t.linear, false);
  ++m.at_barrier;
  maybe_release_barrier(m);
  block_current(m);
  return t.barrier_result;
}

uint32_t active_lanes() {
  Machine& m = g_machine;
  const unsigned base = m.current->linear / 32 * 32;
  uint32_t lanes = 0;
  for (unsigned l = 0; l < 32 && base + l < m.threads; ++l)
    if (m.pool[base + l]->status != Status::Exited) lanes |= 1u << l;
  return lanes;
}

void warp_collective(uint32_t mask, const char* kind, void* lane_data, CollectiveFn complete, void* context,
                     const char* site, int line) {
  Machine& m = g_machine;
  SimThread& t = *m.current;
  const unsigned lane = t.linear % 32, warp = t.linear / 32, base = warp * 32;
  const uint32_t bit = 1u << lane;
  if (!(mask & bit)) fail(std::string(kind) + ": the mask " + hex(mask) + " does not name the calling lane " + std::to_string(lane));
  for (unsigned l = 0; l < 32; ++l) {
    if (!(mask >> l & 1u)) continue;
    if (base + l >= m.threads)
      fail(std::string(kind) + ": the mask " + hex(mask) + " names lane " + std::to_string(l) +
           ", which does not exist in a block of " + std::to_string(m.threads) + " threads");
    if (m.pool[base + l]->status == Status::Exited)
      fail(std::string(kind) + ": the mask " + hex(mask) + " names lane " + std::to_string(l) + ", which has exited");
  }
  std::vector<Collective>& pending = m.pending[warp];
  Collective* c = nullptr;
  for (Collective& p : pending) {
    if (!(p.mask & mask)) continue;
    const bool same = p.mask == mask && std::strcmp(p.kind, kind) == 0 &&
                      ((p.site == nullptr && site == nullptr) ||
                       (p.site && site && p.line == line && std::strcmp(p.site, site) == 0));
    if (!same) {
      std::ostringstream message;
      message << "lanes meet at different warp collectives: lane " << lane << " calls " << kind << " with mask "
              << hex(mask);
      if (site) message << " at " << fl_sim::site(site, line);
      message << " while lanes " << lane_list(p.arrived) << " wait at " << p.kind << " with mask " << hex(p.mask);
      if (p.site) message << " at " << fl_sim::site(p.site, p.line);
      fail(message.str());
    }
    c = &p;
    break;
  }
  if (c == nullptr) {
    pending.emplace_back();
    c = &pending.back();
    c->mask = mask;
    c->kind = kind;
    c->site = site;
    c->line = line;
  }
  c->arrived |= bit;
  c->lane_data[lane] = lane_data;
  if (c->arrived == c->mask) {
    const Collective done = *c;
    pending.erase(pending.begin() + (c - pending.data()));
    if (complete) complete(done.lane_data, done.mask, context);
    for (unsigned l = 0; l < 32; ++l) {
      if (!(done.mask >> l & 1u) || l == lane) continue;
      m.pool[base + l]->status = Status::Runnable;
      set_runnable(m, base + l, true);
    }
    block_current(m);  // stays runnable: the schedule decides who continues
    return;
  }
  t.status = Status::AtWarp;
  set_runnable(m, t.linear, false);
  block_current(m);
}

void* dynamic_shared(size_t align) { return g_machine.shared.dynamic(align); }
void* static_shared(const void* tag, size_t bytes, size_t align, const char* name) {
  return g_machine.shared.allocate_static(tag, bytes, align, name);
}
uint32_t shared_offset(const void* p) { return g_machine.shared.offset_of(p); }
void* shared_pointer(uint32_t offset, size_t bytes) { return g_machine.shared.pointer_at(offset, bytes); }
bool permuted_fragments() { return settings().permuted_fragments; }
CpAsyncState& cp_async_state() { return g_machine.current->cp_async; }

void check_launch_bounds(long long max_threads, const char* kernel_site) {
  const Machine& m = g_machine;
  if (static_cast<long long>(m.threads) > max_threads)
    fail("launched with " + std::to_string(m.threads) + " threads per block, more than its __launch_bounds__(" +
         std::to_string(max_threads) + ") at " + kernel_site);
}

void run_grid(const LaunchConfig& config, void (*body)(void*), void* context) {
  Machine& m = g_machine;
  if (m.config != nullptr) throw Error("fastloss simulated CUDA: a kernel launched from inside a kernel");
  ++g_stats.launches;
  if (!launch_configuration_ok(config)) {
    set_last_error(cudaErrorInvalidConfiguration);
    return;
  }
  if (config.dynamic_shared_bytes > max_dynamic_shared_bytes(config.kernel)) {
    set_last_error(cudaErrorInvalidValue);
    return;
  }
  struct Reset {
    Machine& m;
    ~Reset() {
      m.config = nullptr;
      m.current = nullptr;
      m.failed = false;
    }
  } reset{m};
  m.config = &config;
  m.body = body;
  m.body_context = context;
  m.threads = config.block.x * config.block.y * config.block.z;
  m.failed = false;
  while (m.pool.size() < m.threads) m.pool.push_back(std::make_unique<SimThread>());
  m.shared.begin_launch(config.dynamic_shared_bytes);
  m.rng = settings().seed * 0x9E3779B97F4A7C15ULL + g_stats.launches;
  if (m.rng == 0) m.rng = 1;
  const uint64_t blocks = 1ULL * config.grid.x * config.grid.y * config.grid.z;
  std::vector<uint64_t> order;
  const Schedule schedule = settings().schedule;
  if (schedule == Schedule::Random) {
    order.resize(blocks);
    for (uint64_t b = 0; b < blocks; ++b) order[b] = b;
    for (uint64_t b = blocks; b > 1; --b) std::swap(order[b - 1], order[next_random(m.rng) % b]);
  }
  for (uint64_t i = 0; i < blocks; ++i) {
    const uint64_t b = schedule == Schedule::Random ? order[i] : schedule == Schedule::Reverse ? blocks - 1 - i : i;
    m.block_index = uint3{static_cast<unsigned>(b % config.grid.x),
                          static_cast<unsigned>(b / config.grid.x % config.grid.y),
                          static_cast<unsigned>(b / (1ULL * config.grid.x * config.grid.y))};
    run_block(m);
  }
}

void set_schedule(Schedule schedule, uint64_t seed) {
  settings().schedule = schedule;
  settings().seed = seed;
}
Schedule schedule() { return settings().schedule; }
uint64_t schedule_seed() { return settings().seed; }
const char* schedule_name(Schedule schedule) {
  switch (schedule) {
    case Schedule::Forward: return "forward";
    case Schedule::Reverse: return "reverse";
    case Schedule::Random: return "random";
    case Schedule::WarpMajor: return "warp-major";
  }
  return "?";
}
bool parse_schedule(const std::string& name, Schedule* out) {
  for (Schedule s : {Schedule::Forward, Schedule::Reverse, Schedule::Random, Schedule::WarpMajor}) {
    if (name == schedule_name(s)) {
      *out = s;
      return true;
    }
  }
  return false;
}
Stats& stats() { return g_stats; }

}  // namespace fl_sim
