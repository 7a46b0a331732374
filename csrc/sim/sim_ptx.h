// Inline PTX for the simulator. csrc/sim/rewrite_cuda.py turns
//   asm volatile("TEXT" : "=r"(out) : "r"(in), "n"(N) : "memory");
// into
//   ::fl_sim::ptx_asm("TEXT", {::fl_sim::ptx_operand('r', '=', out), ::fl_sim::ptx_operand('r', 0, in),
//                              ::fl_sim::ptx_operand('n', 0, N)});
// with the operands numbered %0, %1, ... in that order, as in GCC / nvcc asm. sim_ptx.cpp
// interprets the instructions the project uses (mma.sync m16n8k16/m16n8k8, ldmatrix, cp.async and
// its groups) and fails on anything else.
#pragma once

#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <type_traits>

#include "sim_core.h"

// No <memory> here (std::addressof): sim_device.h defines __noinline__ before including this header,
// and libstdc++'s <memory> spells __attribute__((__noinline__)).

namespace fl_sim {

struct PtxOperand {
  char type;           // the constraint letter: r (32-bit), l (64-bit), f (float), d (double), h (16-bit), n (immediate)
  char mode;           // '=' write-only output, '+' read-write output, 0 input
  unsigned char size;  // bytes of the C++ object
  bool is_float;       // the object is a float or a double
  bool is_integer;     // an integer, enum, bool or pointer: an input narrower than its register is extended
  void* address;       // the object, when it is a modifiable lvalue (needed for outputs)
  uint64_t bits;       // its value at the call (sign- or zero-extended integers, raw bytes otherwise)
};

// Fails when the C++ object does not fit its constraint (sim_ptx.cpp).
void check_ptx_operand(const PtxOperand& operand);

template <class T>
PtxOperand ptx_operand(char type, char mode, T&& value) {
  using Object = std::remove_reference_t<T>;
  using V = std::remove_cv_t<Object>;
  static_assert(std::is_trivially_copyable<V>::value && sizeof(V) <= 8, "an asm operand is a register value");
  PtxOperand op{type, mode, static_cast<unsigned char>(sizeof(V)), std::is_floating_point<V>::value,
                std::is_integral<V>::value || std::is_enum<V>::value || std::is_pointer<V>::value, nullptr, 0};
  if constexpr (std::is_lvalue_reference<T>::value && !std::is_const<Object>::value)
    op.address = static_cast<void*>(__builtin_addressof(value));
  if constexpr (std::is_integral<V>::value || std::is_enum<V>::value) {
    // A narrower integer moves into a register by value, as the compiler extends it.
    if constexpr (std::is_signed<V>::value || std::is_enum<V>::value)
      op.bits = static_cast<uint64_t>(static_cast<int64_t>(value));
    else
      op.bits = static_cast<uint64_t>(value);
  } else {
    std::memcpy(&op.bits, __builtin_addressof(value), sizeof(V));
  }
  check_ptx_operand(op);
  return op;
}

// Runs the PTX instruction(s) in `text` (';'-separated) as the calling simulated thread.
void ptx_asm(const char* text, std::initializer_list<PtxOperand> operands);

}  // namespace fl_sim
