// Shared memory of a simulated block (see shared_memory.h).
#include "shared_memory.h"

#include <cstdlib>
#include <cstring>
#include <sstream>

#include "sim_core.h"
#include "sim_runtime.h"

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#define FL_SIM_POISON(p, n) ASAN_POISON_MEMORY_REGION(p, n)
#define FL_SIM_UNPOISON(p, n) ASAN_UNPOISON_MEMORY_REGION(p, n)
#else
#define FL_SIM_POISON(p, n) ((void)(p), (void)(n))
#define FL_SIM_UNPOISON(p, n) ((void)(p), (void)(n))
#endif

namespace fl_sim {
namespace {

constexpr size_t kLeadingRedZone = 1024;  // offset 0 is never a valid shared address
constexpr size_t kRedZone = 64;
constexpr size_t kStaticLimit = device_limits::kSharedPerBlock;
constexpr size_t kTotalLimit = device_limits::kSharedPerBlockOptin;

size_t align_up(size_t v, size_t a) { return (v + a - 1) / a * a; }

}  // namespace

SharedMemory::~SharedMemory() {
  if (base_ != nullptr) {
    FL_SIM_UNPOISON(base_, capacity_);
    std::free(base_);
  }
}

void SharedMemory::begin_launch(size_t dynamic_bytes) {
  // Room for the dynamic region, 48 KB of statics, and their alignment and red zones.
  const size_t need = kLeadingRedZone + align_up(dynamic_bytes, 1024) + kRedZone + kStaticLimit + 64 * 1024;
  if (need > capacity_) {
    if (base_ != nullptr) {
      FL_SIM_UNPOISON(base_, capacity_);
      std::free(base_);
    }
    base_ = static_cast<unsigned char*>(std::aligned_alloc(4096, align_up(need, 4096)));
    if (base_ == nullptr) fail("the simulator could not allocate shared memory");
    capacity_ = align_up(need, 4096);
  }
  FL_SIM_UNPOISON(base_, capacity_);
  regions_.clear();
  regions_.push_back(Region{kLeadingRedZone, dynamic_bytes, nullptr, "extern __shared__"});
  cursor_ = kLeadingRedZone + dynamic_bytes + kRedZone;
  static_bytes_ = 0;
}

void SharedMemory::protect_gaps(bool poison) {
  // Red zones: everything outside a region.
  size_t at = 0;
  for (const Region& r : regions_) {
    if (r.offset > at) {
      if (poison) std::memset(base_ + at, kRedZone, r.offset - at);
      FL_SIM_POISON(base_ + at, r.offset - at);
    }
    FL_SIM_UNPOISON(base_ + r.offset, r.bytes);
    if (poison) std::memset(base_ + r.offset, kPoison, r.bytes);
    at = std::max(at, r.offset + r.bytes);
  }
  if (capacity_ > at) {
    if (poison) std::memset(base_ + at, kRedZone, capacity_ - at);
    FL_SIM_POISON(base_ + at, capacity_ - at);
  }
}

void SharedMemory::begin_block() {
  FL_SIM_UNPOISON(base_, capacity_);
  protect_gaps(true);
}

std::string SharedMemory::end_block() {
  FL_SIM_UNPOISON(base_, capacity_);
  std::string report;
  size_t at = 0;
  auto check = [&](size_t from, size_t to, const Region* before, const Region* after) {
    for (size_t i = from; i < to; ++i) {
      if (base_[i] == kRedZone) continue;
      std::ostringstream out;
      out << "out-of-bounds write to shared memory at offset " << i;
      if (before) out << ", " << (i - (before->offset + before->bytes)) << " bytes past the end of " << region_name(*before);
      if (after) out << (before ? " or " : ", ") << (after->offset - i) << " bytes before " << region_name(*after);
      report = out.str();
      return;
    }
  };
  const Region* previous = nullptr;
  for (const Region& r : regions_) {
    if (r.offset > at && report.empty()) check(at, r.offset, previous, &r);
    at = std::max(at, r.offset + r.bytes);
    previous = &r;
  }
  if (report.empty()) check(at, std::min(capacity_, cursor_ + 4096), previous, nullptr);
  FL_SIM_POISON(base_, capacity_);
  return report;
}

std::string SharedMemory::region_name(const Region& r) const {
  std::ostringstream out;
  if (r.tag == nullptr)
    out << "the dynamic shared memory (" << r.bytes << " bytes)";
  else
    out << "__shared__ " << r.name << " (" << r.bytes << " bytes)";
  return out.str();
}

void* SharedMemory::dynamic(size_t align) {
  if (align > 1024) fail("extern __shared__ aligned to more than 1024 bytes");
  return base_ + regions_.front().offset;
}

void* SharedMemory::allocate_static(const void* tag, size_t bytes, size_t align, const char* name) {
  for (const Region& r : regions_)
    if (r.tag == tag) return base_ + r.offset;
  if (align == 0 || (align & (align - 1)) != 0) fail(std::string("__shared__ ") + name + ": bad alignment");
  static_bytes_ += bytes;
  if (static_bytes_ > kStaticLimit)
    fail("__shared__ " + std::string(name) + " takes the kernel's static shared memory to " +
         std::to_string(static_bytes_) + " bytes, more than the 48 KB a kernel may declare statically");
  if (static_bytes_ + regions_.front().bytes > kTotalLimit)
    fail("static (" + std::to_string(static_bytes_) + " bytes) plus dynamic (" + std::to_string(regions_.front().bytes) +
         " bytes) shared memory exceed the " + std::to_string(kTotalLimit) + " bytes one block may have");
  const size_t offset = align_up(cursor_, std::max<size_t>(align, 16));
  if (offset + bytes + kRedZone > capacity_) fail("the simulator's shared memory arena is full");
  regions_.push_back(Region{offset, bytes, tag, name});
  cursor_ = offset + bytes + kRedZone;
  FL_SIM_UNPOISON(base_ + offset, bytes);
  std::memset(base_ + offset, kPoison, bytes);
  return base_ + offset;
}

uint32_t SharedMemory::offset_of(const void* p) const {
  const auto* c = static_cast<const unsigned char*>(p);
  if (base_ == nullptr || c < base_ || c >= base_ + capacity_)
    fail("__cvta_generic_to_shared of an address that is not in shared memory");
  return static_cast<uint32_t>(c - base_);
}

void* SharedMemory::pointer_at(uint32_t offset, size_t bytes) const {
  for (const Region& r : regions_) {
    if (offset >= r.offset && offset + bytes <= r.offset + r.bytes) return base_ + offset;
  }
  std::ostringstream out;
  out << "shared memory access of " << bytes << " bytes at offset " << offset << " is outside every region (";
  for (size_t i = 0; i < regions_.size(); ++i)
    out << (i ? ", " : "") << region_name(regions_[i]) << " at [" << regions_[i].offset << ", "
        << regions_[i].offset + regions_[i].bytes << ")";
  out << ")";
  fail(out.str());
}

}  // namespace fl_sim
