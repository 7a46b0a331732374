// CPU kernel of the sparsity-constrained quadratic OT dual: per column, the k-th largest score
// alpha_i - C_ij (a selection, O(n)), the column sums; then a row-major pass for the row sums.
#include <algorithm>
#include <limits>
#include <vector>

#include "common/parallel.h"
#include "ot/ot_kernels.h"
#include "ot/sparse_dual.h"

namespace fl::ot {
namespace {

template <class T, class Acc>
void sparse_dual_impl(const SparseDualArgs& a) {
  const Geometry& g = a.geom;
  if (g.batch == 0 || g.n == 0 || g.m == 0) return;
  const int64_t n = g.n, m = g.m;
  const Acc inv_gamma = Acc(1) / static_cast<Acc>(a.gamma);
  const bool constrained = a.k > 0 && a.k < n;
  const T* cost = static_cast<const T*>(g.cost);
  const Acc* alpha = static_cast<const Acc*>(a.alpha);
  const Acc* beta = static_cast<const Acc*>(a.beta);
  Acc* threshold = static_cast<Acc*>(a.threshold);

  parallel_for(g.batch * m, 16, [&](int64_t begin, int64_t end) {
    std::vector<Acc> scores(static_cast<size_t>(n));
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / m, j = item % m;
      const T* c = cost + b * n * m + j;
      const Acc* al = alpha + b * n;
      bool has_nan = false;
      for (int64_t i = 0; i < n; ++i) {
        scores[i] = sparse_score<Acc>(al[i], to_acc(c[i * m]));
        has_nan |= scores[i] != scores[i];
      }
      Acc tau = -std::numeric_limits<Acc>::infinity();
      if (constrained && has_nan) {
        tau = std::numeric_limits<Acc>::quiet_NaN();  // a NaN score has no rank (and would break the selection)
      } else if (constrained) {
        std::vector<Acc> sorted(scores);
        std::nth_element(sorted.begin(), sorted.begin() + (a.k - 1), sorted.end(), std::greater<Acc>());
        tau = sorted[a.k - 1];
      }
      threshold[item] = tau;
      Acc sum = 0, weighted = 0, sq = 0;
      for (int64_t i = 0; i < n; ++i) {
        const Acc t = sparse_plan_entry<Acc>(scores[i], beta[item], tau, inv_gamma);
        sum += t;
        weighted += t != Acc(0) ? t * to_acc(c[i * m]) : Acc(0);  // 0 * inf is no cost; NaN stays
        sq += t * t;
      }
      static_cast<Acc*>(a.col_sum)[item] = sum;
      static_cast<Acc*>(a.col_cost)[item] = weighted;
      static_cast<Acc*>(a.col_sq)[item] = sq;
    }
  });

  parallel_for(g.batch * n, 16, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / n;
      const T* row = cost + item * m;
      const Acc* be = beta + b * m;
      const Acc* tau = threshold + b * m;
      Acc sum = 0;
      for (int64_t j = 0; j < m; ++j)
        sum += sparse_plan_entry<Acc>(sparse_score<Acc>(alpha[item], to_acc(row[j])), be[j], tau[j], inv_gamma);
      static_cast<Acc*>(a.row_sum)[item] = sum;
    }
  });
}

}  // namespace

void sparse_dual_cpu(const SparseDualArgs& a) {
  validate_sparse_dual(a, false);
  switch (a.geom.dtype) {
    case DType::Float32: sparse_dual_impl<float, float>(a); break;
    case DType::Float64: sparse_dual_impl<double, double>(a); break;
    case DType::Float16: sparse_dual_impl<Half, float>(a); break;
    case DType::BFloat16: sparse_dual_impl<BFloat16, float>(a); break;
  }
}

}  // namespace fl::ot
