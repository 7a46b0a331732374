// The CUDA stream type, declared exactly as the CUDA runtime declares it, so
// that torch-free kernel headers can name cudaStream_t without including the
// CUDA headers (and so that .cpp files compiled by the host compiler can too).
#pragma once

struct CUstream_st;
typedef struct CUstream_st* cudaStream_t;
