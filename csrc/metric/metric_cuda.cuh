// What the metric family's two CUDA engines share: metric_cuda.cu (chunks of whole rows of S, for
// every loss) and info_nce_cuda.cu (fused tiles for InfoNCE / CLIP, whose row and column statistics
// need no whole rows). Include only from .cu files.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "metric/metric_kernels.h"

namespace fl::metric::cuda_detail {

// What one pass computes: a forward (row terms; column terms when symmetric), a gradient (from saved
// statistics and upstream gradients, or, with `unit`, the fused gradient of sum_i terms[i][0]), or
// both. Every array is float32 (the accumulator type on the GPU).
struct Pass {
  float* terms = nullptr;  // forward outputs (null: not a forward pass)
  float* counts = nullptr;
  float* stats = nullptr;
  float* col_terms = nullptr;
  float* col_stats_out = nullptr;
  bool unit = false;
  const float* saved_stats = nullptr;  // backward inputs
  const float* grad_row = nullptr;
  const float* grad_col = nullptr;
  const float* col_stats = nullptr;
  float* grad_x = nullptr;  // gradient outputs (null: no gradient)
  float* grad_y = nullptr;
  float* grad_scale = nullptr;
  float* active = nullptr;  // unit: 1 where the row of W may be nonzero
};

// The workspace budget of a chunk of rows (set_cuda_chunk_budget; 256 MB by default).
int64_t chunk_budget_bytes();

// out[0] = (sum of parts[0 .. count)) / divisor, in a fixed order.
void launch_sum(const float* parts, int64_t count, float divisor, float* out, cudaStream_t stream);

// The fused InfoNCE engine (info_nce_cuda.cu): its workspace and one pass.
int64_t info_nce_workspace_bytes(const PairProblem& p, bool gradient);
void run_info_nce(const PairProblem& p, const Pass& pass, void* workspace, int64_t workspace_bytes,
                  cudaStream_t stream);

}  // namespace fl::metric::cuda_detail
