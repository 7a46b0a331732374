// Cooperative fibers: the simulated threads of a block, each with its own stack, switched by hand.
// x86-64 uses a few instructions of assembly (a switch costs nanoseconds, where swapcontext makes
// a system call for the signal mask); other machines use ucontext. AddressSanitizer is told about
// every switch, so it keeps tracking the right stack.
#pragma once

#include <cstddef>

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

namespace fl_sim {

class Fiber {
 public:
  Fiber() = default;
  ~Fiber();
  Fiber(const Fiber&) = delete;
  Fiber& operator=(const Fiber&) = delete;

  // Makes the fiber start entry() at its next switch_to, on a fresh stack of stack_bytes (allocated
  // once, kept for the next start).
  void start(void (*entry)(), size_t stack_bytes);
  bool has_stack() const { return stack_ != nullptr; }

  // Saves the running context into `from` and continues `to`.
  static void switch_to(Fiber& from, Fiber& to);
  // Called first thing in a fiber's entry (AddressSanitizer's side of the switch into it).
  static void entered();

 private:
  void* stack_ = nullptr;
  size_t stack_bytes_ = 0;
#if defined(__x86_64__)
  void* sp_ = nullptr;
#else
  ucontext_t context_{};
#endif
  void* asan_fake_stack_ = nullptr;
};

}  // namespace fl_sim
