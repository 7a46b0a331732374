// Math of the quadratically regularized, sparsity-constrained OT dual shared by CPU and CUDA.
#pragma once

#include "common/host_device.h"
#include "ot/ot_math.h"

namespace fl::ot {

// The score alpha_i - C_ij of a pair, under the rule of ot_math.h: a +inf cost is a pair that carries
// nothing (score -inf, even against alpha_i = +inf), NaN in gives NaN.
template <class Acc>
FL_HD Acc sparse_score(Acc alpha, Acc cost) {
  return pair_exponent<Acc>(alpha, cost);
}

// The transported mass of one entry: [alpha_i + beta_j - C_ij]_+ / gamma if alpha_i - C_ij is among the
// column's k largest (score >= threshold), else 0. Ties at the threshold are all kept. NaN in the score,
// beta or the threshold (a column with a NaN score has a NaN threshold) gives NaN: a NaN is never
// dropped by a comparison. A -inf score (a +inf cost) gives 0, also against beta = +inf.
template <class Acc>
FL_HD Acc sparse_plan_entry(Acc score, Acc beta, Acc threshold, Acc inv_gamma) {
  if ((score != score) | (beta != beta) | (threshold != threshold)) return score + beta + threshold;  // NaN
  if (!(score >= threshold)) return Acc(0);
  const Acc t = score + beta;  // NaN only as -inf + inf: no mass, as the comparison below gives
  return t > Acc(0) ? t * inv_gamma : Acc(0);
}

}  // namespace fl::ot
