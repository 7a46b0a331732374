// Loss heads of the spherical family: losses that depend on a row of outputs o
// (length D) only through the target output o_c, s = sum_k o_k and q = sum_k o_k^2.
// A head maps (o_c, row moments) to the loss and to the coefficients of its
// gradient, which for every loss of the family has the form
//     dL/do_k = g_const + g_linear * (o_k - center) + g_target * [k == c].
// Writing it around `center` (the row mean for the Z-loss) keeps the gradient
// exact when the row has a large common offset. These heads are shared by the
// dense kernels (CPU and CUDA) and by the factored output layer.
#pragma once

#include "common/host_device.h"
#include "common/math.h"
#include "common/moments.h"

namespace fl {
namespace spherical {

// Codes are part of the Python <-> C++ contract (python/fastloss/spherical.py).
enum class LossKind : int { ZLoss = 0, SphericalSoftmax = 1, TaylorSoftmax = 2, SquaredError = 3 };

struct LossParams {
  LossKind kind;
  double a;    // Z-loss sharpness (> 0)
  double b;    // Z-loss offset
  double eps;  // Z-loss: added to the variance; spherical softmax: added to every o_k^2 (> 0)
};

template <class Acc>
struct RowGradient {
  Acc g_target;
  Acc g_const;
  Acc g_linear;
  Acc center;

  // The same gradient as partials with respect to (o_c, s, q), the form the
  // factored output layer needs: dL/ds = g_const - g_linear * center, dL/dq = g_linear / 2.
  FL_HD Acc d_sum() const { return g_const - g_linear * center; }
  FL_HD Acc d_sum_of_squares() const { return g_linear / Acc(2); }
};

template <class Acc>
struct HeadResult {
  Acc loss;
  RowGradient<Acc> grad;
};

template <class Acc>
FL_HD HeadResult<Acc> zero_head() {
  return HeadResult<Acc>{Acc(0), RowGradient<Acc>{Acc(0), Acc(0), Acc(0), Acc(0)}};
}

template <class Acc>
FL_HD HeadResult<Acc> nan_head() {
  const Acc nan = quiet_nan<Acc>();
  return HeadResult<Acc>{nan, RowGradient<Acc>{nan, nan, nan, nan}};
}

// Z-loss (de Brebisson & Vincent, 2016): z = (o_c - mean) / sigma with
// sigma^2 = var + eps, L = softplus(a (b - z)) / a. Not PaLM's log^2 Z term.
template <class Acc>
FL_HD HeadResult<Acc> zloss_head(Acc o_target, const Moments<Acc>& row, Acc a, Acc b, Acc eps) {
  const Acc count = row.n;
  const Acc sigma2 = row.variance() + eps;
  const Acc sigma = fl_sqrt(sigma2);
  const Acc z = (o_target - row.mean) / sigma;
  const Acc x = a * (b - z);
  const Acc g = -sigmoid(x);  // dL/dz
  HeadResult<Acc> out;
  out.loss = softplus(x) / a;
  out.grad.g_target = g / sigma;
  out.grad.g_const = -g / (count * sigma);
  out.grad.g_linear = -g * z / (count * sigma2);
  out.grad.center = row.mean;
  return out;
}

// Log-spherical softmax: L = -log((o_c^2 + eps) / sum_k (o_k^2 + eps)).
template <class Acc>
FL_HD HeadResult<Acc> spherical_softmax_head(Acc o_target, const Moments<Acc>& row, Acc eps) {
  const Acc numerator = o_target * o_target + eps;
  const Acc denominator = row.sum_of_squares() + row.n * eps;
  HeadResult<Acc> out;
  out.loss = fl_log(denominator) - fl_log(numerator);
  out.grad.g_target = Acc(-2) * o_target / numerator;
  out.grad.g_const = Acc(0);
  out.grad.g_linear = Acc(2) / denominator;
  out.grad.center = Acc(0);
  return out;
}

// t(o) = 1 + o + o^2/2 = ((1 + o)^2 + 1) / 2, always >= 1/2.
template <class Acc>
FL_HD Acc taylor_term(Acc o) {
  const Acc shifted = Acc(1) + o;
  return (shifted * shifted + Acc(1)) / Acc(2);
}

// Log-Taylor softmax: L = -log(t(o_c) / sum_k t(o_k)); the sum is D t(mean) + m2/2,
// a sum of positive terms.
template <class Acc>
FL_HD HeadResult<Acc> taylor_softmax_head(Acc o_target, const Moments<Acc>& row) {
  const Acc numerator = taylor_term(o_target);
  const Acc denominator = row.n * taylor_term(row.mean) + row.m2 / Acc(2);
  HeadResult<Acc> out;
  out.loss = fl_log(denominator) - fl_log(numerator);
  out.grad.g_target = -(Acc(1) + o_target) / numerator;
  out.grad.g_const = Acc(0);
  out.grad.g_linear = Acc(1) / denominator;
  out.grad.center = Acc(-1);
  return out;
}

// Squared error against the one-hot target: L = ||o - e_c||^2 = q - 2 o_c + 1.
template <class Acc>
FL_HD HeadResult<Acc> squared_error_head(Acc o_target, const Moments<Acc>& row) {
  HeadResult<Acc> out;
  out.loss = row.sum_of_squares() - Acc(2) * o_target + Acc(1);
  out.grad.g_target = Acc(-2);
  out.grad.g_const = Acc(0);
  out.grad.g_linear = Acc(2);
  out.grad.center = Acc(0);
  return out;
}

template <class Acc>
FL_HD HeadResult<Acc> evaluate_head(const LossParams& params, Acc o_target, const Moments<Acc>& row) {
  switch (params.kind) {
    case LossKind::ZLoss:
      return zloss_head<Acc>(o_target, row, Acc(params.a), Acc(params.b), Acc(params.eps));
    case LossKind::SphericalSoftmax:
      return spherical_softmax_head<Acc>(o_target, row, Acc(params.eps));
    case LossKind::TaylorSoftmax:
      return taylor_softmax_head<Acc>(o_target, row);
    case LossKind::SquaredError:
      return squared_error_head<Acc>(o_target, row);
  }
  return nan_head<Acc>();
}

// The gradient of one element, in the accumulator type.
template <class Acc>
FL_HD Acc element_gradient(const RowGradient<Acc>& g, Acc upstream, Acc o_k, bool is_target) {
  Acc value = g.g_const + g.g_linear * (o_k - g.center);
  if (is_target) value += g.g_target;
  return upstream * value;
}

// Per-row state saved by the forward pass for the backward pass: the four
// RowGradient coefficients, in the accumulator type.
constexpr int kCoefficientsPerRow = 4;

template <class Acc>
FL_HD void store_row_gradient(Acc* coef_row, const RowGradient<Acc>& g) {
  coef_row[0] = g.g_target;
  coef_row[1] = g.g_const;
  coef_row[2] = g.g_linear;
  coef_row[3] = g.center;
}

template <class Acc>
FL_HD RowGradient<Acc> load_row_gradient(const Acc* coef_row) {
  return RowGradient<Acc>{coef_row[0], coef_row[1], coef_row[2], coef_row[3]};
}

}  // namespace spherical
}  // namespace fl
