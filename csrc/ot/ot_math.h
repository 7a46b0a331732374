// Math shared by the CPU and CUDA optimal-transport kernels: the streaming log-sum-exp (on
// common/fast_exp.h) and the ground costs between points. Everything here is FL_HD so both paths compute the
// same function.
#pragma once

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "common/fast_exp.h"
#include "common/host_device.h"
#include "common/math.h"

namespace fl::ot {

// A running log-sum-exp: the maximum seen and the sum of e^(v - max). -inf values (zero-mass entries)
// are skipped, so an all -inf reduction stays (-inf, 0) and its value is -inf, never NaN.
template <class Acc>
struct LogSumExp {
  Acc max;
  Acc sum;

  FL_HD static LogSumExp empty() { return {-static_cast<Acc>(INFINITY), Acc(0)}; }

  FL_HD void add(Acc v) {
    if (v == -static_cast<Acc>(INFINITY)) return;
    if (v <= max) {
      sum += fast_exp(v - max);
    } else {
      sum = sum * fast_exp(max - v) + Acc(1);
      max = v;
    }
  }

  // Adds a block already reduced to (block_max, block_sum).
  FL_HD void merge(Acc other_max, Acc other_sum) {
    if (other_sum == Acc(0)) return;
    if (sum == Acc(0)) {
      max = other_max;
      sum = other_sum;
    } else if (other_max <= max) {
      sum += other_sum * fast_exp(other_max - max);
    } else {
      sum = sum * fast_exp(max - other_max) + other_sum;
      max = other_max;
    }
  }
  FL_HD void merge(const LogSumExp& other) { merge(other.max, other.sum); }

  FL_HD Acc value() const { return sum == Acc(0) ? -static_cast<Acc>(INFINITY) : max + fl_log(sum); }
};

// Ground costs between points, from the squared norms and the dot product of (centred) points:
// p = 2 is half the squared distance (GeomLoss's convention), p = 1 the distance. Clamped at 0,
// since rounding can make |x|^2 + |y|^2 - 2 x.y slightly negative for nearby points.
template <class Acc>
FL_HD Acc point_cost(int p, Acc x_sqnorm, Acc y_sqnorm, Acc dot) {
  const Acc sq = x_sqnorm + y_sqnorm - Acc(2) * dot;
  const Acc clamped = sq < Acc(0) ? Acc(0) : sq;  // NaN stays NaN
  return p == 2 ? Acc(0.5) * clamped : fl_sqrt(clamped);
}

// d c(x, y) / d x = weight * (x - y): weight 1 for p = 2, 1 / |x - y| for p = 1 (0 where the points
// coincide: the subgradient of smallest norm).
template <class Acc>
FL_HD Acc cost_gradient_weight(int p, Acc cost) {
  if (p == 2) return Acc(1);
  return cost > Acc(0) ? Acc(1) / cost : Acc(0);
}

// The unbalanced update scales the softmin by rho / (rho + eps) (a KL marginal penalty of strength
// rho); rho <= 0 or infinite means balanced (1).
FL_HD double damping_factor(double rho, double eps) {
  if (!(rho > 0.0) || isinf(rho)) return 1.0;
  return rho / (rho + eps);
}

// One row's contribution to the convergence measure: w_i |1 - e^((old_i - new_i) / eps)|. For balanced
// problems, with the other side's marginal exact, this is the row's marginal error |a_i - sum_j P_ij|.
template <class Acc>
FL_HD Acc row_error(Acc log_weight, Acc old_potential, Acc new_potential, Acc inv_eps) {
  if (log_weight == -static_cast<Acc>(INFINITY)) return Acc(0);
  const Acc ratio = fl_exp((old_potential - new_potential) * inv_eps);
  return fl_exp(log_weight) * fl_abs(Acc(1) - ratio);
}

}  // namespace fl::ot
