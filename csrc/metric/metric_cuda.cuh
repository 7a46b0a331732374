// What the metric family's two CUDA engines share: metric_cuda.cu (chunks of whole rows of S, for
// every loss) and info_nce_cuda.cu (fused tiles for InfoNCE / CLIP, whose row and column statistics
// need no whole rows). Include only from .cu files.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "metric/metric_kernels.h"
#include "metric/metric_pass.h"

namespace fl::metric::cuda_detail {

// A pass of the GPU engines (metric_pass.h): every array is float32, the accumulator type on the GPU.
using Pass = fl::metric::Pass<float>;

// The workspace budget of a chunk of rows (set_cuda_chunk_budget; 256 MB by default).
int64_t chunk_budget_bytes();

// The fused InfoNCE engine (info_nce_cuda.cu): its workspace and one pass.
int64_t info_nce_workspace_bytes(const PairProblem& p, bool gradient);
void run_info_nce(const PairProblem& p, const Pass& pass, void* workspace, int64_t workspace_bytes,
                  cudaStream_t stream);

}  // namespace fl::metric::cuda_detail
