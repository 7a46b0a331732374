// Shuffles and votes of the simulated device (declared in sim_device.h), on warp_collective.
#include <cstring>
#include <string>

#include "sim_core.h"

namespace fl_sim {

void complete_shuffle(void* const* lanes, uint32_t mask, void* kind_pointer) {
  const ShuffleKind kind = *static_cast<const ShuffleKind*>(kind_pointer);
  const int width = static_cast<const ShuffleLane*>(lanes[__builtin_ctz(mask)])->width;
  for (unsigned l = 0; l < 32; ++l) {
    if (!(mask >> l & 1u)) continue;
    auto* lane = static_cast<ShuffleLane*>(lanes[l]);
    if (lane->width != width) fail("a shuffle whose lanes pass different widths");
    const unsigned source = shuffle_source(kind, l, lane->operand, width);
    // A lane outside the mask holds no defined value for this shuffle (CUDA: undefined result).
    if (source >= 32 || !(mask >> source & 1u))
      fail("a shuffle in which lane " + std::to_string(l) + " reads lane " + std::to_string(source) +
           ", which is not in the mask");
    std::memcpy(lane->result, static_cast<const ShuffleLane*>(lanes[source])->value, sizeof(lane->result));
  }
}

struct VoteLane {
  int predicate;
  uint32_t result;
};

void complete_vote(void* const* lanes, uint32_t mask, void*) {
  uint32_t ballot = 0;
  for (unsigned l = 0; l < 32; ++l)
    if ((mask >> l & 1u) && static_cast<const VoteLane*>(lanes[l])->predicate) ballot |= 1u << l;
  for (unsigned l = 0; l < 32; ++l)
    if (mask >> l & 1u) static_cast<VoteLane*>(lanes[l])->result = ballot;
}

uint32_t vote(const char* name, uint32_t mask, int predicate, const char* file, int line) {
  VoteLane lane{predicate, 0};
  warp_collective(mask, name, &lane, complete_vote, nullptr, file, line);
  return lane.result;
}

}  // namespace fl_sim
