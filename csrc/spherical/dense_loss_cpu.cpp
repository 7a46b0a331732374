// CPU kernels for the spherical-family losses on dense logits.
// Forward: one pass over each row for its moments (split into chunks so that a
// few very long rows still use every core), then the shared loss head.
// Backward: one elementwise pass.
#include <algorithm>
#include <vector>

#include "common/dtype.h"
#include "common/cpu_multiversion.h"
#include "common/error.h"
#include "common/moments.h"
#include "common/parallel.h"
#include "spherical/dense_loss.h"

namespace fl {
namespace spherical {
namespace {

constexpr int64_t kChunk = 16384;      // elements per parallel task along a row
constexpr int64_t kSubBlock = 256;     // elements summed against one shift
// Waking a pool thread costs ~10 us: a piece of a parallel loop gets at least this many elements.
constexpr int64_t kMinElementsPerPiece = 1 << 16;

int64_t tasks_per_piece(int64_t cols) { return std::max<int64_t>(1, kMinElementsPerPiece / std::min(cols, kChunk)); }

bool is_ignored(const DenseLossProblem& p, int64_t row) { return p.target[row] == p.ignore_index; }

void check_targets(const DenseLossProblem& p) {
  for (int64_t r = 0; r < p.rows; ++r) {
    const int64_t t = p.target[r];
    if (t == p.ignore_index) continue;
    FL_CHECK_ARG(t >= 0 && t < p.cols, p.op_name, ": argument 'target' has out-of-range class index ", t, " at flat position ", r, "; expected 0 <= target < ",
                 p.cols, " or target == ignore_index (", p.ignore_index, ")");
  }
}

// Moments of x[begin, end): vectorizable shifted sums per sub-block, merged with Chan's update.
template <class T, class Acc>
FL_CPU_MULTIVERSION Moments<Acc> range_moments(const T* x, int64_t begin, int64_t end) {
  Moments<Acc> total{Acc(0), Acc(0), Acc(0)};
  for (int64_t b = begin; b < end; b += kSubBlock) {
    const int64_t e = std::min(end, b + kSubBlock);
    const Acc shift = to_acc(x[b]);
    Acc s = 0, q = 0;
#pragma omp simd reduction(+ : s, q)
    for (int64_t i = b; i < e; ++i) {
      const Acc d = to_acc(x[i]) - shift;
      s += d;
      q += d * d;
    }
    total = merge_moments(total, moments_from_shifted_sums(shift, Acc(e - b), s, q));
  }
  return total;
}

// out[k] = dL/do_k for k in [begin, end) of one row.
template <class T, class Acc>
FL_CPU_MULTIVERSION void range_gradient(const T* x, T* out, int64_t begin, int64_t end, int64_t target,
                                        const RowGradient<Acc>& g, Acc upstream) {
  const Acc scale = upstream * g.g_linear;
  const Acc offset = upstream * g.g_const;
  const Acc center = g.center;
#pragma omp simd
  for (int64_t k = begin; k < end; ++k) out[k] = StoreAs<T>::from(offset + scale * (to_acc(x[k]) - center));
  if (target >= begin && target < end) out[target] = StoreAs<T>::from(element_gradient(g, upstream, to_acc(x[target]), true));
}

template <class T>
void forward_typed(const DenseLossProblem& p, void* loss_out, void* coef_out) {
  using Acc = typename AccType<T>::type;
  const T* logits = static_cast<const T*>(p.logits);
  Acc* loss = static_cast<Acc*>(loss_out);
  Acc* coef = static_cast<Acc*>(coef_out);
  const int64_t chunks = (p.cols + kChunk - 1) / kChunk;

  std::vector<Moments<Acc>> partial(static_cast<size_t>(p.rows * chunks));
  parallel_for(p.rows * chunks, tasks_per_piece(p.cols), [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t row = task / chunks;
      if (is_ignored(p, row)) continue;
      const int64_t c0 = (task % chunks) * kChunk;
      const int64_t c1 = std::min(p.cols, c0 + kChunk);
      partial[task] = range_moments<T, Acc>(logits + row * p.row_stride, c0, c1);
    }
  });

  parallel_for(p.rows, kMinElementsPerPiece / 16, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      HeadResult<Acc> head = zero_head<Acc>();
      if (!is_ignored(p, row)) {
        Moments<Acc> moments = partial[row * chunks];
        for (int64_t c = 1; c < chunks; ++c) moments = merge_moments(moments, partial[row * chunks + c]);
        const Acc o_target = to_acc(logits[row * p.row_stride + p.target[row]]);
        head = evaluate_head<Acc>(p.params, o_target, moments);
      }
      loss[row] = head.loss;
      store_row_gradient(coef + row * kCoefficientsPerRow, head.grad);
    }
  });
}

template <class T>
void backward_typed(const DenseLossProblem& p, const void* grad_loss_in, int64_t grad_loss_stride,
                    const void* coef_in, void* grad_out) {
  using Acc = typename AccType<T>::type;
  const T* logits = static_cast<const T*>(p.logits);
  const Acc* grad_loss = static_cast<const Acc*>(grad_loss_in);
  const Acc* coef = static_cast<const Acc*>(coef_in);
  T* grad = static_cast<T*>(grad_out);
  const int64_t chunks = (p.cols + kChunk - 1) / kChunk;

  parallel_for(p.rows * chunks, tasks_per_piece(p.cols), [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t row = task / chunks;
      const int64_t c0 = (task % chunks) * kChunk;
      const int64_t c1 = std::min(p.cols, c0 + kChunk);
      T* out = grad + row * p.cols;
      if (is_ignored(p, row)) {
        std::fill(out + c0, out + c1, StoreAs<T>::from(Acc(0)));
        continue;
      }
      const RowGradient<Acc> g = load_row_gradient(coef + row * kCoefficientsPerRow);
      range_gradient<T, Acc>(logits + row * p.row_stride, out, c0, c1, p.target[row], g,
                             grad_loss[row * grad_loss_stride]);
    }
  });
}

}  // namespace

void dense_loss_forward_cpu(const DenseLossProblem& problem, void* loss, void* coef) {
  const char* where = "fastloss.spherical dense_loss_forward_cpu";
  validate_dense_shape(problem, where);
  validate_loss_params(problem.params, where);
  check_targets(problem);
  if (problem.rows == 0) return;
  dispatch_float_types<Half, BFloat16>(problem.dtype, where,
                                       [&](auto tag) { forward_typed<typename decltype(tag)::type>(problem, loss, coef); });
}

void dense_loss_backward_cpu(const DenseLossProblem& problem, const void* grad_loss, int64_t grad_loss_stride,
                             const void* coef, void* grad_logits) {
  const char* where = "fastloss.spherical dense_loss_backward_cpu";
  validate_dense_shape(problem, where);
  FL_CHECK_ARG(grad_loss_stride >= 0, where, ": grad_loss_stride must be >= 0, got ", grad_loss_stride);
  if (problem.rows == 0) return;
  dispatch_float_types<Half, BFloat16>(problem.dtype, where, [&](auto tag) {
    backward_typed<typename decltype(tag)::type>(problem, grad_loss, grad_loss_stride, coef, grad_logits);
  });
}

}  // namespace spherical
}  // namespace fl
