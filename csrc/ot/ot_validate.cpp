// Argument checks of the optimal-transport entry points: they run before any kernel writes, and name
// the op and the argument.
#include <cmath>
#include <cstdint>

#include "common/error.h"
#include "ot/ot_kernels.h"
#include "ot/solve_workspace.h"

namespace fl::ot {

void validate_geometry(const Geometry& g, const char* op) {
  FL_CHECK_ARG(g.batch >= 0 && g.n >= 0 && g.m >= 0, op, ": sizes must be non-negative, got batch=", g.batch,
               " n=", g.n, " m=", g.m);
  FL_CHECK_ARG(g.p == 0 || g.p == 1 || g.p == 2, op, ": p must be 0 (cost matrix), 1 or 2, got ", g.p);
  if (g.p == 0) {
    FL_CHECK_ARG(g.cost != nullptr || g.batch * g.n * g.m == 0, op, ": the cost matrix is missing");
  } else {
    FL_CHECK_ARG(g.dim >= 1, op, ": points need dim >= 1, got ", g.dim);
    FL_CHECK_ARG(g.dtype == DType::Float32 || g.dtype == DType::Float64, op,
                 ": points must be float32 or float64 (the Python layer converts), got ", dtype_name(g.dtype));
    FL_CHECK_ARG((g.x != nullptr && g.y != nullptr) || g.batch * (g.n + g.m) == 0, op, ": points x or y missing");
  }
}

static void check_eps(double eps, const char* op) {
  FL_CHECK_ARG(std::isfinite(eps) && eps > 0.0, op, ": eps must be positive and finite, got ", eps);
}

void validate_softmin(const SoftminArgs& a) {
  const char* op = "fastloss.ot.softmin";
  validate_geometry(a.geom, op);
  check_eps(a.eps, op);
  FL_CHECK_ARG(std::isfinite(a.damping) && a.damping > 0.0 && a.damping <= 1.0, op, ": damping must be in (0, 1], got ",
               a.damping);
  FL_CHECK_ARG(a.row_err == nullptr || (a.old != nullptr && a.log_w_dst != nullptr), op,
               ": the row error needs the old potential and the destination weights");
}

void validate_solve(const SolveArgs& a) {
  const char* op = "fastloss.ot.sinkhorn";
  validate_geometry(a.geom, op);
  check_eps(a.eps, op);
  FL_CHECK_ARG(a.max_iter >= 0 && a.max_iter <= INT32_MAX, op, ": max_iter must be in [0, 2^31), got ", a.max_iter);
  FL_CHECK_ARG(a.check_every >= 0, op, ": check_every must be >= 0, got ", a.check_every);
  FL_CHECK_ARG(a.tol >= 0.0, op, ": tol must be >= 0, got ", a.tol);
  FL_CHECK_ARG(a.eps_scaling == 0.0 || (a.eps_scaling > 0.0 && a.eps_scaling < 1.0), op,
               ": eps_scaling must be in (0, 1) (or 0: off), got ", a.eps_scaling);
  FL_CHECK_ARG(a.eps_scaling == 0.0 || (std::isfinite(a.eps_start) && a.eps_start > 0.0), op,
               ": eps_start must be positive and finite, got ", a.eps_start);
  FL_CHECK_ARG(!(a.rho < 0.0), op, ": the marginal penalty rho must be >= 0 (0: balanced), got ", a.rho);
  FL_CHECK_ARG(a.workspace != nullptr || a.geom.batch == 0, op, ": workspace missing");
}

void validate_transport(const TransportArgs& a) {
  const char* op = "fastloss.ot.transport";
  validate_geometry(a.geom, op);
  check_eps(a.eps, op);
  FL_CHECK_ARG(a.grad == nullptr || a.geom.p != 0, op, ": a point gradient needs points, not a cost matrix");
}

void validate_plan(const PlanArgs& a) {
  const char* op = "fastloss.ot.plan";
  validate_geometry(a.geom, op);
  check_eps(a.eps, op);
}

void validate_sparse_dual(const SparseDualArgs& a, bool cuda) {
  const char* op = "fastloss.ot.sparse_ot";
  validate_geometry(a.geom, op);
  FL_CHECK_ARG(a.geom.p == 0, op, ": needs a cost matrix");
  FL_CHECK_ARG(std::isfinite(a.gamma) && a.gamma > 0.0, op, ": gamma must be positive and finite, got ", a.gamma);
  FL_CHECK_ARG(a.k >= 0, op, ": k must be >= 1 (or None), got ", a.k);
  FL_CHECK_ARG(!cuda || a.k <= kSparseMaxKCuda || a.k >= a.geom.n, op, ": k must be <= ", kSparseMaxKCuda,
               " on CUDA (or >= n, which is no constraint), got ", a.k);
}

int64_t solve_workspace_bytes(const Geometry& g) {
  int64_t total = 0;
  carve_workspace(g, nullptr, &total);
  return total;
}

}  // namespace fl::ot
