// Spherical-family losses on dense logits (N x D): the torch-free entry points.
// Forward writes, per row, the loss and the four gradient coefficients of
// spherical_heads.h; backward turns them into dL/dlogits in one pass.
// Loss, coefficients and grad_loss are in the accumulator type: float64 for
// float64 logits, float32 for float32, float16 and bfloat16.
#pragma once

#include <cstdint>

#include "common/device_error.h"
#include "common/dtype.h"
#include "common/stream.h"
#include "spherical/spherical_heads.h"

namespace fl {
namespace spherical {

struct DenseLossProblem {
  DType dtype;              // element type of the logits (and of their gradient)
  const void* logits;       // rows x cols, unit stride along a row
  int64_t rows;
  int64_t cols;
  int64_t row_stride;       // elements between consecutive rows (>= cols)
  const int64_t* target;    // rows entries in [0, cols) or == ignore_index
  int64_t ignore_index;
  LossParams params;
  const char* op_name = "fastloss.spherical";  // named in error messages
  DeviceErrorSlot error;    // CUDA forward: a bad target is reported here as (row, target, cols)
};

// Check sizes / hyper-parameters (not target values); throw std::invalid_argument.
void validate_dense_shape(const DenseLossProblem& problem, const char* where);
void validate_loss_params(const LossParams& params, const char* where);

// ---- CPU ------------------------------------------------------------------
// Throws std::invalid_argument, before writing anything, if a target is out of range.
void dense_loss_forward_cpu(const DenseLossProblem& problem, void* loss, void* coef);
// grad_logits: rows x cols contiguous, logits' dtype. grad_loss[r * grad_loss_stride].
void dense_loss_backward_cpu(const DenseLossProblem& problem, const void* grad_loss, int64_t grad_loss_stride,
                             const void* coef, void* grad_logits);

#if defined(FASTLOSS_WITH_CUDA)
// ---- CUDA (all pointers on `device`; work is queued on `stream`) ------------
// A row whose target is out of range gets a NaN loss and NaN gradient and, in forward, is reported
// through problem.error (no host sync; the Python layer raises it at its next call).
int64_t dense_loss_forward_cuda_workspace_bytes(int64_t rows, int64_t cols, int device);
void dense_loss_forward_cuda(const DenseLossProblem& problem, void* loss, void* coef, void* workspace,
                             int64_t workspace_bytes, int device, cudaStream_t stream);
void dense_loss_backward_cuda(const DenseLossProblem& problem, const void* grad_loss, int64_t grad_loss_stride,
                              const void* coef, void* grad_logits, int device, cudaStream_t stream);
#endif

}  // namespace spherical
}  // namespace fl
