// __half for the simulated device (FASTLOSS_CUDA=SIMULATE): see csrc/sim/sim_half.h.
#pragma once
#include "../sim_half.h"
