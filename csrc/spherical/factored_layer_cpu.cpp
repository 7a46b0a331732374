// CPU kernels of the factored output layer (see factored_layer.h). Samples are independent in
// the head, prepare and gram steps and run in parallel; the scatter into V splits the d columns
// between threads, so each element of V is updated by one thread in entry order (deterministic).
#include <algorithm>
#include <vector>

#include "common/error.h"
#include "common/parallel.h"
#include "spherical/factored_dispatch.h"
#include "spherical/factored_head.h"
#include "spherical/factored_layer.h"

namespace fl {
namespace spherical {
namespace {

// Below this many multiply-adds a loop stays on the calling thread (waking the pool costs ~10 us).
constexpr int64_t kMinWorkPerPiece = 1 << 15;

int64_t grain_for(int64_t work_per_item) { return std::max<int64_t>(1, kMinWorkPerPiece / std::max<int64_t>(work_per_item, 1)); }

template <class A, class B>
A dot(const A* x, const B* y, int64_t n) {
  A sum = A(0);
  for (int64_t i = 0; i < n; ++i) sum += x[i] * static_cast<A>(y[i]);
  return sum;
}

void check_classes(const FactoredProblem& p) {
  const int64_t entries = p.samples * p.targets_per_sample;
  for (int64_t e = 0; e < entries; ++e) {
    const int64_t c = p.target[e];
    FL_CHECK_ARG(c == p.ignore_index || entry_is_target(c, p.classes), p.op_name,
                 ": argument 'target' has out-of-range class index ", c, " at flat position ", e,
                 "; expected 0 <= target < ", p.classes, " or target == ignore_index (", p.ignore_index, ")");
  }
}

template <class T, class W>
void head_typed(const FactoredProblem& p, T* loss, T* partials) {
  const int64_t d = p.features, K = p.targets_per_sample, width = packed_width(d);
  const T* h = static_cast<const T*>(p.h);
  const T* sh = static_cast<const T*>(p.sh);
  const W* v = static_cast<const W*>(p.weight_rows);
  const T* weights = static_cast<const T*>(p.target_weight);
  parallel_for(p.samples, grain_for(d * (K + 1)), [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      const T* row = sh + j * width;
      const int64_t* classes_of = p.target + j * K;
      T* out = partials + j * (K + 2);
      for (int64_t k = 0; k < K; ++k) {
        const int64_t c = classes_of[k];
        out[k] = entry_is_target(c, p.classes) ? dot(row, v + c * d, d) + row[omega_slot(d)] : T(0);
      }
      const T q = dot(h + j * d, row + quad_offset(d), d);
      const SamplePartials<T> r = sample_head<T>(p.params, classes_of, weights ? weights + j * K : nullptr, out, out,
                                                 K, p.ignore_index, p.classes, row[wbar_slot(d)], q);
      loss[j] = r.loss;
      out[K] = r.d_sum;
      out[K + 1] = r.d_sum_of_squares;
    }
  });
}

template <class T, class W>
void prepare_typed(const FactoredProblem& p, const T* partials, const T* grad_loss, int64_t grad_stride, T* ytilde,
                   T* scaled, T* coef) {
  const int64_t d = p.features, K = p.targets_per_sample, width = packed_width(d);
  const T* h = static_cast<const T*>(p.h);
  const T* sh = static_cast<const T*>(p.sh);
  const W* v = static_cast<const W*>(p.weight_rows);
  const T D = T(p.classes);
  parallel_for(p.samples, grain_for(d * (K + 1)), [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      const T g = has_target(p, j) ? grad_loss[j * grad_stride] : T(0);
      const T* in = partials + j * (K + 2);
      T* out = scaled + j * (K + 2);
      T* y = ytilde + j * width;
      for (int64_t k = 0; k < K + 2; ++k) out[k] = g * in[k];
      std::fill(y, y + d, T(0));
      T ybar = T(0);
      for (int64_t k = 0; k < K; ++k) {
        const int64_t c = p.target[j * K + k];
        if (!entry_is_target(c, p.classes)) continue;
        ybar += out[k];
        const W* vc = v + c * d;
        for (int64_t i = 0; i < d; ++i) y[i] += out[k] * static_cast<T>(vc[i]);
      }
      const T gs = out[K], gq = out[K + 1];
      y[omega_slot(d)] = ybar;
      y[wbar_slot(d)] = gs;
      const T* hj = h + j * d;
      T* quad = y + quad_offset(d);
      for (int64_t i = 0; i < d; ++i) quad[i] = T(2) * gq * hj[i];
      const T* row = sh + j * width;
      coef[2 * j] = T(2) * gq * row[omega_slot(d)] + gs;
      coef[2 * j + 1] = ybar + T(2) * gq * row[wbar_slot(d)] + D * gs;
    }
  });
}

template <class T>
void gram_typed(const FactoredProblem& p, const T* scaled, const T* hg, const T* mh, T* gram) {
  const int64_t m = p.samples, K = p.targets_per_sample;
  parallel_for(m, grain_for(m * K * K), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i)
      for (int64_t j = 0; j < m; ++j)
        gram[i * m + j] = gram_entry<T>(p.target + i * K, scaled + i * (K + 2), p.target + j * K, scaled + j * (K + 2),
                                        K, p.classes, hg[i * m + j], hg[j * m + i], mh[i * m + j]);
  });
}

template <class T, class W>
void scatter_typed(const FactoredProblem& p, W* v, const T* scaled, const T* r, T lr) {
  const int64_t d = p.features, K = p.targets_per_sample, entries = p.samples * K;
  // Columns are split between threads: every thread walks all entries in order over its columns.
  parallel_for(d, grain_for(entries), [&](int64_t begin, int64_t end) {
    for (int64_t e = 0; e < entries; ++e) {
      const int64_t c = p.target[e], j = e / K;
      if (!entry_is_target(c, p.classes)) continue;
      const T step = lr * scaled[j * (K + 2) + e % K];
      W* vc = v + c * d;
      const T* rj = r + j * d;
      for (int64_t i = begin; i < end; ++i) vc[i] = static_cast<W>(static_cast<T>(vc[i]) - step * rj[i]);
    }
  });
}

template <class T>
void group_typed(const FactoredProblem& p, const T* scaled, const int64_t* order, T* grouped) {
  const int64_t d = p.features, K = p.targets_per_sample, entries = p.samples * K;
  const T* h = static_cast<const T*>(p.h);
  parallel_for(entries, grain_for(d * K), [&](int64_t begin, int64_t end) {
    for (int64_t position = begin; position < end; ++position) {
      T* out = grouped + position * d;
      for (int64_t i = 0; i < d; ++i) {
        T sum = T(0);
        class_segment_sum<T>(p.target, order, entries, position, K, scaled, [&](int64_t j) { return h[j * d + i]; }, sum);
        out[i] = sum;
      }
    }
  });
}

}  // namespace

void factored_head_cpu(const FactoredProblem& p, void* loss, void* partials) {
  const char* where = "fastloss.spherical factored_head_cpu";
  validate_factored_problem(p, where);
  check_classes(p);
  dispatch_factored_types(p, where, [&](auto st, auto wt) {
    using T = typename decltype(st)::type;
    using W = typename decltype(wt)::type;
    head_typed<T, W>(p, static_cast<T*>(loss), static_cast<T*>(partials));
  });
}

void factored_prepare_cpu(const FactoredProblem& p, const void* partials, const void* grad_loss, int64_t grad_stride,
                          void* ytilde, void* scaled, void* coef) {
  const char* where = "fastloss.spherical factored_prepare_cpu";
  validate_factored_problem(p, where);
  FL_CHECK_ARG(grad_stride >= 0, where, ": grad_stride must be >= 0, got ", grad_stride);
  dispatch_factored_types(p, where, [&](auto st, auto wt) {
    using T = typename decltype(st)::type;
    using W = typename decltype(wt)::type;
    prepare_typed<T, W>(p, static_cast<const T*>(partials), static_cast<const T*>(grad_loss), grad_stride,
                        static_cast<T*>(ytilde), static_cast<T*>(scaled), static_cast<T*>(coef));
  });
}

void factored_gram_cpu(const FactoredProblem& p, const void* scaled, const void* hg, const void* mh, void* gram) {
  const char* where = "fastloss.spherical factored_gram_cpu";
  validate_factored_problem(p, where);
  dispatch_factored_types(p, where, [&](auto st, auto) {
    using T = typename decltype(st)::type;
    gram_typed<T>(p, static_cast<const T*>(scaled), static_cast<const T*>(hg), static_cast<const T*>(mh),
                  static_cast<T*>(gram));
  });
}

void factored_scatter_cpu(const FactoredProblem& p, void* weight_rows, const void* scaled, const void* r, double lr) {
  const char* where = "fastloss.spherical factored_scatter_cpu";
  validate_factored_problem(p, where);
  dispatch_factored_types(p, where, [&](auto st, auto wt) {
    using T = typename decltype(st)::type;
    using W = typename decltype(wt)::type;
    scatter_typed<T, W>(p, static_cast<W*>(weight_rows), static_cast<const T*>(scaled), static_cast<const T*>(r),
                        static_cast<T>(lr));
  });
}

}  // namespace spherical
}  // namespace fl

namespace fl {
namespace spherical {

void factored_group_cpu(const FactoredProblem& p, const void* scaled, const int64_t* order, void* grouped) {
  const char* where = "fastloss.spherical factored_group_cpu";
  validate_factored_problem(p, where);
  dispatch_factored_types(p, where, [&](auto st, auto) {
    using T = typename decltype(st)::type;
    group_typed<T>(p, static_cast<const T*>(scaled), order, static_cast<T*>(grouped));
  });
}

}  // namespace spherical
}  // namespace fl
