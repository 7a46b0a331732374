// The simulated CUDA runtime (FASTLOSS_CUDA=SIMULATE): see csrc/sim/sim_runtime.h.
#pragma once
#include "../sim_runtime.h"
