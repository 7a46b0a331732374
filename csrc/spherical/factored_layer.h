// The exact factored output layer (Vincent, de Brebisson & Bouthillier, 2015): torch-free entry
// points for the steps that are not plain GEMMs. The Python layer
// (python/fastloss/spherical_output.py) owns the state, the GEMMs and the order of the update:
//   forward   sh = h S^T (GEMM) -> factored_head: target outputs A = V[C] . U h + omega . h, loss, partials
//   backward  factored_prepare: partials x grad_loss, V^T ydot, ybar, the rows of ytilde and the
//             omega/wbar coefficients -> gradH = ytilde S (GEMM) -> U, U^-T updates (GEMMs, solve)
//             -> factored_gram: M = G^T G (m x m) for the Q update -> factored_scatter: V[C] -= lr ydot R^T.
// Layouts are in factored_head.h. State-typed arrays (h, sh, partials, ytilde, M, R) are float32
// or float64; V is float32 or float64.
#pragma once

#include <cstdint>

#include "common/device_error.h"
#include "common/dtype.h"
#include "common/host_device.h"
#include "common/stream.h"
#include "spherical/spherical_heads.h"

namespace fl {
namespace spherical {

struct FactoredProblem {
  DType state_dtype = DType::Float64;   // h, sh, partials, ytilde, coef, hg, mh, M, R
  DType weight_dtype = DType::Float32;  // V
  int64_t samples = 0;                  // m
  int64_t targets_per_sample = 1;       // K
  int64_t features = 0;                 // d
  int64_t classes = 0;                  // D
  const void* h = nullptr;              // m x d
  const void* sh = nullptr;             // m x (2d+2)
  const void* weight_rows = nullptr;    // V, D x d (row c is the factor of class c)
  const int64_t* target = nullptr;      // m x K classes in [0, D) or ignore_index
  const void* target_weight = nullptr;  // m x K (state dtype) or null for all ones
  int64_t ignore_index = -100;
  LossParams params{LossKind::ZLoss, 1.0, 0.0, 0.0};
  const char* op_name = "fastloss.spherical_output";
  DeviceErrorSlot error;  // CUDA head: a bad class index is reported here as (flat entry, class, D)
};

void validate_factored_problem(const FactoredProblem& p, const char* where);

// Whether sample j has a target entry. A sample without one has zero partials and gets no gradient
// even from a non-finite grad_loss (the mean over a batch with no target is 0/0, as in torch).
FL_HD bool has_target(const FactoredProblem& p, int64_t j) {
  for (int64_t k = 0; k < p.targets_per_sample; ++k) {
    const int64_t c = p.target[j * p.targets_per_sample + k];
    if (c >= 0 && c < p.classes) return true;
  }
  return false;
}

// ---- CPU -------------------------------------------------------------------
// loss: m; partials: m x (K+2). Throws std::invalid_argument (before writing) on a bad class index.
void factored_head_cpu(const FactoredProblem& p, void* loss, void* partials);
// grad_loss[j * grad_stride] scales sample j. Writes ytilde (m x (2d+2)), scaled partials
// (m x (K+2)) and coef (m x 2: the omega and wbar coefficients of sample j).
void factored_prepare_cpu(const FactoredProblem& p, const void* partials, const void* grad_loss, int64_t grad_stride,
                          void* ytilde, void* scaled, void* coef);
// M (m x m) from scaled partials, hg = h gradH^T and mh = h (Q h)^T (both m x m).
void factored_gram_cpu(const FactoredProblem& p, const void* scaled, const void* hg, const void* mh, void* gram);
// V[c_jk] -= lr * scaled[j, k] * R[j] for every target entry, in a fixed order (deterministic).
void factored_scatter_cpu(const FactoredProblem& p, void* weight_rows, const void* scaled, const void* r, double lr);
// The rows of R = Ydot h grouped by class, for the m x m-free Q update: with `order` the m*K entry
// indices sorted by class (stable), grouped[s] = sum over the entries e of s's class of
// scaled[e] * h[sample of e] when s is the first sorted position of its class, else 0 (m*K x d).
void factored_group_cpu(const FactoredProblem& p, const void* scaled, const int64_t* order, void* grouped);

#if defined(FASTLOSS_WITH_CUDA)
// ---- CUDA (pointers on `device`, work queued on `stream`, no host sync) ------
// A bad class index gives that sample a NaN loss and no gradient from that entry, and is reported
// through p.error (common/device_error.h).
void factored_head_cuda(const FactoredProblem& p, void* loss, void* partials, int device, cudaStream_t stream);
void factored_prepare_cuda(const FactoredProblem& p, const void* partials, const void* grad_loss, int64_t grad_stride,
                           void* ytilde, void* scaled, void* coef, int device, cudaStream_t stream);
void factored_gram_cuda(const FactoredProblem& p, const void* scaled, const void* hg, const void* mh, void* gram,
                        int device, cudaStream_t stream);
// order: null (atomic adds; repeated classes add in any order) or the m*K flat entry indices
// sorted by class (stable): each class's row is then written once, in a fixed order.
void factored_scatter_cuda(const FactoredProblem& p, void* weight_rows, const void* scaled, const void* r, double lr,
                           const int64_t* order, int device, cudaStream_t stream);
void factored_group_cuda(const FactoredProblem& p, const void* scaled, const int64_t* order, void* grouped, int device,
                         cudaStream_t stream);
#endif

}  // namespace spherical
}  // namespace fl
