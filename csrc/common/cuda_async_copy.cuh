// cp.async (sm_80+): 16-byte copies from global to shared memory that do not pass through registers,
// grouped and waited on so a kernel can load the next tile while it computes on this one.
#pragma once

#include <cstdint>

namespace fl {

// Copies 16 bytes, of which the first valid_bytes come from `global` and the rest are zero-filled
// (valid_bytes = 0 reads nothing: a tile row past the end of the data).
__device__ __forceinline__ void cp_async16(void* smem, const void* global, int valid_bytes) {
  const uint32_t address = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(address), "l"(global), "r"(valid_bytes) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
// Waits until at most `Pending` committed groups are still in flight.
template <int Pending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(Pending) : "memory");
}

}  // namespace fl
