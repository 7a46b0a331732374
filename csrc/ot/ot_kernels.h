// Entry points of the optimal-transport kernels (Sinkhorn in the log domain on cost matrices and on
// point clouds, and the quadratically regularized / sparsity-constrained dual). Torch-free: pointers,
// sizes and a stream. All arrays are contiguous; batch problems are stacked along the first axis.
//
// Conventions (the Python layer in python/fastloss/ot/ relies on them):
//   potentials f (batch, n), g (batch, m) and log-weights log_a, log_b are in the accumulator type
//   (float64 for float64 costs or points, float32 otherwise); zero mass is a log-weight of -inf.
//   softmin over j:  out_i = -eps * LSE_j((h_j - C_ij) / eps + log_w_j)
//   plan:            P_ij = exp((f_i + g_j - C_ij) / eps + log_a_i + log_b_j)
#pragma once

#include <cstdint>

#include "common/dtype.h"
#include "common/stream.h"

namespace fl::ot {

// Where the cost of problem b comes from: a cost matrix (p = 0, any float dtype) or points x, y
// (p = 1: |x - y|, p = 2: |x - y|^2 / 2; float32 or float64, centred by the caller).
struct Geometry {
  DType dtype = DType::Float32;
  int64_t batch = 0, n = 0, m = 0, dim = 0;
  int p = 0;
  const void* cost = nullptr;  // (batch, n, m)
  const void* x = nullptr;     // (batch, n, dim)
  const void* y = nullptr;     // (batch, m, dim)
};

// One half-step: the softmin of h over the source side for every row of the destination side.
// transpose = false reduces over j (destination = rows, length n); true reduces over i.
struct SoftminArgs {
  Geometry geom;
  bool transpose = false;
  double eps = 1.0;
  double damping = 1.0;            // out = damping * softmin (unbalanced updates)
  const void* h = nullptr;         // (batch, source length)
  const void* log_w = nullptr;     // (batch, source length)
  void* out = nullptr;             // (batch, destination length); may alias `old`
  // Optional convergence measure: row_err[b, i] = w_i |1 - exp((old_i - out_i) / eps)|.
  const void* old = nullptr;
  const void* log_w_dst = nullptr;
  void* row_err = nullptr;
  // Problems whose done_at is in [0, iteration) are skipped (left as they are). May be null.
  const int32_t* done_at = nullptr;
  int32_t iteration = 0;
};

// The full solve: alternate f <- softmin_j(g), g <- softmin_i(f) from the initial f, g until the
// L1 marginal error <= tol (tested every check_every iterations; 0 = never, run max_iter), each
// problem on its own. eps_scaling in (0, 1) anneals eps from eps_start down to eps, one iteration
// per level. rho > 0 makes the problem unbalanced (KL marginal penalty).
struct SolveArgs {
  Geometry geom;
  const void* log_a = nullptr;
  const void* log_b = nullptr;
  void* f = nullptr;  // in: initial potential, out: final
  void* g = nullptr;
  double eps = 1.0, eps_start = 1.0, eps_scaling = 0.0, rho = 0.0, tol = 1e-6;
  int64_t max_iter = 1000, check_every = 10;
  int32_t* n_iter = nullptr;  // (batch)
  void* error = nullptr;      // (batch): the measure above on the final state
  void* workspace = nullptr;  // solve_workspace_bytes(...)
};

// Per-row transport statistics of the plan: mass_i = sum_j P_ij, cost_i = sum_j P_ij C_ij, and for
// points grad_i = sum_j P_ij d c(x_i, y_j) / d x_i (the envelope gradient of OT wrt x). transpose
// gives the same for the columns (and y). With src_weight, every P_ij is weighted by src_weight_j
// (plan-times-vector products: the implicit backward's matrix-free P v).
struct TransportArgs {
  Geometry geom;
  bool transpose = false;
  double eps = 1.0;
  const void* f = nullptr;
  const void* g = nullptr;
  const void* log_a = nullptr;
  const void* log_b = nullptr;
  void* mass = nullptr;  // (batch, length of the chosen side), may be null
  void* cost = nullptr;  // same, may be null
  void* grad = nullptr;  // (batch, length, dim) for points, may be null
  const void* src_weight = nullptr;  // (batch, length of the other side), may be null
};

struct PlanArgs {
  Geometry geom;
  double eps = 1.0;
  const void* f = nullptr;
  const void* g = nullptr;
  const void* log_a = nullptr;
  const void* log_b = nullptr;
  void* plan = nullptr;  // (batch, n, m), accumulator type
};

// Quadratically regularized OT (Blondel et al. 2018) with at most k nonzeros per column (Liu et al.
// 2023; k <= 0: no sparsity constraint). For dual variables alpha (batch, n), beta (batch, m):
//   T_ij = [alpha_i + beta_j - C_ij]_+ / gamma on the k largest alpha_i - C_ij of column j, else 0;
// the kernel returns the row sums, the column sums, sum_ij T_ij C_ij and sum_ij T_ij^2 per problem
// parts (per column), and each column's selection threshold.
struct SparseDualArgs {
  Geometry geom;  // cost matrix only
  double gamma = 1.0;
  int64_t k = 0;
  const void* alpha = nullptr;
  const void* beta = nullptr;
  void* row_sum = nullptr;     // (batch, n)
  void* col_sum = nullptr;     // (batch, m)
  void* col_cost = nullptr;    // (batch, m): sum_i T_ij C_ij
  void* col_sq = nullptr;      // (batch, m): sum_i T_ij^2
  void* threshold = nullptr;   // (batch, m): the k-th largest alpha_i - C_ij (-inf when k >= n or k <= 0)
};

constexpr int kSparseMaxKCuda = 32;  // the CUDA kernel keeps each column's top k in registers

void validate_geometry(const Geometry& g, const char* op);
void validate_softmin(const SoftminArgs& a);
void validate_solve(const SolveArgs& a);
void validate_transport(const TransportArgs& a);
void validate_plan(const PlanArgs& a);
void validate_sparse_dual(const SparseDualArgs& a, bool cuda);
int64_t solve_workspace_bytes(const Geometry& g);

void softmin_cpu(const SoftminArgs& a);
void solve_cpu(const SolveArgs& a);
void transport_cpu(const TransportArgs& a);
void plan_cpu(const PlanArgs& a);
void sparse_dual_cpu(const SparseDualArgs& a);

void softmin_cuda(const SoftminArgs& a, int device, cudaStream_t stream);
void solve_cuda(const SolveArgs& a, int device, cudaStream_t stream);
void transport_cuda(const TransportArgs& a, int device, cudaStream_t stream);
void plan_cuda(const PlanArgs& a, int device, cudaStream_t stream);
void sparse_dual_cuda(const SparseDualArgs& a, int device, cudaStream_t stream);

}  // namespace fl::ot
