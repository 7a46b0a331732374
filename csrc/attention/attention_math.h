// The per-score math of softplus attention, shared by the CPU and CUDA kernels (FL_HD): the
// softplus with its derivative from one exponential, the per-row constants, and the weights and
// score gradients of LSSA and LSSAR. The tile loops in attention_cpu.cpp and attention_cuda.cu only
// move data; what a score becomes is decided here.
#pragma once

#include <math.h>

#include "attention/attention_rows.h"
#include "common/fast_exp.h"
#include "common/host_device.h"
#include "common/math.h"

namespace fl::attention {

// log(1 + e) for e in [0, 1]: in float, a degree-8 Chebyshev fit of log1p(e)/e (relative error
// 8e-8, below float's half ulp), so the softplus costs one exponential and FMAs instead of a second
// special function (the note in shared/reference/attention.md: log1p on the FMA pipe). Exact in double.
FL_HD float log1p_unit(float e) {
  float p = 0.005186113789811646f;
  p = p * e - 0.02921086555167798f;
  p = p * e + 0.07754165699152589f;
  p = p * e - 0.13584082425339145f;
  p = p * e + 0.19056042431967388f;
  p = p * e - 0.24825678823560468f;
  p = p * e + 0.3331601629876651f;
  p = p * e - 0.49999256382545426f;
  p = p * e + 0.9999999210035833f;
  return p * e;
}
FL_HD double log1p_unit(double e) { return log1p(e); }

// softplus(s) and its derivative sigmoid(s), sharing e = exp(-|s|).
template <class Acc>
FL_HD void softplus_and_sigmoid(Acc s, Acc& sp, Acc& sig) {
  const Acc e = fast_exp(-fl_abs(s));
  sp = (s > Acc(0) ? s : Acc(0)) + log1p_unit(e);
  const Acc r = Acc(1) / (Acc(1) + e);
  sig = s >= Acc(0) ? r : e * r;
}

// The integer value of p when it is a whole number in [1, 64], else 0.
FL_HD int integer_power(double p) {
  const int whole = static_cast<int>(p);
  return (static_cast<double>(whole) == p && whole >= 1 && whole <= 64) ? whole : 0;
}

// What the score loops need to know about one query row.
template <class Acc>
struct RowConstants {
  int64_t lo, hi;  // visible keys
  Acc scale;       // c_i
  Acc count;       // N_i
  Acc offset;      // o_i (LSSAR)
};

struct ScaleRule {
  bool length;      // c_i = log(head_dim) * log(N_i), else c_i = fixed
  double log_dim;   // log(head_dim)
  double fixed;
  int64_t offset_rows;
};

template <class Acc>
FL_HD RowConstants<Acc> row_constants(const Masking& m, const ScaleRule& rule, int64_t row) {
  const RowSpan span = row_span(m, row);
  RowConstants<Acc> r;
  r.lo = span.lo;
  r.hi = span.hi;
  const int64_t n = span.hi - span.lo;
  r.count = static_cast<Acc>(n);
  r.scale = rule.length ? static_cast<Acc>(rule.log_dim * log(static_cast<double>(n > 0 ? n : 1)))
                        : static_cast<Acc>(rule.fixed);
  r.offset = span.pos < rule.offset_rows ? Acc(0) : Acc(1);
  return r;
}

// Everything a score loop needs about its row, forward and backward.
template <class Acc>
struct RowState {
  RowConstants<Acc> rc;
  Acc inv_z = 0;     // 1 / Z_i (0 for a row whose output is 0)
  Acc inv_xmax = 0;  // LSSAR: 1 / max_j x_ij
  Acc inv_u = 0;     // LSSAR: 1 / sum_j u_ij^p
  Acc d = 0;         // backward: D_i = dO_i . out_i
  Acc f = 0;         // backward, LSSAR: F_i = sum_j A_ij dA_ij
  Acc dA_coef = 0;   // backward, LSSAR: N_i p / (xmax_i U_i)
};

struct Reweight {
  bool on;
  double p;
  int integer_p;  // p when it is a whole number in [1, 64], else 0 (then u^(p-1) = exp((p-1) log u))
};

// The pieces of a score, each branch-free so that the CPU's loops over a tile vectorize; the CUDA
// kernels compose the same functions per score (forward_weight, score_grad below), the CPU calls
// them pass by pass over a row of the tile (attention_cpu.cpp).

// LSSAR's base u = relu(N_i A_ij - o_i) / max_j x_ij in [0, 1] (0 where x <= 0).
template <class Acc>
FL_HD Acc reweight_base(const RowState<Acc>& row, Acc sp) {
  const Acc x = row.rc.count * sp * row.inv_z - row.rc.offset;
  const Acc u = x * row.inv_xmax;
  const Acc clipped = u > Acc(1) ? Acc(1) : u;  // rounding can put the row's largest u a hair above 1
  return x > Acc(0) ? clipped : Acc(0);
}

// One step of u^(p-1) by repeated squaring: with result = 1 and base = u to start, for each bit of
// p - 1 from the lowest: result *= base where the bit is set, then base *= base. The CPU runs the
// steps as passes over a tile row, the GPU as a loop per score: the same multiplications in the
// same order. (LSSAR's p = 15: p - 1 = 14 is 3 bits, 5 multiplies.)
template <class Acc>
FL_HD void power_step(Acc& result, Acc& base, bool bit) {
  result = bit ? result * base : result;
  base *= base;
}

// u^(p-1) for u in [0, 1], 0 where u = 0 (the relu's zero gradient, also for p = 1).
template <class Acc>
FL_HD Acc power_pm1(Acc u, const Reweight& rw) {
  if (rw.integer_p == 0) return u > Acc(0) ? fl_exp(static_cast<Acc>(rw.p - 1.0) * fl_log(u)) : Acc(0);
  Acc result = Acc(1), base = u;
  for (int e = rw.integer_p - 1; e > 0; e >>= 1) power_step(result, base, (e & 1) != 0);
  return u > Acc(0) ? result : Acc(0);
}

// Forward weight of a visible score q_i . k_j = dot: softplus(c s) for LSSA (normalized by Z later),
// u^p for LSSAR (normalized by U later).
template <class Acc>
FL_HD Acc forward_weight(const RowState<Acc>& row, const Reweight& rw, Acc dot) {
  Acc sp, sig;
  softplus_and_sigmoid(row.rc.scale * dot, sp, sig);
  if (!rw.on) return sp;
  const Acc u = reweight_base(row, sp);
  return power_pm1(u, rw) * u;
}

// Backward, per visible score. With dp = dO_i . v_j, D_i = dO_i . out_i and (LSSAR) F_i:
//   LSSA:  dsp = (dp - D) / Z,                      value weight A_ij = sp / Z
//   LSSAR: dA = N p u^(p-1) (dp - D) / (xmax U) where x > 0 (else 0), dsp = (dA - F) / Z,
//          value weight W_ij = u^p / U
// The score gradient is with respect to the raw dot product q_i . k_j: c_i sigmoid(c_i dot) dsp.
template <class Acc>
struct ScoreGrad {
  Acc value_weight;  // multiplies dO_i into dV_j
  Acc grad;          // multiplies k_j into dQ_i and q_i into dK_j
  Acc grad_times_z;  // grad without the row's 1/Z_i (for a product whose rows are scaled after)
};

// LSSAR's row terms, from a pre-pass over the row's scores: D_i = sum_j W_ij dp_ij (equal to
// dO_i . out_i, but without out's rounding to a 16-bit type, which p u^(p-1) amplifies) and
// F_i = sum_j A_ij dA_ij = N p / (xmax U) (sum_j A u^(p-1) dp - D_i sum_j A u^(p-1)).
template <class Acc>
struct RowTermSums {
  Acc w_dp = 0, a_pm1_dp = 0, a_pm1 = 0;
};

template <class Acc>
FL_HD void add_row_terms(RowTermSums<Acc>& sums, const RowState<Acc>& row, Acc sp, Acc u, Acc u_pow_pm1, Acc dp) {
  const Acc a_pm1 = sp * row.inv_z * u_pow_pm1;
  sums.w_dp += u_pow_pm1 * u * row.inv_u * dp;
  sums.a_pm1_dp += a_pm1 * dp;
  sums.a_pm1 += a_pm1;
}

template <class Acc>
FL_HD void finish_row_terms(const RowState<Acc>& row, const RowTermSums<Acc>& sums, Acc& d, Acc& f) {
  d = sums.w_dp;
  f = row.dA_coef * (sums.a_pm1_dp - d * sums.a_pm1);
}

// From the parts: sp and sig of the score, and for LSSAR u and u^(p-1).
template <class Acc>
FL_HD ScoreGrad<Acc> score_grad_parts(const RowState<Acc>& row, bool reweight, Acc sp, Acc sig, Acc u,
                                      Acc u_pow_pm1, Acc dp) {
  ScoreGrad<Acc> out;
  const Acc c = row.rc.scale;
  if (!reweight) {
    out.value_weight = sp * row.inv_z;
    out.grad_times_z = c * sig * (dp - row.d);
  } else {
    const Acc dA = row.dA_coef * u_pow_pm1 * (dp - row.d);
    out.value_weight = u_pow_pm1 * u * row.inv_u;
    out.grad_times_z = c * sig * (dA - row.f);
  }
  out.grad = out.grad_times_z * row.inv_z;
  return out;
}

template <class Acc>
FL_HD ScoreGrad<Acc> score_grad(const RowState<Acc>& row, const Reweight& rw, Acc dot, Acc dp) {
  Acc sp, sig;
  softplus_and_sigmoid(row.rc.scale * dot, sp, sig);
  const Acc u = rw.on ? reweight_base(row, sp) : Acc(0);
  const Acc u_pow_pm1 = rw.on ? power_pm1(u, rw) : Acc(0);
  return score_grad_parts(row, rw.on, sp, sig, u, u_pow_pm1, dp);
}

// The row's state from the forward statistics (Z; for LSSAR also xmax and U), as the second forward
// pass and the backward see it. A row with Z = 0 (every score underflowed) or, for LSSAR, xmax <= 0
// (no key above the uniform weight) has output 0 and passes no gradient.
template <class Acc>
FL_HD RowState<Acc> row_state(const RowConstants<Acc>& rc, const Reweight& rw, Acc z, Acc xmax, Acc u_sum) {
  RowState<Acc> row;
  row.rc = rc;
  row.inv_z = z > Acc(0) ? Acc(1) / z : Acc(0);
  if (rw.on) {
    const bool live = z > Acc(0) && xmax > Acc(0);
    row.inv_xmax = live ? Acc(1) / xmax : Acc(0);
    row.inv_u = live && u_sum > Acc(0) ? Acc(1) / u_sum : Acc(0);
    row.dA_coef = rc.count * static_cast<Acc>(rw.p) * row.inv_xmax * row.inv_u;
    if (!live) row.inv_z = Acc(0);
  }
  return row;
}

// LSSAR: max_j x_ij from the first pass's Z_i and max_j sp_ij, exactly N_i max(sp) / Z_i - o_i.
template <class Acc>
FL_HD Acc reweight_xmax(const RowConstants<Acc>& rc, Acc z, Acc sp_max) {
  return z > Acc(0) ? rc.count * sp_max / z - rc.offset : Acc(0);
}

}  // namespace fl::attention
