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

// ---- infinite and NaN terms -------------------------------------------------------------------
//
// One rule, shared by every CPU and CUDA kernel of the family (softmin rows and columns, dense and
// points, transport, plan; sparse_dual.h uses it for its scores): the term of a pair (i, j) is e^x with
// x = (f_i + g_j - C_ij) / eps + log a_i + log b_j (a half-step has one side's potential and weight
// only). Then
//   1. NaN in any input of a term (a cost, a point coordinate, a potential, a log-weight) makes the term
//      NaN, and a NaN term makes its reduction NaN: no chunk or block of a reduction is ever dropped,
//      so NaN in gives NaN out on both paths (also at zero-mass entries: a NaN is never "skipped").
//   2. Otherwise a pair with a +inf cost (a forbidden pair) or a zero-mass side (log-weight -inf)
//      carries no mass whatever the potentials are: x = -inf, the term is exactly 0, skipped. Why:
//      P_ij = a_i b_j e^((f_i + g_j - C_ij) / eps) must be 0 for every feasible plan where C_ij = +inf
//      (the primal cost <P, C> would be infinite otherwise), exactly as it is 0 where a_i b_j = 0; the
//      potentials only scale the finite entries. A +inf potential arises only from a reduction with no
//      admissible term (f_i = -eps LSE(nothing)), i.e. on a row whose pairs are all skipped already, so
//      letting it meet a +inf cost as inf - inf = NaN would turn an infeasible input into NaN.
//   3. Otherwise x is the plain sum: finite, or +inf (a +inf potential against a finite cost), which
//      makes the log-sum-exp +inf (and the softmin -inf).
// Consequence: an infeasible problem (a row or column with positive mass and only +inf costs against
// positive masses) gets f_i = +inf there after one half-step, the other potentials stay finite, the row
// carries no mass (its marginal error is its weight, see row_error), and the entropic cost
// <a, f> + <b, g> - eps (sum P - 1) is +inf, identically on both paths.
//
// Among inputs none of which is NaN, the sums below are NaN only as inf - inf, and in every such case
// one of the two infinities is a rule-2 condition (a -inf log-weight or potential, or a +inf cost;
// -inf potentials are skipped too: e^(-inf) = 0). So the code of rule 2 is "a NaN produced from non-NaN
// inputs is a skipped term": compares and one select, no branches (-fno-trapping-math). The CPU softmin
// does not even pay for those: it runs a chunk with the plain difference, whose sum is NaN exactly when
// some term is NaN, and redoes only such a chunk with pair_exponent (sinkhorn_cpu.cpp add_chunk).

template <class Acc>
FL_HD_INLINE Acc no_mass() {
  return -static_cast<Acc>(INFINITY);
}

// h / eps + log w for one side's entry: -inf for zero mass (also where h = +inf there), NaN if h or
// log w is NaN.
template <class Acc>
FL_HD_INLINE Acc scaled_potential_entry(Acc h, Acc log_w, Acc inv_eps) {
  const Acc v = h * inv_eps + log_w;
  return (v != v) & (h == h) & (log_w == log_w) ? no_mass<Acc>() : v;
}

// The exponent of a half-step's term, hb - c / eps (hb from scaled_potential_entry, scaled_cost =
// C_ij / eps): -inf for a skipped pair, NaN if either is NaN.
template <class Acc>
FL_HD_INLINE Acc pair_exponent(Acc hb, Acc scaled_cost) {
  const Acc v = hb - scaled_cost;
  return (v != v) & (hb == hb) & (scaled_cost == scaled_cost) ? no_mass<Acc>() : v;
}

// The exponent of a plan entry, fa + gb - c / eps (both sides scaled): -inf for a skipped pair.
template <class Acc>
FL_HD_INLINE Acc plan_exponent(Acc fa, Acc gb, Acc scaled_cost) {
  const Acc v = fa + gb - scaled_cost;
  return (v != v) & (fa == fa) & (gb == gb) & (scaled_cost == scaled_cost) ? no_mass<Acc>() : v;
}

// A running log-sum-exp: the maximum seen and the sum of e^(v - max). -inf terms (skipped pairs) add
// nothing, so an all -inf reduction stays (-inf, 0) and its value is -inf. A NaN term makes the sum
// NaN, and NaN stays in the sum through every later add and merge (NaN * 0 is NaN; no path replaces
// a nonzero sum), so the value is NaN. A +inf term makes the maximum +inf and the value +inf; equal
// maxima add without forming e^(inf - inf).
template <class Acc>
struct LogSumExp {
  Acc max;
  Acc sum;

  FL_HD static LogSumExp empty() { return {-static_cast<Acc>(INFINITY), Acc(0)}; }

  FL_HD void add(Acc v) {
    if (v == -static_cast<Acc>(INFINITY)) return;
    if (v <= max) {
      sum += v == max ? Acc(1) : fast_exp(v - max);
    } else {  // also NaN: e^(NaN) makes the sum NaN
      sum = sum * fast_exp(max - v) + Acc(1);
      max = v;
    }
  }

  // The shift of a block's exp pass, sum_t e^(v_t - shift), given the block's maximum taken with NaN
  // ignored (v > max ? v : max): that maximum when finite; 0 when it is -inf (every term skipped or
  // NaN: e^(-inf) = 0 and e^(NaN) = NaN, so the sum is 0 or NaN) or +inf (the sum is then positive,
  // or NaN, which is all merge(block_max, sum) reads of it). merge the block as (block_max, sum).
  FL_HD static Acc block_shift(Acc block_max) {
    return block_max == -static_cast<Acc>(INFINITY) || block_max == static_cast<Acc>(INFINITY) ? Acc(0) : block_max;
  }

  // Adds a block already reduced to (block_max, block_sum).
  FL_HD void merge(Acc other_max, Acc other_sum) {
    if (other_sum == Acc(0)) return;
    if (sum == Acc(0)) {
      max = other_max;
      sum = other_sum;
    } else if (other_max <= max) {
      sum += other_max == max ? other_sum : other_sum * fast_exp(other_max - max);
    } else {  // also a NaN maximum: the sum becomes NaN
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
// A row whose new potential is +inf has no admissible source (every term skipped): it receives no
// mass, so its error is its whole weight (the ratio is 0; (+inf - +inf) would be NaN where the old
// potential was +inf too). NaN in any argument gives NaN.
template <class Acc>
FL_HD Acc row_error(Acc log_weight, Acc old_potential, Acc new_potential, Acc inv_eps) {
  if (log_weight == -static_cast<Acc>(INFINITY)) return Acc(0);
  const bool unreachable = new_potential == static_cast<Acc>(INFINITY) && old_potential == old_potential;
  const Acc ratio = unreachable ? Acc(0) : fl_exp((old_potential - new_potential) * inv_eps);
  return fl_exp(log_weight) * fl_abs(Acc(1) - ratio);
}

}  // namespace fl::ot
