// Math shared by the CPU and CUDA optimal-transport kernels: the streaming log-sum-exp, the exponential
// they use, and the ground costs between points. Everything here is FL_HD so both paths compute the
// same function.
#pragma once

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "common/host_device.h"
#include "common/math.h"

namespace fl::ot {

// e^x for the inner loops. On the GPU: the hardware exp2 (__expf, about 2 ulp). On the CPU: a
// Cephes-style exp2 polynomial (relative error about 2e-7) written as selects that the vectorizer
// turns into blends (with -fno-trapping-math, set for the kernels in CMakeLists.txt), where libm's
// expf stays a scalar call: 0.6 against 3-4 ns per exponential on the CI machine. Rounding uses the
// 1.5 * 2^23 trick rather than floorf, a library call without SSE4.1. Arguments below -87.3
// (e^x < 2^-126) give exactly 0, so log-weights of -inf (zero mass) contribute exactly nothing; NaN
// stays NaN.
FL_HD float ot_exp(float x) {
#if defined(__CUDA_ARCH__)
  return __expf(x);
#else
  const float t = x * 1.44269504088896341f;
  const float clamped = t < -126.0f ? -126.0f : (t > 127.0f ? 127.0f : t);
  const float whole = (clamped + 12582912.0f) - 12582912.0f;  // round to nearest
  const float frac = clamped - whole;
  float poly = 1.535336188319500e-4f;
  poly = poly * frac + 1.339887440266574e-3f;
  poly = poly * frac + 9.618437357674640e-3f;
  poly = poly * frac + 5.550332471162809e-2f;
  poly = poly * frac + 2.402264791363012e-1f;
  poly = poly * frac + 6.931472028550421e-1f;
  poly = poly * frac + 1.0f;
  const uint32_t bits = static_cast<uint32_t>(static_cast<int32_t>(whole) + 127) << 23;
  float scale;
  memcpy(&scale, &bits, sizeof(scale));
  return t < -126.0f ? 0.0f : poly * scale;
#endif
}
FL_HD double ot_exp(double x) { return exp(x); }

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
      sum += ot_exp(v - max);
    } else {
      sum = sum * ot_exp(max - v) + Acc(1);
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
      sum += other_sum * ot_exp(other_max - max);
    } else {
      sum = sum * ot_exp(max - other_max) + other_sum;
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
