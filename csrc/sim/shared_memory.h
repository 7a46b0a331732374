// A block's shared memory in the simulator: the dynamic region (extern __shared__) and the static
// __shared__ variables, laid out as on the GPU's limits (48 KB static; static + dynamic within the
// opt-in maximum), poisoned with NaN bytes at every block start so that a read before any write
// shows, and surrounded by red zones whose overwrites are reported at block end (and, under
// AddressSanitizer, poisoned so that any stray access is reported at once).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace fl_sim {

class SharedMemory {
 public:
  SharedMemory() = default;
  ~SharedMemory();
  SharedMemory(const SharedMemory&) = delete;
  SharedMemory& operator=(const SharedMemory&) = delete;

  void begin_launch(size_t dynamic_bytes);  // forgets the static variables of the previous kernel
  void begin_block();                       // poisons every region, re-arms the red zones
  std::string end_block();                  // empty, or what overran its region

  void* dynamic(size_t align);
  void* allocate_static(const void* tag, size_t bytes, size_t align, const char* name);
  uint32_t offset_of(const void* p) const;
  void* pointer_at(uint32_t offset, size_t bytes) const;

  static constexpr unsigned char kPoison = 0xFF;  // NaN in float, double, half and bfloat16
  static constexpr unsigned char kRedZone = 0xFE;

 private:
  struct Region {
    size_t offset;
    size_t bytes;
    const void* tag;  // null: the dynamic region
    const char* name;
  };
  void protect_gaps(bool poison);
  std::string region_name(const Region& r) const;

  unsigned char* base_ = nullptr;
  size_t capacity_ = 0;
  size_t cursor_ = 0;  // end of the last region plus its red zone
  size_t static_bytes_ = 0;
  std::vector<Region> regions_;  // the dynamic region first, then statics in allocation order
};

}  // namespace fl_sim
