// nvcuda::wmma for the simulated device (FASTLOSS_CUDA=SIMULATE): see csrc/sim/sim_wmma.h.
#pragma once
#include "../sim_wmma.h"
