// One pass of a metric-family engine (CPU: metric_cpu.cpp; CUDA: metric_cuda.cu and info_nce_cuda.cu)
// over the rows: a forward writes the row terms (and the column terms of symmetric InfoNCE); a
// gradient pass writes dX, dY and d(scale) from either the saved statistics and the upstream
// gradients (backward), or, in the forward itself, this pass's statistics and the unit upstream
// gradient of sum_i terms[i][0] (the fused path: one similarity product fewer than forward + backward).
#pragma once

#include "metric/metric_kernels.h"

namespace fl::metric {

template <class Acc>
struct Pass {
  Acc* terms = nullptr;  // forward outputs (null: not a forward pass)
  Acc* counts = nullptr;
  Acc* stats = nullptr;
  Acc* col_terms = nullptr;
  Acc* col_stats_out = nullptr;
  bool unit_grad = false;            // gradient of sum_i terms[i][0], from this pass's statistics
  const Acc* saved_stats = nullptr;  // backward: the forward's statistics and the upstream gradients
  const Acc* grad_row = nullptr;
  const Acc* grad_col = nullptr;
  const Acc* col_stats = nullptr;
  Acc* grad_x = nullptr;  // gradient outputs (null: no gradient)
  Acc* grad_y = nullptr;
  Acc* grad_scale = nullptr;
  Acc* row_active = nullptr;  // unit_grad: 1 where the row of W may be nonzero
};

// The forward's pass, with the fused gradient when out asks for it.
template <class Acc>
Pass<Acc> forward_pass(const ForwardOut& out) {
  Pass<Acc> pass;
  pass.terms = static_cast<Acc*>(out.row_terms);
  pass.counts = static_cast<Acc*>(out.row_counts);
  pass.stats = static_cast<Acc*>(out.row_stats);
  pass.col_terms = static_cast<Acc*>(out.col_terms);
  pass.col_stats_out = static_cast<Acc*>(out.col_stats);
  if (out.unit_grad_x != nullptr) {
    pass.unit_grad = true;
    pass.grad_x = static_cast<Acc*>(out.unit_grad_x);
    pass.grad_y = static_cast<Acc*>(out.unit_grad_y);
    pass.grad_scale = static_cast<Acc*>(out.unit_grad_scale);
    pass.row_active = static_cast<Acc*>(out.row_active);
  }
  return pass;
}

template <class Acc>
Pass<Acc> backward_pass(const BackwardArgs& a) {
  Pass<Acc> pass;
  pass.saved_stats = static_cast<const Acc*>(a.row_stats);
  pass.grad_row = static_cast<const Acc*>(a.grad_row);
  pass.grad_col = static_cast<const Acc*>(a.grad_col);
  pass.col_stats = static_cast<const Acc*>(a.col_stats);
  pass.grad_x = static_cast<Acc*>(a.grad_x);
  pass.grad_y = static_cast<Acc*>(a.grad_y);
  pass.grad_scale = static_cast<Acc*>(a.grad_scale);
  return pass;
}

}  // namespace fl::metric
