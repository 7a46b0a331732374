// The losses of pair_losses.h on one query row, on the GPU: a team of threads per row (a warp when
// rows are short, a whole block when they are long), each thread taking the columns j = rank,
// rank + size, ... The per-pair math is pair_losses.h's (its FL_HD functions); the row's sums,
// extrema and log-sum-exps become team reductions, in the same formulas and order of steps as the CPU
// row functions. Every thread ends with the row's result; every w_j is written by the thread that
// owns column j, so a row function may read back what it wrote without a barrier. Every reduction is
// reached by the whole team (the branches around them depend on reduced values only).
// Include only from .cu files.
#pragma once

#include <cfloat>
#include <cstdint>
#include <type_traits>

#include "common/cuda_reduce.cuh"
#include "common/fast_exp.h"
#include "metric/metric_kernels.h"
#include "metric/pair_losses.h"

namespace fl::metric::cuda_rows {

// A warp working on one row.
struct WarpTeam {
  static constexpr int kSize = 32;
  int rank;
  template <class T, class Combine>
  __device__ __forceinline__ T reduce(T value, Combine combine) const {
    return warp_allreduce<32>(value, combine);
  }
};

// A block of Threads working on one row; `scratch` holds Threads / 32 values of the widest type
// reduced (16 bytes).
template <int Threads>
struct BlockTeam {
  static constexpr int kSize = Threads;
  int rank;
  void* scratch;
  template <class T, class Combine>
  __device__ __forceinline__ T reduce(T value, Combine combine) const {
    static_assert(sizeof(T) <= 16, "scratch holds 16 bytes a warp");
    return block_allreduce<Threads>(value, combine, static_cast<T*>(scratch));
  }
};

template <class Team>
__device__ __forceinline__ float team_sum(const Team& t, float v) {
  return t.reduce(v, [](float a, float b) { return a + b; });
}
template <class Team>
__device__ __forceinline__ double team_sum(const Team& t, double v) {
  return t.reduce(v, [](double a, double b) { return a + b; });
}
template <class Team>
__device__ __forceinline__ float team_max(const Team& t, float v) {
  return t.reduce(v, [](float a, float b) { return fmaxf(a, b); });
}
template <class Team>
__device__ __forceinline__ float team_min(const Team& t, float v) {
  return t.reduce(v, [](float a, float b) { return fminf(a, b); });
}
template <class Team>
__device__ __forceinline__ bool team_any(const Team& t, bool v) {
  return t.reduce(static_cast<int>(v), [](int a, int b) { return a | b; }) != 0;
}

// One row of the similarity chunk (the accumulator type on the GPU is float).
struct DeviceRow {
  const float* s;         // m similarities
  const uint8_t* cls;     // m pair classes
  int64_t m;
  int64_t target;         // InfoNCE / AUC: the positive column
  // Euclidean losses: metric_cuda.cu's distances_kernel has replaced the similarities by the distances.
  __device__ __forceinline__ float dist(int64_t j) const { return s[j]; }
};

// The columns j of team member t: rank, rank + size, ...
#define FL_TEAM_COLUMNS(t, j, m) for (int64_t j = (t).rank; j < (m); j += std::decay_t<decltype(t)>::kSize)

// row_lse of pair_losses.h: log(sum exp(value(j))) over keep(j), with PML's e^0 when add_one.
template <class Team, class Value, class Keep>
__device__ __forceinline__ float team_lse(const Team& t, const DeviceRow& r, Value value, Keep keep, bool add_one) {
  float mx = add_one ? 0.0f : kNegInf<float>;
  FL_TEAM_COLUMNS(t, j, r.m) {
    const float v = value(j);
    if (keep(j) && v > mx) mx = v;
  }
  mx = team_max(t, mx);
  if (mx == kNegInf<float>) {  // (uniform over the team) only NaN or -inf kept: NaN, as row_lse
    float nan = 0.0f;
    FL_TEAM_COLUMNS(t, j, r.m)
      if (keep(j) && value(j) != value(j)) nan = 1.0f;
    return team_max(t, nan) > 0.0f ? __int_as_float(0x7fc00000) : mx;
  }
  float sum = 0.0f;
  FL_TEAM_COLUMNS(t, j, r.m)
    if (keep(j)) sum += fast_exp(value(j) - mx);
  sum = team_sum(t, sum) + (add_one ? fast_exp(-mx) : 0.0f);
  return mx + logf(sum);
}

// ---- forward: the row's terms, counts and statistics (the ..._result functions of pair_losses.h) ----

template <class Team>
__device__ inline RowResult<float> positives_vs_negatives_forward(const Team& t, const DeviceRow& r, float inv_t,
                                                                  bool per_row_mean) {
  const float ln = team_lse(t, r, [&](int64_t j) { return r.s[j] * inv_t; },
                            [&](int64_t j) { return r.cls[j] == kNegative; }, false);
  PositivesVsNegativesSums<float> sums;
  FL_TEAM_COLUMNS(t, j, r.m) sums.add(r.cls[j], r.s[j], ln, inv_t);
  return positives_vs_negatives_result(ln, team_sum(t, sums.sum), team_sum(t, sums.weight),
                                       team_sum(t, sums.positives), team_sum(t, sums.negatives), per_row_mean);
}

template <class Team>
__device__ inline RowResult<float> supcon_forward(const Team& t, const DeviceRow& r, float inv_t) {
  const float lse = team_lse(t, r, [&](int64_t j) { return r.s[j] * inv_t; },
                             [&](int64_t j) { return r.cls[j] != kExcluded; }, false);
  float positives = 0, negatives = 0, pos_sum = 0;
  FL_TEAM_COLUMNS(t, j, r.m) {
    if (r.cls[j] == kPositive) {
      positives += 1;
      pos_sum += r.s[j] * inv_t;
    } else if (r.cls[j] == kNegative) {
      negatives += 1;
    }
  }
  return supcon_result(lse, team_sum(t, positives), team_sum(t, negatives), team_sum(t, pos_sum));
}

template <class Team>
__device__ inline RowResult<float> multi_similarity_forward(const Team& t, const DeviceRow& r, const MsParams<float>& q) {
  float min_pos = FLT_MAX, max_neg = -FLT_MAX;  // ms_thresholds of pair_losses.h
  FL_TEAM_COLUMNS(t, j, r.m) {
    if (r.cls[j] == kPositive) min_pos = fminf(min_pos, r.s[j]);
    if (r.cls[j] == kNegative) max_neg = fmaxf(max_neg, r.s[j]);
  }
  min_pos = team_min(t, min_pos);
  max_neg = team_max(t, max_neg);
  auto pos = [&](int64_t j) { return r.cls[j] == kPositive && ms_keep_positive(q, r.s[j], max_neg); };
  auto neg = [&](int64_t j) { return r.cls[j] == kNegative && ms_keep_negative(q, r.s[j], min_pos); };
  const float lse_pos = team_lse(t, r, [&](int64_t j) { return -q.alpha * (r.s[j] - q.base); }, pos, true);
  const float lse_neg = team_lse(t, r, [&](int64_t j) { return q.beta * (r.s[j] - q.base); }, neg, true);
  float kept_pos = 0, kept_neg = 0;
  FL_TEAM_COLUMNS(t, j, r.m) {
    kept_pos += pos(j) ? 1.0f : 0.0f;
    kept_neg += neg(j) ? 1.0f : 0.0f;
  }
  return multi_similarity_result(lse_pos, lse_neg, team_sum(t, kept_pos), team_sum(t, kept_neg), min_pos, max_neg, q);
}

template <class Team>
__device__ inline RowResult<float> circle_forward(const Team& t, const DeviceRow& r, const CircleParams<float>& q) {
  float positives = 0, negatives = 0;
  FL_TEAM_COLUMNS(t, j, r.m) {
    positives += r.cls[j] == kPositive ? 1.0f : 0.0f;
    negatives += r.cls[j] == kNegative ? 1.0f : 0.0f;
  }
  positives = team_sum(t, positives);
  negatives = team_sum(t, negatives);
  if (positives == 0 || negatives == 0) return circle_result(positives, negatives, 0.0f, 0.0f);
  const float lse_pos = team_lse(t, r, [&](int64_t j) { return q.pos_logit(r.s[j]); },
                                 [&](int64_t j) { return r.cls[j] == kPositive; }, false);
  const float lse_neg = team_lse(t, r, [&](int64_t j) { return q.neg_logit(r.s[j]); },
                                 [&](int64_t j) { return r.cls[j] == kNegative; }, false);
  return circle_result(positives, negatives, lse_pos, lse_neg);
}

template <class Team>
__device__ inline RowResult<float> contrastive_forward(const Team& t, const DeviceRow& r, float pos_margin,
                                                       float neg_margin, bool cosine) {
  RowResult<float> out;
  float pos_sum = 0, neg_sum = 0, pos_count = 0, neg_count = 0;
  FL_TEAM_COLUMNS(t, j, r.m) {
    const float d = cosine ? 0.0f : r.dist(j);
    if (r.cls[j] == kPositive) {
      const float loss = contrastive_pos(cosine, pos_margin, r.s[j], d);
      pos_sum += loss;
      pos_count += loss > 0 ? 1.0f : 0.0f;
    } else if (r.cls[j] == kNegative) {
      const float loss = contrastive_neg(cosine, neg_margin, r.s[j], d);
      neg_sum += loss;
      neg_count += loss > 0 ? 1.0f : 0.0f;
    }
  }
  out.terms[0] = team_sum(t, pos_sum);
  out.terms[1] = team_sum(t, neg_sum);
  out.counts[0] = team_sum(t, pos_count);
  out.counts[1] = team_sum(t, neg_count);
  return out;
}

// Batch hard: the farthest positive and the nearest negative, the first column on ties (as
// batch_hard_pair of pair_losses.h); -1 when there is none.
template <class Team>
__device__ inline void batch_hard_pair(const Team& t, const DeviceRow& r, int64_t& hard_pos, int64_t& hard_neg) {
  struct Pick {
    float d;
    int64_t j;
  };
  Pick far{-FLT_MAX, -1}, near{FLT_MAX, -1};
  FL_TEAM_COLUMNS(t, j, r.m) {  // a thread sees its columns in increasing order
    if (r.cls[j] == kPositive && (far.j < 0 || r.dist(j) > far.d)) far = Pick{r.dist(j), j};
    if (r.cls[j] == kNegative && (near.j < 0 || r.dist(j) < near.d)) near = Pick{r.dist(j), j};
  }
  auto first_of = [](const Pick& a, const Pick& b, bool larger) {
    if (a.j < 0) return b;
    if (b.j < 0) return a;
    if (a.d != b.d) return (larger ? a.d > b.d : a.d < b.d) ? a : b;
    return a.j < b.j ? a : b;
  };
  far = t.reduce(far, [&](const Pick& a, const Pick& b) { return first_of(a, b, true); });
  near = t.reduce(near, [&](const Pick& a, const Pick& b) { return first_of(a, b, false); });
  hard_pos = far.j;
  hard_neg = near.j;
}

// Whether (positive at d_ap, negative at d_an) is a counted triplet: violated, and semi-hard when
// that mining is on (the conditions of TripletScratch in pair_losses.h).
__device__ __forceinline__ bool counted_triplet(const TripletParams<float>& q, float d_ap, float d_an) {
  return q.violation(d_ap, d_an) > 0 && (q.mining != TripletMining::SemiHard || q.semi_hard(d_ap, d_an));
}

// All / semi-hard triplets by pairs: O(|P_i| m) per row, where the CPU sorts the row (a per-row sort
// does not suit a team); the sums are the same up to rounding, kept in double.
template <class Team>
__device__ inline RowResult<float> triplet_forward(const Team& t, const DeviceRow& r, const TripletParams<float>& q) {
  RowResult<float> out;
  if (q.mining == TripletMining::BatchHard) {
    int64_t hp, hn;
    batch_hard_pair(t, r, hp, hn);
    if (hp < 0 || hn < 0) return out;
    const float v = q.violation(r.dist(hp), r.dist(hn));
    out.terms[0] = v > 0 ? v : 0.0f;
    out.counts[0] = v > 0 ? 1.0f : 0.0f;
    return out;
  }
  double sum = 0, count = 0;
  for (int64_t p = 0; p < r.m; ++p) {  // the whole team walks the positives (a uniform branch) ...
    if (r.cls[p] != kPositive) continue;
    const float d_ap = r.dist(p);
    FL_TEAM_COLUMNS(t, j, r.m) {  // ... and splits the negatives
      if (r.cls[j] != kNegative) continue;
      const float d_an = r.dist(j);
      if (counted_triplet(q, d_ap, d_an)) {
        sum += static_cast<double>(q.violation(d_ap, d_an));
        count += 1;
      }
    }
  }
  out.terms[0] = static_cast<float>(team_sum(t, sum));
  out.counts[0] = static_cast<float>(team_sum(t, count));
  return out;
}

template <class Team>
__device__ inline RowResult<float> auc_forward(const Team& t, const DeviceRow& r, float inv_t) {
  const float s_t = r.s[r.target];
  float sum = 0, negatives = 0;
  FL_TEAM_COLUMNS(t, j, r.m) {
    if (j == r.target || r.cls[j] == kExcluded) continue;
    sum += softplus_acc((r.s[j] - s_t) * inv_t);
    negatives += 1;
  }
  return auc_result(team_sum(t, sum), team_sum(t, negatives));
}

// ---- backward: the row of W = dL/dS (the ..._weight functions of pair_losses.h) -----------------------

// Every loss but triplet and AUC: w_j = weight(j) for each column of the team member.
template <class Team, class Weight>
__device__ __forceinline__ void write_weights(const Team& t, const DeviceRow& r, float* w, Weight weight) {
  FL_TEAM_COLUMNS(t, j, r.m) w[j] = weight(j);
}

// A positive's weight counts its negatives, a negative's its positives. The counts gather in w: for
// each positive p (the whole team walks them), every thread counts its own negatives j that form a
// triplet with p (w_j += 1) and the team sums them into p's count, which the thread owning column p
// stores. O(|P_i| m / team) per row, as the forward.
template <class Team>
__device__ inline void triplet_backward(const Team& t, const DeviceRow& r, float g, const TripletParams<float>& q,
                                        float* w) {
  if (q.mining == TripletMining::BatchHard) {
    int64_t hp, hn;
    batch_hard_pair(t, r, hp, hn);
    const bool live = hp >= 0 && hn >= 0 && q.violation(r.dist(hp), r.dist(hn)) > 0;
    FL_TEAM_COLUMNS(t, j, r.m) {
      float value = 0;
      if (live && j == hp) value += g * distance_slope(r.dist(hp));
      if (live && j == hn) value -= g * distance_slope(r.dist(hn));
      w[j] = value;
    }
    return;
  }
  FL_TEAM_COLUMNS(t, j, r.m) w[j] = 0;
  for (int64_t p = 0; p < r.m; ++p) {
    if (r.cls[p] != kPositive) continue;
    const float d_ap = r.dist(p);
    float mine = 0;
    FL_TEAM_COLUMNS(t, j, r.m) {
      if (r.cls[j] == kNegative && counted_triplet(q, d_ap, r.dist(j))) {
        w[j] += 1;
        mine += 1;
      }
    }
    const float negatives = team_sum(t, mine);
    if (t.rank == p % Team::kSize) w[p] = negatives;
  }
  FL_TEAM_COLUMNS(t, j, r.m) {
    const float slope = distance_slope(r.dist(j));
    w[j] = r.cls[j] == kPositive ? g * w[j] * slope : (r.cls[j] == kNegative ? -g * w[j] * slope : 0.0f);
  }
}

template <class Team>
__device__ inline void auc_backward(const Team& t, const DeviceRow& r, const float* stats, float g, float inv_t,
                                    float* w) {
  const float s_t = r.s[r.target];
  float total = 0;
  FL_TEAM_COLUMNS(t, j, r.m) {
    w[j] = auc_weight(j == r.target, r.cls[j], r.s[j], s_t, stats[0], g, inv_t);
    total += w[j];
  }
  total = team_sum(t, total);
  if (t.rank == r.target % Team::kSize) w[r.target] = -total;  // the thread that owns the target column
}

}  // namespace fl::metric::cuda_rows
