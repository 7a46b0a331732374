// The CUDA-core GEMV of the quant family (gemv_cuda.cu): y = x W^T for 1 to 8 rows of x, beside
// the tensor-core kernel of matmul_cuda.cu, which picks between the two in plan_launch.
// Internal to csrc/quant (included from .cu files only).
#pragma once

#include <cstdint>

#include "quant/quant_kernels.h"

namespace fl {
namespace quant {

constexpr int64_t kGemvMaxRows = 8;  // rows of x the GEMV takes (padded to 1, 2, 4 or 8)

struct GemvPlan {
  int row_tile = 1;      // rows of x the kernel is compiled for: 1, 2, 4 or 8 (>= M; the rest are zero)
  int n_blocks = 0;      // CTAs along N (kGemvRowsPerCta rows of W each)
  int splits = 1;        // CTAs along K; > 1: float32 partial sums, then gemv_reduce_kernel
  int chunk_words = 0;   // 64-column K-words per split
  int64_t workspace_bytes = 0;
};

// Whether plan_launch sends `rows` rows of x to the GEMV: rows <= kGemvMaxRows, unless the tuning
// knob FASTLOSS_QUANT_KERNEL=mma (or =gemv) says otherwise.
bool gemv_selected(int64_t rows);
GemvPlan plan_gemv(int64_t rows, const PackedShape& shape, int device);
void launch_gemv(const MatmulProblem& p, const GemvPlan& plan, void* workspace, cudaStream_t stream);

}  // namespace quant
}  // namespace fl
