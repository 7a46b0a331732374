// Math of the quadratically regularized, sparsity-constrained OT dual shared by CPU and CUDA.
#pragma once

#include "common/host_device.h"

namespace fl::ot {

// The transported mass of one entry: [alpha_i + beta_j - C_ij]_+ / gamma if alpha_i - C_ij is among the
// column's k largest (score >= threshold), else 0. Ties at the threshold are all kept.
template <class Acc>
FL_HD Acc sparse_plan_entry(Acc score, Acc beta, Acc threshold, Acc inv_gamma) {
  if (!(score >= threshold)) return Acc(0);
  const Acc t = score + beta;
  return t > Acc(0) ? t * inv_gamma : Acc(0);
}

}  // namespace fl::ot
