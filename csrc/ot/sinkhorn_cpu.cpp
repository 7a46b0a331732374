// CPU Sinkhorn kernels: the softmin half-step, the solver loop, the transport statistics and the plan.
// Destinations are processed in tiles of kRowTile rows against chunks of kChunk sources, with a
// chunked log-sum-exp (one max pass and one exp pass per chunk, both vectorized). A cost matrix read
// by columns takes a column-block path instead, so that every pass over it stays row-major.
#include <cmath>
#include <limits>
#include <vector>

#include "common/cpu_multiversion.h"
#include "common/parallel.h"
#include "ot/cpu_geometry.h"
#include "ot/ot_kernels.h"
#include "ot/sinkhorn_loop.h"
#include "ot/solve_workspace.h"

namespace fl::ot {
namespace {

using cpu::kChunk;
using cpu::kRowTile;
using cpu::SideView;

template <class Acc>
constexpr Acc kNegInf = -std::numeric_limits<Acc>::infinity();

bool skipped(const int32_t* done_at, int64_t b, int32_t iteration) {
  return done_at != nullptr && done_at[b] >= 0 && done_at[b] < iteration;
}

// hb_j = h_j / eps + log_w_j for every source of every problem (-inf for zero mass; see ot_math.h).
template <class Acc>
std::vector<Acc> scaled_potential(const void* h, const void* log_w, int64_t count, Acc inv_eps) {
  std::vector<Acc> out(static_cast<size_t>(count));
  const Acc* hp = static_cast<const Acc*>(h);
  const Acc* wp = static_cast<const Acc*>(log_w);
  for (int64_t j = 0; j < count; ++j) out[j] = scaled_potential_entry<Acc>(hp[j], wp[j], inv_eps);
  return out;
}

// The log-sum-exp of one chunk, v[t] = hb[t] - cost[t] / eps: a max pass (NaN ignored) and an exp pass
// shifted by LogSumExp::block_shift, which carries any NaN v into the sum (no chunk is skipped,
// whatever its maximum). Exact = true applies the rule of ot_math.h (pair_exponent); false takes the
// plain difference, which is the same wherever it is not NaN.
template <class Acc, bool Exact>
FL_CPU_INLINE void chunk_lse(const Acc* hb, const Acc* cost, int64_t count, Acc inv_eps, Acc& chunk_max, Acc& sum) {
  Acc v[kChunk];
  Acc max = kNegInf<Acc>;
#pragma omp simd reduction(max : max)
  for (int64_t t = 0; t < count; ++t) {
    v[t] = Exact ? pair_exponent<Acc>(hb[t], cost[t] * inv_eps) : hb[t] - cost[t] * inv_eps;
    max = v[t] > max ? v[t] : max;
  }
  const Acc shift = LogSumExp<Acc>::block_shift(max);
  Acc total = 0;
#pragma omp simd reduction(+ : total)
  for (int64_t t = 0; t < count; ++t) total += fast_exp(v[t] - shift);
  chunk_max = max;
  sum = total;
}

// Adds one chunk to a running log-sum-exp. The plain pass costs nothing over the finite case; its sum is
// NaN exactly when some v is NaN: a NaN input, or inf - inf (a +inf cost against a +inf potential). Only
// such a chunk (rare) is redone with the exact rule, which keeps a NaN input and skips the inf - inf.
template <class Acc>
FL_CPU_MULTIVERSION void add_chunk(LogSumExp<Acc>& acc, const Acc* hb, const Acc* cost, int64_t count, Acc inv_eps) {
  Acc chunk_max, sum;
  chunk_lse<Acc, false>(hb, cost, count, inv_eps, chunk_max, sum);
  if (sum != sum) chunk_lse<Acc, true>(hb, cost, count, inv_eps, chunk_max, sum);
  acc.merge(chunk_max, sum);
}

// One tile of destination rows against every source: the cost chunks (dot products for points)
// and the log-sum-exps. Multiversioned as a whole, so the cost micro-kernel inlined here gets AVX2/FMA.
template <class T, class Acc>
FL_CPU_MULTIVERSION void softmin_row_tile(const SideView<T, Acc>& side, int64_t b, int64_t row0, int rows,
                                          const Acc* hb, Acc inv_eps, LogSumExp<Acc>* acc) {
  Acc cost[kRowTile][kChunk];
  for (int r = 0; r < rows; ++r) acc[r] = LogSumExp<Acc>::empty();
  for (int64_t j0 = 0; j0 < side.len_src; j0 += kChunk) {
    const int64_t count = std::min(kChunk, side.len_src - j0);
    side.fill_costs(b, row0, rows, j0, count, cost);
    for (int r = 0; r < rows; ++r) add_chunk<Acc>(acc[r], hb + j0, cost[r], count, inv_eps);
  }
}

template <class Acc>
void write_softmin(const SoftminArgs& a, int64_t index, Acc lse, Acc eps) {
  Acc* out = static_cast<Acc*>(a.out);
  const Acc value = static_cast<Acc>(a.damping) * (-eps * lse);
  if (a.row_err != nullptr) {
    const Acc old = static_cast<const Acc*>(a.old)[index];
    const Acc log_w = static_cast<const Acc*>(a.log_w_dst)[index];
    static_cast<Acc*>(a.row_err)[index] = row_error<Acc>(log_w, old, value, Acc(1) / eps);
  }
  out[index] = value;
}

// Softmin over the columns of a cost matrix (one value per column j): row-major blocks of
// kColRows rows x kChunk columns, a max pass and an exp pass per block.
constexpr int64_t kColRows = 64;

// The terms are those of add_chunk (the plain difference, a NaN-ignoring max, the exp pass shifted by
// block_shift), per column; a column whose block sum is NaN (rare) is redone with the exact rule.
// Zero-mass rows are not skipped as a whole: their terms are -inf, or NaN for a NaN cost, which must
// reach the column's value.
template <class T, class Acc>
FL_CPU_MULTIVERSION void column_block_lse(const T* c, int64_t n, int64_t m, int64_t j0, int64_t width, const Acc* hb,
                                          Acc inv_eps, LogSumExp<Acc>* acc) {
  Acc block_max[kChunk];
  Acc block_sum[kChunk];
  Acc shift[kChunk];
  for (int64_t i0 = 0; i0 < n; i0 += kColRows) {
    const int64_t i1 = std::min(n, i0 + kColRows);
    for (int64_t t = 0; t < width; ++t) block_max[t] = kNegInf<Acc>;
    for (int64_t i = i0; i < i1; ++i) {
      const Acc hbi = hb[i];
      const T* row = c + i * m + j0;
#pragma omp simd
      for (int64_t t = 0; t < width; ++t) {
        const Acc v = hbi - to_acc(row[t]) * inv_eps;
        block_max[t] = v > block_max[t] ? v : block_max[t];
      }
    }
    for (int64_t t = 0; t < width; ++t) {
      shift[t] = LogSumExp<Acc>::block_shift(block_max[t]);
      block_sum[t] = 0;
    }
    for (int64_t i = i0; i < i1; ++i) {
      const Acc hbi = hb[i];
      const T* row = c + i * m + j0;
#pragma omp simd
      for (int64_t t = 0; t < width; ++t) block_sum[t] += fast_exp(hbi - to_acc(row[t]) * inv_eps - shift[t]);
    }
    for (int64_t t = 0; t < width; ++t) {
      if (block_sum[t] != block_sum[t]) {  // a NaN input or inf - inf in this column's block: the exact rule
        LogSumExp<Acc> exact = LogSumExp<Acc>::empty();
        for (int64_t i = i0; i < i1; ++i) exact.add(pair_exponent<Acc>(hb[i], to_acc(c[i * m + j0 + t]) * inv_eps));
        block_max[t] = exact.max;
        block_sum[t] = exact.sum;
      }
      acc[t].merge(block_max[t], block_sum[t]);
    }
  }
}

template <class T, class Acc>
void softmin_impl(const SoftminArgs& a) {
  const Geometry& g = a.geom;
  if (g.batch == 0 || g.n == 0 || g.m == 0) return;
  const Acc eps = static_cast<Acc>(a.eps), inv_eps = Acc(1) / eps;
  const SideView<T, Acc> side(g, a.transpose);
  const int64_t len_dst = side.len_dst, len_src = side.len_src;
  const std::vector<Acc> hb = scaled_potential<Acc>(a.h, a.log_w, g.batch * len_src, inv_eps);

  if (g.p == 0 && a.transpose) {
    const int64_t blocks = (len_dst + kChunk - 1) / kChunk;
    parallel_for(g.batch * blocks, 1, [&](int64_t begin, int64_t end) {
      LogSumExp<Acc> acc[kChunk];
      for (int64_t item = begin; item < end; ++item) {
        const int64_t b = item / blocks, j0 = (item % blocks) * kChunk;
        if (skipped(a.done_at, b, a.iteration)) continue;
        const int64_t width = std::min(kChunk, len_dst - j0);
        for (int64_t t = 0; t < width; ++t) acc[t] = LogSumExp<Acc>::empty();
        column_block_lse<T, Acc>(cpu::cost_matrix<T>(g, b), g.n, g.m, j0, width, hb.data() + b * len_src, inv_eps, acc);
        for (int64_t t = 0; t < width; ++t) write_softmin<Acc>(a, b * len_dst + j0 + t, acc[t].value(), eps);
      }
    });
    return;
  }

  const int64_t tiles = (len_dst + kRowTile - 1) / kRowTile;
  const int64_t grain = std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(1, len_src * kRowTile * (g.dim + 1)));
  parallel_for(g.batch * tiles, grain, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / tiles, row0 = (item % tiles) * kRowTile;
      if (skipped(a.done_at, b, a.iteration)) continue;
      const int rows = static_cast<int>(std::min<int64_t>(kRowTile, len_dst - row0));
      LogSumExp<Acc> acc[kRowTile];
      softmin_row_tile<T, Acc>(side, b, row0, rows, hb.data() + b * len_src, inv_eps, acc);
      for (int r = 0; r < rows; ++r) write_softmin<Acc>(a, b * len_dst + row0 + r, acc[r].value(), eps);
    }
  });
}

// ---- transport statistics -------------------------------------------------------------------

// Per-row plan statistics for one tile of destination rows: mass, cost, the gradient weight sum and
// sum_j W_ij y_j (points). Multiversioned for the same reason as softmin_row_tile.
template <class T, class Acc>
FL_CPU_MULTIVERSION void transport_row_tile(const SideView<T, Acc>& side, int64_t b, int64_t row0, int rows,
                                            const Acc* fa, const Acc* gb, const Acc* src_weight, Acc inv_eps,
                                            bool with_grad, Acc* mass, Acc* total_cost, Acc* grad_weight,
                                            Acc* weighted_src) {
  const int64_t d = side.g.dim;
  const int p = side.g.p;
  Acc cost[kRowTile][kChunk];
  Acc weight[kChunk];
  for (int r = 0; r < rows; ++r) {
    mass[r] = total_cost[r] = grad_weight[r] = 0;
    if (with_grad) std::fill(weighted_src + r * d, weighted_src + (r + 1) * d, Acc(0));
  }
  for (int64_t j0 = 0; j0 < side.len_src; j0 += kChunk) {
    const int64_t count = std::min(kChunk, side.len_src - j0);
    side.fill_costs(b, row0, rows, j0, count, cost);
    for (int r = 0; r < rows; ++r) {
      // A zero-mass row is not skipped as a whole: its terms are 0 (plan_exponent), or NaN for NaN input.
      const Acc fi = fa[row0 + r];
      Acc chunk_mass = 0, chunk_cost = 0, chunk_gw = 0;
#pragma omp simd reduction(+ : chunk_mass, chunk_cost, chunk_gw)
      for (int64_t t = 0; t < count; ++t) {
        const Acc plan = fast_exp(plan_exponent<Acc>(fi, gb[j0 + t], cost[r][t] * inv_eps)) *
                         (src_weight ? src_weight[j0 + t] : Acc(1));
        chunk_mass += plan;
        chunk_cost += plan != Acc(0) ? plan * cost[r][t] : Acc(0);  // an infinite cost carries no mass
        weight[t] = p == 0 ? Acc(0) : plan * cost_gradient_weight<Acc>(p, cost[r][t]);
        chunk_gw += weight[t];
      }
      mass[r] += chunk_mass;
      total_cost[r] += chunk_cost;
      grad_weight[r] += chunk_gw;
      if (!with_grad) continue;
      const Acc* src = side.src_points(b) + j0 * d;
      Acc* out = weighted_src + r * d;
      for (int64_t t = 0; t < count; ++t) {
        const Acc w = weight[t];
        if (w == Acc(0)) continue;
#pragma omp simd
        for (int64_t k = 0; k < d; ++k) out[k] += w * src[t * d + k];
      }
    }
  }
}

template <class T, class Acc>
void transport_impl(const TransportArgs& a) {
  const Geometry& g = a.geom;
  if (g.batch == 0 || g.n == 0 || g.m == 0) return;
  const Acc inv_eps = Acc(1) / static_cast<Acc>(a.eps);
  const SideView<T, Acc> side(g, a.transpose);
  const int64_t len_dst = side.len_dst, len_src = side.len_src, d = g.dim;
  // Destination side: (f, log_a); source side: (g, log_b); swapped for the columns.
  const std::vector<Acc> fa = scaled_potential<Acc>(a.transpose ? a.g : a.f, a.transpose ? a.log_b : a.log_a,
                                                    g.batch * len_dst, inv_eps);
  const std::vector<Acc> gb = scaled_potential<Acc>(a.transpose ? a.f : a.g, a.transpose ? a.log_a : a.log_b,
                                                    g.batch * len_src, inv_eps);
  Acc* mass_out = static_cast<Acc*>(a.mass);
  Acc* cost_out = static_cast<Acc*>(a.cost);
  Acc* grad_out = static_cast<Acc*>(a.grad);
  const bool with_grad = grad_out != nullptr;
  const Acc* src_weight = static_cast<const Acc*>(a.src_weight);
  const int64_t tiles = (len_dst + kRowTile - 1) / kRowTile;
  const int64_t grain = std::max<int64_t>(1, (1 << 14) / std::max<int64_t>(1, len_src * kRowTile * (d + 1)));
  parallel_for(g.batch * tiles, grain, [&](int64_t begin, int64_t end) {
    Acc mass[kRowTile], total[kRowTile], grad_weight[kRowTile];
    std::vector<Acc> weighted(static_cast<size_t>(kRowTile * std::max<int64_t>(d, 1)));
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / tiles, row0 = (item % tiles) * kRowTile;
      const int rows = static_cast<int>(std::min<int64_t>(kRowTile, len_dst - row0));
      transport_row_tile<T, Acc>(side, b, row0, rows, fa.data() + b * len_dst, gb.data() + b * len_src,
                                 src_weight ? src_weight + b * len_src : nullptr, inv_eps, with_grad, mass, total,
                                 grad_weight, weighted.data());
      for (int r = 0; r < rows; ++r) {
        const int64_t index = b * len_dst + row0 + r;
        if (mass_out) mass_out[index] = mass[r];
        if (cost_out) cost_out[index] = total[r];
        if (!with_grad) continue;
        // grad_i = sum_j W_ij (x_i - y_j) = x_i sum_j W_ij - sum_j W_ij y_j
        const Acc* xi = side.dst_points(b) + (row0 + r) * d;
        for (int64_t k = 0; k < d; ++k) grad_out[index * d + k] = grad_weight[r] * xi[k] - weighted[r * d + k];
      }
    }
  });
}

template <class T, class Acc>
FL_CPU_MULTIVERSION void plan_row_tile(const SideView<T, Acc>& side, int64_t b, int64_t row0, int rows, const Acc* fa,
                                       const Acc* gb, Acc inv_eps, Acc* plan) {
  Acc cost[kRowTile][kChunk];
  const int64_t m = side.len_src;
  for (int64_t j0 = 0; j0 < m; j0 += kChunk) {
    const int64_t count = std::min(kChunk, m - j0);
    side.fill_costs(b, row0, rows, j0, count, cost);
    for (int r = 0; r < rows; ++r) {
      const Acc fi = fa[row0 + r];
      Acc* row = plan + (row0 + r) * m + j0;
#pragma omp simd
      for (int64_t t = 0; t < count; ++t) row[t] = fast_exp(plan_exponent<Acc>(fi, gb[j0 + t], cost[r][t] * inv_eps));
    }
  }
}

template <class T, class Acc>
void plan_impl(const PlanArgs& a) {
  const Geometry& g = a.geom;
  if (g.batch == 0 || g.n == 0 || g.m == 0) return;
  const Acc inv_eps = Acc(1) / static_cast<Acc>(a.eps);
  const SideView<T, Acc> side(g, false);
  const std::vector<Acc> fa = scaled_potential<Acc>(a.f, a.log_a, g.batch * g.n, inv_eps);
  const std::vector<Acc> gb = scaled_potential<Acc>(a.g, a.log_b, g.batch * g.m, inv_eps);
  Acc* plan = static_cast<Acc*>(a.plan);
  const int64_t tiles = (g.n + kRowTile - 1) / kRowTile;
  const int64_t grain = std::max<int64_t>(1, (1 << 14) / std::max<int64_t>(1, g.m * kRowTile * (g.dim + 1)));
  parallel_for(g.batch * tiles, grain, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / tiles, row0 = (item % tiles) * kRowTile;
      const int rows = static_cast<int>(std::min<int64_t>(kRowTile, g.n - row0));
      plan_row_tile<T, Acc>(side, b, row0, rows, fa.data() + b * g.n, gb.data() + b * g.m, inv_eps,
                            plan + b * g.n * g.m);
    }
  });
}

// ---- the solver -----------------------------------------------------------------------------

template <class T, class Acc>
struct CpuBackend {
  const SolveArgs& a;
  SolveWorkspace w;

  CpuBackend(const SolveArgs& args) : a(args), w(carve_workspace(args.geom, args.workspace)) {
    std::fill(w.done_at, w.done_at + a.geom.batch, -1);
  }

  void update_rows(double eps, double damping, bool with_error, int32_t iteration) {
    softmin_impl<T, Acc>(half_step(a, w, false, eps, damping, iteration, with_error));
  }
  void update_cols(double eps, double damping, int32_t iteration) {
    softmin_impl<T, Acc>(half_step(a, w, true, eps, damping, iteration, false));
  }

  Acc problem_error(int64_t b) const {
    const Acc* err = static_cast<const Acc*>(w.row_err) + b * a.geom.n;
    Acc sum = 0;
    for (int64_t i = 0; i < a.geom.n; ++i) sum += err[i];
    return sum;
  }

  void mark_converged(int32_t iteration) {
    for (int64_t b = 0; b < a.geom.batch; ++b) {
      // NaN errors never count as converged.
      if (w.done_at[b] < 0 && problem_error(b) <= static_cast<Acc>(a.tol)) w.done_at[b] = iteration;
    }
  }
  bool all_converged() const {
    for (int64_t b = 0; b < a.geom.batch; ++b)
      if (w.done_at[b] < 0) return false;
    return true;
  }

  void finish(int32_t iterations) {
    for (int64_t b = 0; b < a.geom.batch; ++b) a.n_iter[b] = w.done_at[b] >= 0 ? w.done_at[b] + 1 : iterations;
    // The reported error is measured on the final state (at the target eps), not at the last check.
    softmin_impl<T, Acc>(final_error_step(a, w));
    Acc* error = static_cast<Acc*>(a.error);
    for (int64_t b = 0; b < a.geom.batch; ++b) error[b] = problem_error(b);
  }
};

template <class T, class Acc>
void solve_impl(const SolveArgs& a) {
  const Geometry& g = a.geom;
  if (g.batch == 0) return;
  if (g.n == 0 || g.m == 0) {
    std::fill(a.n_iter, a.n_iter + g.batch, 0);
    std::fill(static_cast<Acc*>(a.error), static_cast<Acc*>(a.error) + g.batch, Acc(0));
    return;
  }
  CpuBackend<T, Acc> backend(a);
  run_sinkhorn(backend, a);
}

template <template <class, class> class Fn, class Args>
void dispatch(const Args& a) {
  switch (a.geom.dtype) {
    case DType::Float32: Fn<float, float>::run(a); break;
    case DType::Float64: Fn<double, double>::run(a); break;
    case DType::Float16: Fn<Half, float>::run(a); break;
    case DType::BFloat16: Fn<BFloat16, float>::run(a); break;
  }
}

template <class T, class Acc>
struct SoftminFn {
  static void run(const SoftminArgs& a) { softmin_impl<T, Acc>(a); }
};
template <class T, class Acc>
struct SolveFn {
  static void run(const SolveArgs& a) { solve_impl<T, Acc>(a); }
};
template <class T, class Acc>
struct TransportFn {
  static void run(const TransportArgs& a) { transport_impl<T, Acc>(a); }
};
template <class T, class Acc>
struct PlanFn {
  static void run(const PlanArgs& a) { plan_impl<T, Acc>(a); }
};

}  // namespace

void softmin_cpu(const SoftminArgs& a) {
  validate_softmin(a);
  dispatch<SoftminFn>(a);
}
void solve_cpu(const SolveArgs& a) {
  validate_solve(a);
  dispatch<SolveFn>(a);
}
void transport_cpu(const TransportArgs& a) {
  validate_transport(a);
  dispatch<TransportFn>(a);
}
void plan_cpu(const PlanArgs& a) {
  validate_plan(a);
  dispatch<PlanFn>(a);
}

}  // namespace fl::ot
