// Fibers for the simulated threads (see fiber.h).
#include "fiber.h"

#include <sys/mman.h>
#include <unistd.h>

#include <cstdint>
#include <cstring>

#include "sim_core.h"

#if defined(__SANITIZE_ADDRESS__)
#define FL_SIM_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define FL_SIM_ASAN 1
#endif
#endif

#if defined(FL_SIM_ASAN)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif

#if defined(__x86_64__)
// fl_sim_switch(void** save_sp, void* new_sp): pushes the callee-saved registers and the SSE/x87
// control words, stores the stack pointer, loads the other one, pops and returns into it.
extern "C" void fl_sim_switch(void** save_sp, void* new_sp);
asm(R"(
  .text
  .p2align 4
  .globl fl_sim_switch
  .hidden fl_sim_switch
  .type fl_sim_switch,@function
fl_sim_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size fl_sim_switch,.-fl_sim_switch
  .section .note.GNU-stack,"",@progbits
  .text
)");
#endif

namespace fl_sim {
namespace {

#if defined(FL_SIM_ASAN)
// The stack being switched to, for AddressSanitizer (the scheduler's own stack is learnt at the
// first switch away from it).
thread_local const void* g_scheduler_stack_bottom = nullptr;
thread_local size_t g_scheduler_stack_size = 0;
#endif

}  // namespace

Fiber::~Fiber() {
  if (stack_ != nullptr) munmap(stack_, stack_bytes_);
}

void Fiber::start(void (*entry)(), size_t stack_bytes) {
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  stack_bytes = (stack_bytes + page - 1) / page * page + page;  // + a guard page at the bottom
  if (stack_ == nullptr || stack_bytes_ != stack_bytes) {
    if (stack_ != nullptr) munmap(stack_, stack_bytes_);
    stack_ = mmap(nullptr, stack_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (stack_ == MAP_FAILED) {
      stack_ = nullptr;
      fail("the simulator could not map a thread stack");
    }
    mprotect(stack_, page, PROT_NONE);  // a simulated thread that overflows its stack faults here
    stack_bytes_ = stack_bytes;
  }
#if defined(FL_SIM_ASAN)
  // A thread abandoned mid-kernel (a failed block) left its frames' poison behind.
  ASAN_UNPOISON_MEMORY_REGION(static_cast<char*>(stack_) + page, stack_bytes_ - page);
#endif
#if defined(__x86_64__)
  // The frame fl_sim_switch pops: control words, six registers, then `ret` into entry with the
  // stack aligned as after a call (rsp % 16 == 8).
  auto top = reinterpret_cast<uintptr_t>(stack_) + stack_bytes_;
  top &= ~uintptr_t{15};
  auto* frame = reinterpret_cast<uint64_t*>(top - 72);
  std::memset(frame, 0, 72);
  uint32_t mxcsr = 0x1F80;
  uint16_t fpucw = 0x037F;
  std::memcpy(frame, &mxcsr, sizeof(mxcsr));
  std::memcpy(reinterpret_cast<char*>(frame) + 4, &fpucw, sizeof(fpucw));
  frame[7] = reinterpret_cast<uint64_t>(entry);
  sp_ = frame;
#else
  getcontext(&context_);
  context_.uc_stack.ss_sp = static_cast<char*>(stack_) + page;
  context_.uc_stack.ss_size = stack_bytes_ - page;
  context_.uc_link = nullptr;
  makecontext(&context_, entry, 0);
#endif
}

void Fiber::switch_to(Fiber& from, Fiber& to) {
#if defined(FL_SIM_ASAN)
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  const void* bottom = to.stack_ ? static_cast<char*>(to.stack_) + page : g_scheduler_stack_bottom;
  const size_t size = to.stack_ ? to.stack_bytes_ - page : g_scheduler_stack_size;
  __sanitizer_start_switch_fiber(&from.asan_fake_stack_, bottom, size);
#endif
#if defined(__x86_64__)
  fl_sim_switch(&from.sp_, to.sp_);
#else
  swapcontext(&from.context_, &to.context_);
#endif
#if defined(FL_SIM_ASAN)
  const void* old_bottom = nullptr;
  size_t old_size = 0;
  __sanitizer_finish_switch_fiber(from.asan_fake_stack_, &old_bottom, &old_size);
#endif
}

void Fiber::entered() {
#if defined(FL_SIM_ASAN)
  const void* old_bottom = nullptr;
  size_t old_size = 0;
  __sanitizer_finish_switch_fiber(nullptr, &old_bottom, &old_size);
  if (g_scheduler_stack_bottom == nullptr) {
    g_scheduler_stack_bottom = old_bottom;
    g_scheduler_stack_size = old_size;
  }
#endif
}

}  // namespace fl_sim
