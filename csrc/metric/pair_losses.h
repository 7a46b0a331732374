// The losses of the metric family on one query row: the row of similarities s_j = x_i . y_j, each
// pair's class (excluded, positive, negative), and the loss's parameters in, the row's loss terms,
// counts and statistics out (forward), or the row of W_j = dL/ds_j out (backward). The semantics
// follow pytorch-metric-learning's losses and miners, cited per loss; the reduction over rows (mean,
// mean of the nonzero terms) is done by the caller from the terms and counts.
//
// The per-pair math (FL_HD_INLINE: softplus, distances, margins, the circle logits, MS mining,
// triplet conditions), each row's result from its sums and each pair's entry of W are shared with
// the CUDA row kernels (metric_rows_cuda.cuh), which run the row functions with a team of threads
// (a warp or a block) per row.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "common/cpu_multiversion.h"
#include "common/fast_exp.h"
#include "common/host_device.h"
#include "metric/metric_kernels.h"

namespace fl::metric {

enum PairClass : uint8_t { kExcluded = 0, kPositive = 1, kNegative = 2 };

template <class Acc>
struct Row {
  const Acc* s;         // m similarities
  const uint8_t* cls;   // m pair classes
  int64_t m;
  int64_t target;       // InfoNCE / AUC: the positive column
  const Acc* dist;      // contrastive / triplet (euclidean): m distances, else null
};

// A row's statistics copied out of the saved array: in the loops that write W, a local copy cannot
// alias W, so the compiler keeps them in registers.
template <class Acc>
struct RowStats {
  Acc v[kRowStats];
  explicit FL_HD_INLINE RowStats(const Acc* stats) {
    for (int k = 0; k < kRowStats; ++k) v[k] = stats[k];
  }
};

template <class Acc>
struct RowResult {
  Acc terms[kRowTerms] = {0, 0};
  Acc counts[kRowTerms] = {0, 0};
  Acc stats[kRowStats] = {0, 0, 0, 0};
};

template <class Acc>
constexpr Acc kNegInf = -std::numeric_limits<Acc>::infinity();

template <class Acc>
FL_HD_INLINE Acc softplus_acc(Acc x) {
  return (x > 0 ? x : Acc(0)) + std::log1p(std::exp(-std::fabs(x)));
}
template <class Acc>
FL_HD_INLINE Acc sigmoid_acc(Acc x) {
  return x >= 0 ? Acc(1) / (Acc(1) + std::exp(-x)) : std::exp(x) / (Acc(1) + std::exp(x));
}

// log(sum_j exp(v_j)) over the j where keep(j) holds, with an optional extra term e^0 (PML's
// add_one); -inf for an empty set without the extra term. Both loops are selects over the whole
// row, so they vectorize (fast_exp: common/fast_exp.h) inside the AVX2 clones of the callers.
template <class Acc, class Value, class Keep>
FL_CPU_INLINE Acc row_lse(int64_t m, Value value, Keep keep, bool add_one) {
  Acc mx = add_one ? Acc(0) : kNegInf<Acc>;
#pragma omp simd reduction(max : mx)
  for (int64_t j = 0; j < m; ++j) {
    const Acc v = value(j);
    mx = keep(j) && v > mx ? v : mx;
  }
  if (mx == kNegInf<Acc>) {  // the max skips NaN: a set of only NaN (and -inf) values must give NaN, not -inf
    for (int64_t j = 0; j < m; ++j)
      if (keep(j) && value(j) != value(j)) return std::numeric_limits<Acc>::quiet_NaN();
    return mx;
  }
  Acc sum = add_one ? fast_exp(-mx) : Acc(0);
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < m; ++j) {
    const Acc e = fast_exp(value(j) - mx);
    sum += keep(j) ? e : Acc(0);
  }
  return mx + std::log(sum);
}

// Euclidean distance between unit vectors from their similarity and squared norms, as
// torch.cdist computes it for more than 25 rows: sqrt(max(|x|^2 + |y|^2 - 2 s, 0)). The gradients
// below go through s only: exact for l2-normalized inputs (every caller normalizes), since the
// normalization's backward removes the radial part that |x|^2 would contribute.
template <class Acc>
FL_HD_INLINE Acc unit_distance(Acc x_sqnorm, Acc y_sqnorm, Acc s) {
  const Acc sq = x_sqnorm + y_sqnorm - Acc(2) * s;
  return std::sqrt(sq > 0 ? sq : Acc(0));
}
// Below this fraction of |x|^2 + |y|^2 the squared distance is recomputed from the differences. The
// GEMM form's rounding error is about eps (|x|^2 + |y|^2) (the products and the sums of the norms
// round at that size), so a near-duplicate pair at 1 degree (sq ~ 3e-4 of the norms) had a relative
// error ~1e-3 in float32; above the threshold the error stays under ~16 eps relative.
constexpr double kRefineBelow = 1.0 / 16;

// The euclidean distance of a pair: unit_distance's GEMM form, except for close pairs, where
// exact_sq() (sum_t (x_t - y_t)^2, O(dim)) replaces it. A NaN stays NaN (the clamp at 0 would drop it).
template <class Acc, class ExactSq>
FL_HD_INLINE Acc pair_distance(Acc x_sqnorm, Acc y_sqnorm, Acc s, ExactSq exact_sq) {
  const Acc scale = x_sqnorm + y_sqnorm;
  const Acc sq = scale - Acc(2) * s;
  const Acc refined = sq < Acc(kRefineBelow) * scale ? exact_sq() : sq;
  return std::sqrt(refined < 0 ? Acc(0) : refined);
}

// d(distance)/d(s) = -1 / distance; 0 at distance 0 (torch.cdist's gradient there).
template <class Acc>
FL_HD_INLINE Acc distance_slope(Acc d) {
  return d > 0 ? -Acc(1) / d : Acc(0);
}

// Each loss below has its row function (whole rows, CPU) and, shared with the GPU's team row
// functions (metric_rows_cuda.cuh), the pieces that are not loops: the row's result from its sums
// (..._result) and one pair's entry of W (..._weight).

// ---- InfoNCE / CLIP: -log softmax_j(scale s)[target] ----------------------------------------------

// g scale (e^(scale s - lse) - [positive]): a row's W entry, and with the column's LSE and upstream
// gradient the symmetric loss's column part.
template <class Acc>
FL_HD_INLINE Acc info_nce_weight(Acc s, bool positive, Acc lse, Acc g, Acc scale) {
  const Acc coef = g * scale;
  return coef * fast_exp(scale * s - lse) - (positive ? coef : Acc(0));
}

template <class Acc>
FL_HD_INLINE RowResult<Acc> info_nce_result(Acc lse, Acc s_target, Acc scale) {
  RowResult<Acc> out;
  out.terms[0] = lse - scale * s_target;
  out.counts[0] = 1;
  out.stats[0] = lse;
  out.stats[1] = s_target;
  return out;
}

template <class Acc>
FL_CPU_INLINE RowResult<Acc> info_nce_forward(const Row<Acc>& r, Acc scale) {
  const Acc lse = row_lse<Acc>(r.m, [&](int64_t j) { return scale * r.s[j]; }, [&](int64_t) { return true; }, false);
  return info_nce_result(lse, r.s[r.target], scale);
}

// The column part of the symmetric loss is added by the caller.
template <class Acc>
FL_CPU_INLINE void info_nce_backward(const Row<Acc>& r, const Acc* stats, Acc g, Acc scale, Acc* w) {
  const Acc lse = stats[0];
  const int64_t target = r.target;
#pragma omp simd
  for (int64_t j = 0; j < r.m; ++j) w[j] = info_nce_weight(r.s[j], j == target, lse, g, scale);
}

// ---- Each positive against the row's negatives only: NT-Xent (PML NTXentLoss) and decoupled softmax
// (DEXML). Per positive pair -log(e^{l_p} / (e^{l_p} + sum_neg e^{l_n})) = softplus(LSE_neg - l_p),
// times a per-pair factor: 1 for NT-Xent (averaged over all pairs by the caller), 1/|P_i| for
// decoupled softmax (averaged over rows). stats: LSE_neg, factor * sum_p sigmoid(LSE_neg - l_p), factor.

// sum: sum_p softplus(LSE_neg - l_p); weight: sum_p sigmoid(LSE_neg - l_p).
template <class Acc>
FL_HD_INLINE RowResult<Acc> positives_vs_negatives_result(Acc ln, Acc sum, Acc weight, Acc positives, Acc negatives,
                                                          bool per_row_mean) {
  RowResult<Acc> out;
  const Acc factor = per_row_mean ? (positives > 0 ? Acc(1) / positives : Acc(0)) : Acc(1);
  out.terms[0] = factor * sum;
  out.counts[0] = positives;
  out.counts[1] = negatives;
  out.stats[0] = ln;
  out.stats[1] = factor * weight;
  out.stats[2] = factor;
  return out;
}

// One row's (or one thread's share of a row's) sums for positives_vs_negatives_result.
template <class Acc>
struct PositivesVsNegativesSums {
  Acc sum = 0, weight = 0, positives = 0, negatives = 0;
  FL_HD_INLINE void add(uint8_t cls, Acc s, Acc ln, Acc inv_t) {
    if (cls == kNegative) negatives += 1;
    if (cls != kPositive) return;
    positives += 1;
    if (ln == kNegInf<Acc>) return;  // no negative: the pair's loss is log(1) = 0
    sum += softplus_acc(ln - s * inv_t);
    weight += sigmoid_acc(ln - s * inv_t);
  }
};

// 0 when the row has no negative (every pair's loss is log 1 = 0).
template <class Acc>
FL_HD_INLINE Acc positives_vs_negatives_weight(uint8_t cls, Acc s, const Acc* stats, Acc g, Acc inv_t) {
  const Acc ln = stats[0], weight = stats[1], factor = stats[2];
  const Acc e = fast_exp(s * inv_t - ln);  // sigmoid(ln - l) = 1 / (1 + e)
  const Acc pos = -g * factor * inv_t / (Acc(1) + e);
  const Acc neg = g * weight * e * inv_t;
  const Acc value = cls == kPositive ? pos : (cls == kNegative ? neg : Acc(0));
  return ln == kNegInf<Acc> ? Acc(0) : value;
}

template <class Acc>
FL_CPU_INLINE RowResult<Acc> positives_vs_negatives_forward(const Row<Acc>& r, Acc inv_t, bool per_row_mean) {
  const Acc ln = row_lse<Acc>(r.m, [&](int64_t j) { return r.s[j] * inv_t; },
                              [&](int64_t j) { return r.cls[j] == kNegative; }, false);
  PositivesVsNegativesSums<Acc> sums;
  for (int64_t j = 0; j < r.m; ++j) sums.add(r.cls[j], r.s[j], ln, inv_t);
  return positives_vs_negatives_result(ln, sums.sum, sums.weight, sums.positives, sums.negatives, per_row_mean);
}

template <class Acc>
FL_CPU_INLINE void positives_vs_negatives_backward(const Row<Acc>& r, const Acc* stats, Acc g, Acc inv_t, Acc* w) {
  const RowStats<Acc> st(stats);
#pragma omp simd
  for (int64_t j = 0; j < r.m; ++j) w[j] = positives_vs_negatives_weight(r.cls[j], r.s[j], st.v, g, inv_t);
}

// ---- SupCon (PML SupConLoss): LSE over every non-self pair minus the mean positive logit ----------

template <class Acc>
FL_HD_INLINE RowResult<Acc> supcon_result(Acc lse, Acc positives, Acc negatives, Acc pos_sum) {
  RowResult<Acc> out;
  out.terms[0] = positives > 0 ? lse - pos_sum / positives : Acc(0);
  out.counts[0] = positives;
  out.counts[1] = negatives;
  out.stats[0] = lse;
  out.stats[1] = positives;
  return out;
}

// 0 for an anchor without positives (PML's zero loss) and for the excluded pair.
template <class Acc>
FL_HD_INLINE Acc supcon_weight(uint8_t cls, Acc s, const Acc* stats, Acc g, Acc inv_t) {
  const Acc lse = stats[0], positives = stats[1];
  const Acc inv_pos = positives > 0 ? Acc(1) / positives : Acc(0);
  const Acc value = g * (fast_exp(s * inv_t - lse) - (cls == kPositive ? inv_pos : Acc(0))) * inv_t;
  return positives == 0 || cls == kExcluded ? Acc(0) : value;
}

template <class Acc>
FL_CPU_INLINE RowResult<Acc> supcon_forward(const Row<Acc>& r, Acc inv_t) {
  const Acc lse = row_lse<Acc>(r.m, [&](int64_t j) { return r.s[j] * inv_t; },
                               [&](int64_t j) { return r.cls[j] != kExcluded; }, false);
  Acc positives = 0, negatives = 0, pos_sum = 0;
  for (int64_t j = 0; j < r.m; ++j) {
    if (r.cls[j] == kPositive) {
      positives += 1;
      pos_sum += r.s[j] * inv_t;
    } else if (r.cls[j] == kNegative) {
      negatives += 1;
    }
  }
  return supcon_result(lse, positives, negatives, pos_sum);
}

template <class Acc>
FL_CPU_INLINE void supcon_backward(const Row<Acc>& r, const Acc* stats, Acc g, Acc inv_t, Acc* w) {
  const RowStats<Acc> st(stats);
#pragma omp simd
  for (int64_t j = 0; j < r.m; ++j) w[j] = supcon_weight(r.cls[j], r.s[j], st.v, g, inv_t);
}

// ---- Multi-Similarity (PML MultiSimilarityLoss, optionally on MultiSimilarityMiner's pairs) -------
// Mining keeps a positive when s_p - eps < max_neg s and a negative when s_n + eps > min_pos s
// (comparisons in the accumulator type, as PML's in the embeddings' type).

template <class Acc>
struct MsParams {
  Acc alpha, beta, base, eps;
  bool mining;
};

template <class Acc>
inline void ms_thresholds(const Row<Acc>& r, Acc& min_pos, Acc& max_neg) {
  min_pos = std::numeric_limits<Acc>::max();
  max_neg = std::numeric_limits<Acc>::lowest();
  for (int64_t j = 0; j < r.m; ++j) {
    if (r.cls[j] == kPositive) min_pos = std::min(min_pos, r.s[j]);
    if (r.cls[j] == kNegative) max_neg = std::max(max_neg, r.s[j]);
  }
}

template <class Acc>
FL_HD_INLINE bool ms_keep_positive(const MsParams<Acc>& q, Acc s, Acc max_neg) {
  return !q.mining || s - q.eps < max_neg;
}
template <class Acc>
FL_HD_INLINE bool ms_keep_negative(const MsParams<Acc>& q, Acc s, Acc min_pos) {
  return !q.mining || s + q.eps > min_pos;
}

template <class Acc>
FL_HD_INLINE RowResult<Acc> multi_similarity_result(Acc lse_pos, Acc lse_neg, Acc kept_pos, Acc kept_neg, Acc min_pos,
                                                    Acc max_neg, const MsParams<Acc>& q) {
  RowResult<Acc> out;
  out.terms[0] = lse_pos / q.alpha + lse_neg / q.beta;
  out.counts[0] = kept_pos;
  out.counts[1] = kept_neg;
  out.stats[0] = lse_pos;
  out.stats[1] = lse_neg;
  out.stats[2] = min_pos;
  out.stats[3] = max_neg;
  return out;
}

template <class Acc>
FL_HD_INLINE Acc multi_similarity_weight(uint8_t cls, Acc s, const Acc* stats, Acc g, const MsParams<Acc>& q) {
  const Acc lse_pos = stats[0], lse_neg = stats[1], min_pos = stats[2], max_neg = stats[3];
  const bool pos = cls == kPositive && ms_keep_positive(q, s, max_neg);
  const bool neg = cls == kNegative && ms_keep_negative(q, s, min_pos);
  const Acc e_pos = -g * fast_exp(-q.alpha * (s - q.base) - lse_pos);
  const Acc e_neg = g * fast_exp(q.beta * (s - q.base) - lse_neg);
  return pos ? e_pos : (neg ? e_neg : Acc(0));
}

template <class Acc>
FL_CPU_INLINE RowResult<Acc> multi_similarity_forward(const Row<Acc>& r, const MsParams<Acc>& q) {
  Acc min_pos, max_neg;
  ms_thresholds(r, min_pos, max_neg);
  auto pos = [&](int64_t j) { return r.cls[j] == kPositive && ms_keep_positive(q, r.s[j], max_neg); };
  auto neg = [&](int64_t j) { return r.cls[j] == kNegative && ms_keep_negative(q, r.s[j], min_pos); };
  const Acc lse_pos = row_lse<Acc>(r.m, [&](int64_t j) { return -q.alpha * (r.s[j] - q.base); }, pos, true);
  const Acc lse_neg = row_lse<Acc>(r.m, [&](int64_t j) { return q.beta * (r.s[j] - q.base); }, neg, true);
  Acc kept_pos = 0, kept_neg = 0;
  for (int64_t j = 0; j < r.m; ++j) {
    kept_pos += pos(j) ? 1 : 0;
    kept_neg += neg(j) ? 1 : 0;
  }
  return multi_similarity_result(lse_pos, lse_neg, kept_pos, kept_neg, min_pos, max_neg, q);
}

template <class Acc>
FL_CPU_INLINE void multi_similarity_backward(const Row<Acc>& r, const Acc* stats, Acc g, const MsParams<Acc>& q,
                                             Acc* w) {
  const MsParams<Acc> local = q;
  const RowStats<Acc> st(stats);
#pragma omp simd
  for (int64_t j = 0; j < r.m; ++j) w[j] = multi_similarity_weight(r.cls[j], r.s[j], st.v, g, local);
}

// ---- Circle (PML CircleLoss): softplus(LSE_pos + LSE_neg) with detached relu weights --------------

template <class Acc>
struct CircleParams {
  Acc gamma, op, on, delta_p, delta_n;
  explicit FL_HD_INLINE CircleParams(Acc m, Acc g) : gamma(g), op(1 + m), on(-m), delta_p(1 - m), delta_n(m) {}
  FL_HD_INLINE Acc pos_logit(Acc s) const { return -gamma * std::max(op - s, Acc(0)) * (s - delta_p); }
  FL_HD_INLINE Acc neg_logit(Acc s) const { return gamma * std::max(s - on, Acc(0)) * (s - delta_n); }
  // d(logit)/ds with the relu weights detached (PML detaches alpha_p and alpha_n).
  FL_HD_INLINE Acc pos_slope(Acc s) const { return -gamma * std::max(op - s, Acc(0)); }
  FL_HD_INLINE Acc neg_slope(Acc s) const { return gamma * std::max(s - on, Acc(0)); }
};

// A row without positives or without negatives is zero (PML), and its LSEs are not used.
template <class Acc>
FL_HD_INLINE RowResult<Acc> circle_result(Acc positives, Acc negatives, Acc lse_pos, Acc lse_neg) {
  RowResult<Acc> out;
  out.counts[0] = positives;
  out.counts[1] = negatives;
  if (positives == 0 || negatives == 0) return out;
  out.terms[0] = softplus_acc(lse_pos + lse_neg);
  out.stats[0] = lse_pos;
  out.stats[1] = lse_neg;
  out.stats[2] = 1;  // live row
  return out;
}

// outer: circle_outer(stats, g), the same for the whole row.
template <class Acc>
FL_HD_INLINE Acc circle_outer(const Acc* stats, Acc g) {
  return stats[2] != 0 ? g * sigmoid_acc(stats[0] + stats[1]) : Acc(0);
}
template <class Acc>
FL_HD_INLINE Acc circle_weight(uint8_t cls, Acc s, const Acc* stats, Acc outer, const CircleParams<Acc>& q) {
  if (stats[2] == 0 || cls == kExcluded) return 0;
  if (cls == kPositive) return outer * std::exp(q.pos_logit(s) - stats[0]) * q.pos_slope(s);
  return outer * std::exp(q.neg_logit(s) - stats[1]) * q.neg_slope(s);
}

template <class Acc>
RowResult<Acc> circle_forward(const Row<Acc>& r, const CircleParams<Acc>& q) {
  Acc positives = 0, negatives = 0;
  for (int64_t j = 0; j < r.m; ++j) {
    positives += r.cls[j] == kPositive ? 1 : 0;
    negatives += r.cls[j] == kNegative ? 1 : 0;
  }
  if (positives == 0 || negatives == 0) return circle_result<Acc>(positives, negatives, 0, 0);
  const Acc lse_pos = row_lse<Acc>(r.m, [&](int64_t j) { return q.pos_logit(r.s[j]); },
                                   [&](int64_t j) { return r.cls[j] == kPositive; }, false);
  const Acc lse_neg = row_lse<Acc>(r.m, [&](int64_t j) { return q.neg_logit(r.s[j]); },
                                   [&](int64_t j) { return r.cls[j] == kNegative; }, false);
  return circle_result(positives, negatives, lse_pos, lse_neg);
}

template <class Acc>
void circle_backward(const Row<Acc>& r, const Acc* stats, Acc g, const CircleParams<Acc>& q, Acc* w) {
  const RowStats<Acc> st(stats);
  const Acc outer = circle_outer(st.v, g);
  for (int64_t j = 0; j < r.m; ++j) w[j] = circle_weight(r.cls[j], r.s[j], st.v, outer, q);
}

// ---- Contrastive (PML ContrastiveLoss): hinge per positive and per negative pair ------------------
// terms[0], counts[0]: positive pairs (sum, number > 0); terms[1], counts[1]: negative pairs.

template <class Acc>
FL_HD_INLINE Acc contrastive_pos(bool cosine, Acc pos_margin, Acc s, Acc d) {
  return std::max(cosine ? pos_margin - s : d - pos_margin, Acc(0));
}
template <class Acc>
FL_HD_INLINE Acc contrastive_neg(bool cosine, Acc neg_margin, Acc s, Acc d) {
  return std::max(cosine ? s - neg_margin : neg_margin - d, Acc(0));
}

// grad: the upstream gradients of the positive and the negative sums; d: the distance (euclidean).
template <class Acc>
FL_HD_INLINE Acc contrastive_weight(uint8_t cls, Acc s, Acc d, const Acc* grad, Acc pos_margin, Acc neg_margin,
                                    bool cosine) {
  if (cls == kPositive && contrastive_pos(cosine, pos_margin, s, d) > 0) return grad[0] * (cosine ? Acc(-1) : distance_slope(d));
  if (cls == kNegative && contrastive_neg(cosine, neg_margin, s, d) > 0) return grad[1] * (cosine ? Acc(1) : -distance_slope(d));
  return 0;
}

template <class Acc>
RowResult<Acc> contrastive_forward(const Row<Acc>& r, Acc pos_margin, Acc neg_margin, bool cosine) {
  RowResult<Acc> out;
  for (int64_t j = 0; j < r.m; ++j) {
    const Acc d = cosine ? Acc(0) : r.dist[j];
    if (r.cls[j] == kPositive) {
      const Acc loss = contrastive_pos(cosine, pos_margin, r.s[j], d);
      out.terms[0] += loss;
      out.counts[0] += loss > 0 ? 1 : 0;
    } else if (r.cls[j] == kNegative) {
      const Acc loss = contrastive_neg(cosine, neg_margin, r.s[j], d);
      out.terms[1] += loss;
      out.counts[1] += loss > 0 ? 1 : 0;
    }
  }
  return out;
}

template <class Acc>
void contrastive_backward(const Row<Acc>& r, const Acc* grad, Acc pos_margin, Acc neg_margin, bool cosine, Acc* w) {
  for (int64_t j = 0; j < r.m; ++j)
    w[j] = contrastive_weight(r.cls[j], r.s[j], cosine ? Acc(0) : r.dist[j], grad, pos_margin, neg_margin, cosine);
}

// ---- Triplet (PML TripletMarginLoss with all triplets, BatchHardMiner or TripletMarginMiner
// "semihard"): relu((d_ap - d_an) + margin) per triplet, on euclidean distances. terms[0] is the
// sum over the anchor's triplets and counts[0] the number of nonzero ones. The sums over all
// (positive, negative) pairs of an anchor come from the sorted distances, O(m log m) per row.

template <class Acc>
struct TripletParams {
  Acc margin, mining_margin;
  TripletMining mining;
  FL_HD_INLINE Acc violation(Acc d_ap, Acc d_an) const { return (d_ap - d_an) + margin; }
  // Semi-hard: 0 < d_an - d_ap <= mining_margin (PML's triplet_margin = an - ap).
  FL_HD_INLINE bool semi_hard(Acc d_ap, Acc d_an) const {
    const Acc gap = d_an - d_ap;
    return gap > 0 && gap <= mining_margin;
  }
};

// Scratch of one row: the distances of its positives and negatives, sorted, and prefix sums.
template <class Acc>
struct TripletScratch {
  std::vector<Acc> pos, neg;
  std::vector<double> neg_prefix;  // in double: a window's sum is a difference of two prefixes
  void sort_row(const Row<Acc>& r) {
    pos.clear();
    neg.clear();
    for (int64_t j = 0; j < r.m; ++j) {
      if (r.cls[j] == kPositive) pos.push_back(r.dist[j]);
      if (r.cls[j] == kNegative) neg.push_back(r.dist[j]);
    }
    std::sort(pos.begin(), pos.end());
    std::sort(neg.begin(), neg.end());
    neg_prefix.assign(neg.size() + 1, 0.0);
    for (size_t k = 0; k < neg.size(); ++k) neg_prefix[k + 1] = neg_prefix[k] + neg[k];
  }
  // The negatives (indices into the sorted `neg`) that form a counted triplet with a positive at d_ap.
  void negative_range(const TripletParams<Acc>& q, Acc d_ap, size_t& lo, size_t& hi) const {
    auto first_false = [&](auto pred) {
      return static_cast<size_t>(std::partition_point(neg.begin(), neg.end(), pred) - neg.begin());
    };
    hi = first_false([&](Acc d_an) { return q.violation(d_ap, d_an) > 0; });
    lo = 0;
    if (q.mining == TripletMining::SemiHard) {
      lo = first_false([&](Acc d_an) { return !(d_an - d_ap > 0); });
      hi = std::min(hi, first_false([&](Acc d_an) { return d_an - d_ap <= q.mining_margin; }));
    }
    if (hi < lo) hi = lo;
  }
  // How many positives form a counted triplet with a negative at d_an.
  size_t positive_count(const TripletParams<Acc>& q, Acc d_an) const {
    auto first_false = [&](auto pred) {
      return static_cast<size_t>(std::partition_point(pos.begin(), pos.end(), pred) - pos.begin());
    };
    const size_t from = first_false([&](Acc d_ap) { return !(q.violation(d_ap, d_an) > 0); });
    size_t lo = from, hi = pos.size();
    if (q.mining == TripletMining::SemiHard) {
      hi = first_false([&](Acc d_ap) { return d_an - d_ap > 0; });
      lo = std::max(lo, first_false([&](Acc d_ap) { return d_an - d_ap > q.mining_margin; }));
    }
    return hi > lo ? hi - lo : 0;
  }
};

// Batch hard: the farthest positive and the nearest negative (first in column order on ties).
template <class Acc>
inline void batch_hard_pair(const Row<Acc>& r, int64_t& hard_pos, int64_t& hard_neg) {
  hard_pos = hard_neg = -1;
  for (int64_t j = 0; j < r.m; ++j) {
    if (r.cls[j] == kPositive && (hard_pos < 0 || r.dist[j] > r.dist[hard_pos])) hard_pos = j;
    if (r.cls[j] == kNegative && (hard_neg < 0 || r.dist[j] < r.dist[hard_neg])) hard_neg = j;
  }
}

template <class Acc>
RowResult<Acc> triplet_forward(const Row<Acc>& r, const TripletParams<Acc>& q, TripletScratch<Acc>& scratch) {
  RowResult<Acc> out;
  if (q.mining == TripletMining::BatchHard) {
    int64_t hp, hn;
    batch_hard_pair(r, hp, hn);
    if (hp < 0 || hn < 0) return out;
    const Acc v = q.violation(r.dist[hp], r.dist[hn]);
    out.terms[0] = std::max(v, Acc(0));
    out.counts[0] = v > 0 ? 1 : 0;
    return out;
  }
  scratch.sort_row(r);
  for (const Acc d_ap : scratch.pos) {
    size_t lo, hi;
    scratch.negative_range(q, d_ap, lo, hi);
    const Acc k = static_cast<Acc>(hi - lo);
    out.terms[0] += static_cast<Acc>(static_cast<double>(k) * (static_cast<double>(d_ap) + q.margin) -
                                     (scratch.neg_prefix[hi] - scratch.neg_prefix[lo]));
    out.counts[0] += k;
  }
  return out;
}

template <class Acc>
void triplet_backward(const Row<Acc>& r, Acc g, const TripletParams<Acc>& q, TripletScratch<Acc>& scratch, Acc* w) {
  std::fill(w, w + r.m, Acc(0));
  if (q.mining == TripletMining::BatchHard) {
    int64_t hp, hn;
    batch_hard_pair(r, hp, hn);
    if (hp < 0 || hn < 0 || !(q.violation(r.dist[hp], r.dist[hn]) > 0)) return;
    w[hp] += g * distance_slope(r.dist[hp]);
    w[hn] -= g * distance_slope(r.dist[hn]);
    return;
  }
  scratch.sort_row(r);
  for (int64_t j = 0; j < r.m; ++j) {
    if (r.cls[j] == kPositive) {
      size_t lo, hi;
      scratch.negative_range(q, r.dist[j], lo, hi);
      w[j] = g * static_cast<Acc>(hi - lo) * distance_slope(r.dist[j]);
    } else if (r.cls[j] == kNegative) {
      w[j] = -g * static_cast<Acc>(scratch.positive_count(q, r.dist[j])) * distance_slope(r.dist[j]);
    }
  }
}

// ---- AUC (Mann-Whitney): mean over the row's negatives of softplus((s_n - s_target) / t) ---------

template <class Acc>
FL_HD_INLINE RowResult<Acc> auc_result(Acc sum, Acc negatives) {
  RowResult<Acc> out;
  out.terms[0] = negatives > 0 ? sum / negatives : Acc(0);
  out.counts[0] = 1;
  out.stats[0] = negatives;
  return out;
}

// A negative's W entry; the target's is minus the sum of the row's others.
template <class Acc>
FL_HD_INLINE Acc auc_weight(bool target, uint8_t cls, Acc s, Acc s_target, Acc negatives, Acc g, Acc inv_t) {
  if (target || cls == kExcluded || negatives == 0) return 0;
  return g * sigmoid_acc((s - s_target) * inv_t) * inv_t / negatives;
}

template <class Acc>
RowResult<Acc> auc_forward(const Row<Acc>& r, Acc inv_t) {
  const Acc s_t = r.s[r.target];
  Acc sum = 0, negatives = 0;
  for (int64_t j = 0; j < r.m; ++j) {
    if (j == r.target || r.cls[j] == kExcluded) continue;
    sum += softplus_acc((r.s[j] - s_t) * inv_t);
    negatives += 1;
  }
  return auc_result(sum, negatives);
}

template <class Acc>
void auc_backward(const Row<Acc>& r, const Acc* stats, Acc g, Acc inv_t, Acc* w) {
  const Acc s_t = r.s[r.target];
  Acc total = 0;
  for (int64_t j = 0; j < r.m; ++j) {
    w[j] = auc_weight(j == r.target, r.cls[j], r.s[j], s_t, stats[0], g, inv_t);
    total += w[j];
  }
  w[r.target] = -total;
}

}  // namespace fl::metric
