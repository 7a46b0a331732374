// CPU kernels of the metric family: blocks of 16 query rows, each with its full rows of S in a
// per-thread buffer (16 x m), never the n x m matrix. The losses' row math is pair_losses.h's.
//
// forward:  S rows (one tile product), pair classes from the labels, the row's loss terms, counts
//           and statistics; for symmetric InfoNCE also per-thread column log-sum-exps, merged in a
//           fixed order (the column losses come from the same rows of S).
// backward: S rows again, the rows of W = dL/dS from the saved statistics, dX rows = W Y, and
//           dY += W^T X into a per-thread buffer, summed in a fixed order at the end: no atomics,
//           the same result at every run with a given thread count.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "common/cpu_multiversion.h"
#include "common/cpu_tile_gemm.h"
#include "common/error.h"
#include "common/fast_exp.h"
#include "common/parallel.h"
#include "common/thread_pool.h"
#include "metric/metric_kernels.h"
#include "metric/metric_pass.h"
#include "metric/pair_losses.h"

namespace fl::metric {
namespace {

constexpr int64_t kBlockRows = 16;

bool uses_labels(LossKind kind) {
  return kind != LossKind::InfoNCE && kind != LossKind::AUC && kind != LossKind::DecoupledSoftmax;
}
bool uses_distance(const PairProblem& p) {
  return (p.kind == LossKind::Contrastive && p.option == 0) || p.kind == LossKind::Triplet;
}

template <class Acc>
struct Inputs {
  const PairProblem& p;
  const Acc* x;
  const Acc* y;
  std::vector<Acc> yt;  // y transposed (dim x m): the B operand of S = X Y^T
  std::vector<Acc> x_sqnorm, y_sqnorm;

  explicit Inputs(const PairProblem& prob)
      : p(prob), x(static_cast<const Acc*>(prob.x)), y(static_cast<const Acc*>(prob.y)) {
    yt.resize(static_cast<size_t>(p.dim * p.m));
    tile_transpose(p.m, p.dim, y, p.dim, yt.data(), p.m);
    if (uses_distance(p)) {
      x_sqnorm.resize(static_cast<size_t>(p.n));
      y_sqnorm.resize(static_cast<size_t>(p.m));
      for (int64_t i = 0; i < p.n; ++i) x_sqnorm[i] = squared_norm(x + i * p.dim);
      for (int64_t j = 0; j < p.m; ++j) y_sqnorm[j] = squared_norm(y + j * p.dim);
    }
  }
  Acc squared_norm(const Acc* v) const {
    Acc sum = 0;
    for (int64_t t = 0; t < p.dim; ++t) sum += v[t] * v[t];
    return sum;
  }
  int64_t target(int64_t i) const { return p.targets != nullptr ? p.targets[i] : i; }

  // The pair classes of row i.
  void classify(int64_t i, uint8_t* cls) const {
    const int64_t self = p.self_offset >= 0 ? i + p.self_offset : -1;
    if (uses_labels(p.kind)) {
      const int64_t label = p.labels_x[i];
      for (int64_t j = 0; j < p.m; ++j) cls[j] = p.labels_y[j] == label ? kPositive : kNegative;
    } else if (p.kind == LossKind::DecoupledSoftmax) {
      std::fill(cls, cls + p.m, static_cast<uint8_t>(kNegative));
      for (int64_t k = p.pos_ptr[i]; k < p.pos_ptr[i + 1]; ++k) cls[p.pos_idx[k]] = kPositive;
    } else {
      std::fill(cls, cls + p.m, static_cast<uint8_t>(kNegative));
      cls[target(i)] = kPositive;
    }
    if (self >= 0 && self < p.m) cls[self] = kExcluded;
  }
};

// Scratch of one thread.
template <class Acc>
struct Scratch {
  std::vector<Acc> s, w, wt, dist;
  std::vector<uint8_t> cls;
  TripletScratch<Acc> triplet;
  explicit Scratch(int64_t m)
      : s(static_cast<size_t>(kBlockRows * m)),
        w(static_cast<size_t>(kBlockRows * m)),
        wt(static_cast<size_t>(kBlockRows * m)),
        dist(static_cast<size_t>(m)),
        cls(static_cast<size_t>(m)) {}
};

// S rows [i0, i0 + rows) into sc.s (rows x m).
template <class Acc>
FL_CPU_MULTIVERSION void similarity_rows(const Inputs<Acc>& in, int64_t i0, int64_t rows, Scratch<Acc>& sc) {
  tile_gemm(rows, in.p.m, in.p.dim, in.x + i0 * in.p.dim, in.p.dim, in.yt.data(), in.p.m, sc.s.data(), in.p.m, false);
}

// Row i of the block as the losses see it (classes and, for euclidean losses, distances).
template <class Acc>
FL_CPU_MULTIVERSION Row<Acc> make_row(const Inputs<Acc>& in, int64_t i, const Acc* s, Scratch<Acc>& sc) {
  in.classify(i, sc.cls.data());
  Row<Acc> row{s, sc.cls.data(), in.p.m, in.p.kind == LossKind::InfoNCE || in.p.kind == LossKind::AUC ? in.target(i) : 0,
               nullptr};
  if (uses_distance(in.p)) {
    const Acc* xi = in.x + i * in.p.dim;
    for (int64_t j = 0; j < in.p.m; ++j) {
      const Acc* yj = in.y + j * in.p.dim;
      sc.dist[j] = pair_distance(in.x_sqnorm[i], in.y_sqnorm[j], s[j], [&] {
        Acc sum = 0;
#pragma omp simd reduction(+ : sum)
        for (int64_t t = 0; t < in.p.dim; ++t) sum += (xi[t] - yj[t]) * (xi[t] - yj[t]);
        return sum;
      });
    }
    row.dist = sc.dist.data();
  }
  return row;
}

// Multiversioned: the loss functions inlined here (FL_CPU_INLINE) get AVX2 + FMA.
template <class Acc>
FL_CPU_MULTIVERSION RowResult<Acc> forward_row(const PairProblem& p, const Row<Acc>& row, Scratch<Acc>& sc) {
  const Acc p0 = static_cast<Acc>(p.p0), p1 = static_cast<Acc>(p.p1);
  switch (p.kind) {
    case LossKind::InfoNCE: return info_nce_forward(row, p0);
    case LossKind::NTXent: return positives_vs_negatives_forward(row, Acc(1) / p0, false);
    case LossKind::SupCon: return supcon_forward(row, Acc(1) / p0);
    case LossKind::MultiSimilarity:
      return multi_similarity_forward(row, MsParams<Acc>{p0, p1, static_cast<Acc>(p.p2), static_cast<Acc>(p.p3), p.option != 0});
    case LossKind::Circle: return circle_forward(row, CircleParams<Acc>(p0, p1));
    case LossKind::Contrastive: return contrastive_forward(row, p0, p1, p.option != 0);
    case LossKind::Triplet:
      return triplet_forward(row, TripletParams<Acc>{p0, p1, static_cast<TripletMining>(p.option)}, sc.triplet);
    case LossKind::AUC: return auc_forward(row, Acc(1) / p0);
    case LossKind::DecoupledSoftmax: return positives_vs_negatives_forward(row, Acc(1) / p0, true);
  }
  return RowResult<Acc>{};
}

template <class Acc>
FL_CPU_MULTIVERSION void backward_row(const PairProblem& p, const Row<Acc>& row, const Acc* stats, const Acc* grad,
                                      Scratch<Acc>& sc, Acc* w) {
  const Acc p0 = static_cast<Acc>(p.p0), p1 = static_cast<Acc>(p.p1);
  const Acc g = grad[0];
  switch (p.kind) {
    case LossKind::InfoNCE: info_nce_backward(row, stats, g, p0, w); return;
    case LossKind::NTXent: positives_vs_negatives_backward(row, stats, g, Acc(1) / p0, w); return;
    case LossKind::SupCon: supcon_backward(row, stats, g, Acc(1) / p0, w); return;
    case LossKind::MultiSimilarity:
      multi_similarity_backward(row, stats, g,
                                MsParams<Acc>{p0, p1, static_cast<Acc>(p.p2), static_cast<Acc>(p.p3), p.option != 0}, w);
      return;
    case LossKind::Circle: circle_backward(row, stats, g, CircleParams<Acc>(p0, p1), w); return;
    case LossKind::Contrastive: contrastive_backward(row, grad, p0, p1, p.option != 0, w); return;
    case LossKind::Triplet:
      triplet_backward(row, g, TripletParams<Acc>{p0, p1, static_cast<TripletMining>(p.option)}, sc.triplet, w);
      return;
    case LossKind::AUC: auc_backward(row, stats, g, Acc(1) / p0, w); return;
    case LossKind::DecoupledSoftmax: positives_vs_negatives_backward(row, stats, g, Acc(1) / p0, w); return;
  }
}

// A running log-sum-exp per column (symmetric InfoNCE).
template <class Acc>
struct ColumnLse {
  std::vector<Acc> max, sum;
  explicit ColumnLse(int64_t m) : max(static_cast<size_t>(m), kNegInf<Acc>), sum(static_cast<size_t>(m), Acc(0)) {}
  // Adds one row's logits scale * s_j to every column (two exponentials a column, vectorized; an
  // empty column's -inf maximum gives e^-inf = 0).
  FL_CPU_INLINE void add_row(const Acc* s, Acc scale) {
    Acc* mx = max.data();
    Acc* sm = sum.data();
    const int64_t m = static_cast<int64_t>(max.size());
#pragma omp simd
    for (int64_t j = 0; j < m; ++j) {
      const Acc v = scale * s[j];
      const Acc top = v > mx[j] ? v : mx[j];
      sm[j] = sm[j] * fast_exp(mx[j] - top) + fast_exp(v - top);
      mx[j] = top;
    }
  }
  void merge(const ColumnLse& other) {
    for (size_t j = 0; j < max.size(); ++j) {
      if (other.sum[j] == 0) continue;
      if (sum[j] == 0) {
        max[j] = other.max[j];
        sum[j] = other.sum[j];
      } else if (other.max[j] <= max[j]) {
        sum[j] += other.sum[j] * std::exp(other.max[j] - max[j]);
      } else {
        sum[j] = sum[j] * std::exp(max[j] - other.max[j]) + other.sum[j];
        max[j] = other.max[j];
      }
    }
  }
  Acc value(int64_t j) const { return sum[j] == 0 ? kNegInf<Acc> : max[j] + std::log(sum[j]); }
};

// How many contiguous pieces of row blocks a pass uses: at most one per thread, and, when each piece
// keeps its own dY (m x dim), no more than fit in kGradYBudget (the pieces beyond it would only
// trade memory for speed). Read once per pass: the thread limit may change meanwhile.
constexpr int64_t kGradYBudgetBytes = int64_t(256) << 20;

int pass_pieces(const PairProblem& p, bool gradient) {
  const int64_t blocks = (p.n + kBlockRows - 1) / kBlockRows;
  int64_t pieces = std::min<int64_t>(blocks, cpu_thread_count());
  if (gradient) {
    const int64_t per_piece = std::max<int64_t>(1, p.m * p.dim * static_cast<int64_t>(dtype_size(p.dtype)));
    pieces = std::min<int64_t>(pieces, std::max<int64_t>(1, kGradYBudgetBytes / per_piece));
  }
  return static_cast<int>(std::max<int64_t>(1, pieces));
}

// Runs body(piece, first row, end row) over `pieces` contiguous pieces of row blocks; the piece
// index selects the per-piece buffers, so the merge order is fixed.
template <class Body>
void run_row_pieces(int64_t n, int pieces, Body&& body) {
  const int64_t blocks = (n + kBlockRows - 1) / kBlockRows;
  if (pieces == 1) {
    body(0, int64_t(0), n);
  } else {
    run_pieces(pieces, [&](int piece) {
      const int64_t b0 = blocks * piece / pieces, b1 = blocks * (piece + 1) / pieces;
      body(piece, b0 * kBlockRows, std::min(n, b1 * kBlockRows));
    });
  }
}

template <class Acc>
FL_CPU_MULTIVERSION void add_column_row(ColumnLse<Acc>& columns, const Acc* s, Acc scale) {
  columns.add_row(s, scale);
}

// The symmetric loss's column part of row i of W: gc_j scale (softmax over the column - [i = j]),
// and the row's share of dL/dscale = sum_j W_ij s_ij / scale (InfoNCE).
template <class Acc>
FL_CPU_MULTIVERSION void add_column_grads(const PairProblem& p, int64_t i, const Acc* s, const Acc* grad_col,
                                          const Acc* col_stats, Acc scale, Acc* w, Acc& scale_sum) {
  const int64_t m = p.m;
  if (p.symmetric) {
#pragma omp simd
    for (int64_t j = 0; j < m; ++j) w[j] += info_nce_weight(s[j], j == i, col_stats[j], grad_col[j], scale);
  }
  if (p.kind == LossKind::InfoNCE) {
    Acc sum = 0;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < m; ++j) sum += w[j] * s[j];
    scale_sum += sum / scale;
  }
}

// dX rows = W Y and dY += W^T X for the block's rows.
template <class Acc>
FL_CPU_MULTIVERSION void gradient_products(const Inputs<Acc>& in, int64_t i0, int64_t rows, Scratch<Acc>& sc,
                                           Acc* grad_x, Acc* grad_y_part) {
  const int64_t m = in.p.m, dim = in.p.dim;
  tile_gemm(rows, dim, m, sc.w.data(), m, in.y, dim, grad_x + i0 * dim, dim, false);
  tile_transpose(rows, m, sc.w.data(), m, sc.wt.data(), kBlockRows);
  tile_gemm(m, dim, rows, sc.wt.data(), kBlockRows, in.x + i0 * dim, dim, grad_y_part, dim, true);
}

template <class Acc>
void run_pass(const PairProblem& p, const Pass<Acc>& pass) {
  const Inputs<Acc> in(p);
  const bool forward = pass.terms != nullptr, gradient = pass.grad_x != nullptr;
  const bool columns = forward && p.symmetric;
  const Acc scale = static_cast<Acc>(p.p0);
  const int pieces = pass_pieces(p, gradient);
  std::vector<ColumnLse<Acc>> column_parts;
  if (columns) column_parts.assign(static_cast<size_t>(pieces), ColumnLse<Acc>(p.m));
  std::vector<std::vector<Acc>> grad_y_parts(static_cast<size_t>(pieces));
  std::vector<Acc> scale_parts(static_cast<size_t>(pieces), Acc(0));
  const Acc unit[kRowTerms] = {Acc(1), Acc(0)};
  run_row_pieces(p.n, pieces, [&](int piece, int64_t r0, int64_t r1) {
    Scratch<Acc> sc(p.m);
    if (gradient) grad_y_parts[piece].assign(static_cast<size_t>(p.m * p.dim), Acc(0));
    for (int64_t i0 = r0; i0 < r1; i0 += kBlockRows) {
      const int64_t rows = std::min(kBlockRows, r1 - i0);
      similarity_rows(in, i0, rows, sc);
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t i = i0 + r;
        const Acc* s = sc.s.data() + r * p.m;
        const Row<Acc> row = make_row(in, i, s, sc);
        RowResult<Acc> res;
        if (forward) {
          res = forward_row(p, row, sc);
          std::copy(res.terms, res.terms + kRowTerms, pass.terms + i * kRowTerms);
          std::copy(res.counts, res.counts + kRowTerms, pass.counts + i * kRowTerms);
          std::copy(res.stats, res.stats + kRowStats, pass.stats + i * kRowStats);
          if (columns) add_column_row(column_parts[piece], s, scale);
        }
        if (!gradient) continue;
        Acc* w = sc.w.data() + r * p.m;
        if (pass.unit_grad) {
          backward_row(p, row, res.stats, unit, sc, w);
          Acc unused_col = 0;
          add_column_grads(p, i, s, &unused_col, &unused_col, scale, w, scale_parts[piece]);  // (not symmetric)
          pass.row_active[i] = std::any_of(w, w + p.m, [](Acc v) { return v != 0; }) ? Acc(1) : Acc(0);
        } else {
          backward_row(p, row, pass.saved_stats + i * kRowStats, pass.grad_row + i * kRowTerms, sc, w);
          add_column_grads(p, i, s, pass.grad_col, pass.col_stats, scale, w, scale_parts[piece]);
        }
      }
      if (gradient) gradient_products(in, i0, rows, sc, pass.grad_x, grad_y_parts[piece].data());
    }
  });
  if (gradient) {
    std::copy(grad_y_parts[0].begin(), grad_y_parts[0].end(), pass.grad_y);
    for (int k = 1; k < pieces; ++k)
      for (size_t e = 0; e < grad_y_parts[k].size(); ++e) pass.grad_y[e] += grad_y_parts[k][e];
    Acc total_scale = 0;
    for (int k = 0; k < pieces; ++k) total_scale += scale_parts[k];
    *pass.grad_scale = total_scale;
  }
  if (!columns) return;
  for (int k = 1; k < pieces; ++k) column_parts[0].merge(column_parts[k]);
  for (int64_t j = 0; j < p.m; ++j) {  // symmetric InfoNCE is square with the diagonal as positives
    Acc diagonal = 0;
    for (int64_t t = 0; t < p.dim; ++t) diagonal += in.x[j * p.dim + t] * in.y[j * p.dim + t];
    pass.col_stats_out[j] = column_parts[0].value(j);
    pass.col_terms[j] = pass.col_stats_out[j] - scale * diagonal;
  }
}

void require_cpu_problem(const PairProblem& p) {
  validate(p);
  FL_CHECK_ARG(p.dtype == DType::Float32 || p.dtype == DType::Float64, p.op_name,
               ": the CPU kernels take float32 or float64 (16-bit inputs are computed in float32), got ",
               dtype_name(p.dtype));
  // Host memory: indices are checked before any row uses them.
  for (int64_t i = 0; p.targets != nullptr && i < p.n; ++i)
    FL_CHECK_ARG(p.targets[i] >= 0 && p.targets[i] < p.m, p.op_name, ": target ", p.targets[i], " of row ", i,
                 " is outside [0, ", p.m, ")");
  if (p.pos_ptr != nullptr) {
    FL_CHECK_ARG(p.pos_ptr[0] == 0, p.op_name, ": the positive lists must start at 0");
    for (int64_t i = 0; i < p.n; ++i) {
      FL_CHECK_ARG(p.pos_ptr[i] <= p.pos_ptr[i + 1], p.op_name, ": the positive lists must not decrease");
      for (int64_t k = p.pos_ptr[i]; k < p.pos_ptr[i + 1]; ++k)
        FL_CHECK_ARG(p.pos_idx[k] >= 0 && p.pos_idx[k] < p.m, p.op_name, ": positive ", p.pos_idx[k], " of row ", i,
                     " is outside [0, ", p.m, ")");
    }
  }
}

}  // namespace

void forward_cpu(const PairProblem& p, const ForwardOut& out) {
  require_cpu_problem(p);
  FL_CHECK_ARG(out.unit_grad_x == nullptr || (!p.symmetric && p.kind != LossKind::Contrastive), p.op_name,
               ": the fused gradient is for single-term row losses (not symmetric InfoNCE or contrastive)");
  if (p.n == 0) {  // no rows: nothing reaches y or the scale
    const size_t elem = dtype_size(p.dtype);
    if (out.unit_grad_y != nullptr && p.m * p.dim > 0)
      std::memset(out.unit_grad_y, 0, static_cast<size_t>(p.m * p.dim) * elem);
    if (out.unit_grad_scale != nullptr) std::memset(out.unit_grad_scale, 0, elem);
    return;
  }
  if (p.dtype == DType::Float64) run_pass(p, forward_pass<double>(out)); else run_pass(p, forward_pass<float>(out));
}

void backward_cpu(const PairProblem& p, const BackwardArgs& a) {
  require_cpu_problem(p);
  const size_t elem = dtype_size(p.dtype);
  if (p.n == 0) {  // no rows: nothing reaches y
    if (p.m * p.dim > 0) std::memset(a.grad_y, 0, static_cast<size_t>(p.m * p.dim) * elem);
    std::memset(a.grad_scale, 0, elem);
    return;
  }
  if (p.dtype == DType::Float64) run_pass(p, backward_pass<double>(a)); else run_pass(p, backward_pass<float>(a));
}

}  // namespace fl::metric
