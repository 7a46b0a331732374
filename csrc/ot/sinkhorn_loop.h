// The Sinkhorn iteration, written once for the CPU and the CUDA backends. A backend provides
//   update_rows(eps, damping, with_error, iteration)  f <- damping * softmin_j(g) (+ row errors)
//   update_cols(eps, damping, iteration)              g <- damping * softmin_i(f)
//   mark_converged(iteration)                         done_at[b] = iteration where error_b <= tol
//   all_converged()                                   may answer late (CUDA reads back asynchronously)
//   finish(iterations_run)                            n_iter and the final error
// Problems that converged are skipped by later updates (done_at < iteration), so a late answer only
// costs empty launches, never changes a result.
#pragma once

#include <algorithm>
#include <cstdint>

#include "ot/ot_kernels.h"
#include "ot/ot_math.h"
#include "ot/solve_workspace.h"

namespace fl::ot {

// The half-steps of a solve as softmin arguments, shared by the backends. Rows (transpose = false):
// f <- softmin_j(g), with the row errors when asked; columns: g <- softmin_i(f).
inline SoftminArgs half_step(const SolveArgs& a, const SolveWorkspace& w, bool transpose, double eps, double damping,
                             int32_t iteration, bool with_error) {
  SoftminArgs s;
  s.geom = a.geom;
  s.transpose = transpose;
  s.eps = eps;
  s.damping = damping;
  s.h = transpose ? a.f : a.g;
  s.log_w = transpose ? a.log_a : a.log_b;
  s.out = transpose ? a.g : a.f;
  s.done_at = w.done_at;
  s.iteration = iteration;
  if (with_error) {
    s.old = a.f;
    s.log_w_dst = a.log_a;
    s.row_err = w.row_err;
  }
  return s;
}

// The final measurement: a row half-step at the target eps into scratch (f is left as it is), for the
// row errors of the final state, over every problem.
inline SoftminArgs final_error_step(const SolveArgs& a, const SolveWorkspace& w) {
  SoftminArgs s = half_step(a, w, false, a.eps, damping_factor(a.rho, a.eps), 0, true);
  s.done_at = nullptr;
  s.out = w.scratch;
  return s;
}

template <class Backend>
void run_sinkhorn(Backend& backend, const SolveArgs& a) {
  const bool anneal = a.eps_scaling > 0.0 && a.eps_start > a.eps;
  double eps = anneal ? a.eps_start : a.eps;
  int64_t iteration = 0;
  while (iteration < a.max_iter) {
    // However short max_iter is, the last iteration runs at the target eps: the potentials must belong
    // to the eps the value and the plan are computed with.
    if (iteration + 1 == a.max_iter) eps = a.eps;
    const bool at_target = eps <= a.eps;
    // Convergence is only judged at the target eps: an annealing level is a warm start, not a solution.
    const bool check = at_target && a.check_every > 0 && (iteration + 1) % a.check_every == 0;
    const double damping = damping_factor(a.rho, eps);
    const int32_t it = static_cast<int32_t>(iteration);
    backend.update_rows(eps, damping, check, it);
    if (check) backend.mark_converged(it);
    backend.update_cols(eps, damping, it);
    ++iteration;
    if (check && backend.all_converged()) break;
    if (!at_target) eps = std::max(a.eps, eps * a.eps_scaling);
  }
  backend.finish(static_cast<int32_t>(iteration));
}

}  // namespace fl::ot
