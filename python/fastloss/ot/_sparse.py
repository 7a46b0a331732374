"""Quadratically regularized OT (Blondel, Seguy & Rolet 2018) and its sparsity-constrained variant
with at most k nonzeros per column (Liu, Puigcerver & Blondel 2023), solved in the dual.

Dual: max_{alpha, beta} <alpha, a> + <beta, b> - sum_j delta_k(alpha + beta_j - C_j), where
delta_k(z) = 1/(2 gamma) sum over the k largest z_i of [z_i]_+^2 (all i when k is None). It is
concave and smooth; its gradient is the marginal violation (a - T 1, b - T^T 1) of the plan
T_ij = [alpha_i + beta_j - C_ij]_+ / gamma on each column's top k. The fastloss kernel computes T's
row and column sums and the objective in two passes with no exponential; L-BFGS (torch.optim,
on the tensors' device) climbs the dual.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import _validate as V
from . import _ops
from ._inputs import cost_problem

CHECK_EVERY = 10


@dataclass
class SparseOTResult:
    """plan: the dense (n, m) plan (batched: (B, n, m)); indices, values: with k, each column's k
    selected rows and their plan entries ((k, m) each; entries may be 0), else None;
    cost: <T, C>; objective: <T, C> + gamma / 2 |T|^2 (the regularized primal value); alpha, beta:
    the dual variables; n_iter: L-BFGS iterations; marginal_error: |T 1 - a|_1 + |T^T 1 - b|_1."""

    plan: torch.Tensor
    indices: torch.Tensor | None
    values: torch.Tensor | None
    cost: torch.Tensor
    objective: torch.Tensor
    alpha: torch.Tensor
    beta: torch.Tensor
    n_iter: int
    marginal_error: torch.Tensor


def _plan_from_duals(cost, alpha, beta, threshold, gamma):
    score = alpha[:, :, None] - cost.to(alpha.dtype)
    selected = score >= threshold[:, None, :]
    return torch.where(selected, torch.relu(score + beta[:, None, :]) / gamma, 0)


def sparse_ot(
    C: torch.Tensor,
    a: torch.Tensor | None = None,
    b: torch.Tensor | None = None,
    *,
    gamma: float,
    k: int | None = None,
    max_iter: int = 500,
    tol: float = 1e-6,
) -> SparseOTResult:
    """OT regularized by gamma / 2 |T|^2, with at most k nonzeros per column when k is given
    ("at most k tokens per expert" for MoE routing; k small approaches unregularized OT, k >= n is
    plain quadratic OT).

    Args:
        C: (n, m) or (B, n, m) costs. a, b: histograms (uniform when None), summing to 1.
        gamma: regularization strength (> 0); smaller is closer to exact OT and sparser.
        k: nonzeros allowed per column (>= 1; at most 32 on CUDA unless k >= n), or None.
        max_iter: L-BFGS iterations. tol: stop when the L1 marginal error is <= tol.

    No gradient: the result is detached. Ties at a column's k-th largest score are all kept (continuous costs have none). With k the
    problem is not convex: the dual is a relaxation, piecewise quadratic, whose plan can miss the
    marginals when k is small (k = 2 of 20 rows: 0.07 in L1, for POT's solver too), and L-BFGS
    (restarted when its line search stalls at a kink) may stop within ~1e-5 of the dual optimum.
    """
    fn = "ot.sparse_ot"
    problem = cost_problem(fn, C, a, b, normalized=True)
    gamma = V.real_number(fn, "gamma", gamma, positive=True)
    n = problem.cost.shape[1]
    if k is not None:
        k = V.integer(fn, "k", k)
        if k < 1:
            raise ValueError(f"fastloss.{fn}: k must be >= 1 (or None for no sparsity constraint), got {k}")
    kernel_k = 0 if k is None or k >= n else k
    max_iter = V.integer(fn, "max_iter", max_iter)
    if max_iter < 1:
        raise ValueError(f"fastloss.{fn}: max_iter must be >= 1, got {max_iter}")
    tol = V.real_number(fn, "tol", tol, non_negative=True)

    cost = problem.cost.detach()
    a_w, b_w = problem.a.detach(), problem.b.detach()
    acc = problem.acc
    alpha = torch.zeros_like(a_w).requires_grad_(True)
    # Start where every column's best entry is active: beta_j = min_i C_ij (a feasible-ish guess).
    beta = cost.to(acc).amin(1).clone().requires_grad_(True)
    # Steps of CHECK_EVERY iterations, with the marginal error read back between them.
    def make_optimizer():
        return torch.optim.LBFGS([alpha, beta], lr=1, max_iter=CHECK_EVERY, max_eval=25 * CHECK_EVERY, tolerance_grad=0, tolerance_change=1e-30,
                                 history_size=20, line_search_fn="strong_wolfe")  # fmt: skip

    optimizer = make_optimizer()
    state = {"error": None}

    def closure():
        optimizer.zero_grad()
        with torch.no_grad():
            row_sum, col_sum, _, col_sq, _ = _ops.sparse_dual(cost, alpha.detach(), beta.detach(), gamma, kernel_k)
        dual = (alpha.detach() * a_w).sum() + (beta.detach() * b_w).sum() - 0.5 * gamma * col_sq.sum()
        # Minimize -dual: its gradient is the marginal violation of the current plan.
        alpha.grad = row_sum - a_w
        beta.grad = col_sum - b_w
        state["error"] = (row_sum - a_w).abs().sum(-1) + (col_sum - b_w).abs().sum(-1)
        return -dual

    iterations, stalled = 0, 0
    while iterations < max_iter:
        optimizer.param_groups[0]["max_iter"] = min(CHECK_EVERY, max_iter - iterations)  # never past max_iter
        before = optimizer.state[alpha].get("n_iter", 0)
        optimizer.step(closure)
        done = optimizer.state[alpha]["n_iter"] - before
        iterations += done
        if bool((state["error"] <= tol).all()):
            break
        if done == 0:
            # The line search found no ascent: with k the dual is piecewise quadratic, and a kink (a change
            # of some column's top k) stalls the curvature pairs. Restart once from a fresh memory.
            stalled += 1
            if stalled > 3:
                break
            optimizer = make_optimizer()
        else:
            stalled = 0
    with torch.no_grad():
        alpha_f, beta_f = alpha.detach(), beta.detach()
        row_sum, col_sum, col_cost, col_sq, threshold = _ops.sparse_dual(cost, alpha_f, beta_f, gamma, kernel_k)
        plan = _plan_from_duals(cost, alpha_f, beta_f, threshold, gamma)
        transport = col_cost.sum(-1)
        objective = transport + 0.5 * gamma * col_sq.sum(-1)
        error = (row_sum - a_w).abs().sum(-1) + (col_sum - b_w).abs().sum(-1)
        indices = values = None
        if k is not None:
            top = min(k, n)
            scores = alpha_f[:, :, None] - cost.to(acc)
            indices = scores.topk(top, dim=1).indices
            values = plan.gather(1, indices)
    u = problem.unbatch
    return SparseOTResult(u(plan), None if indices is None else u(indices), None if values is None else u(values),
                          u(transport), u(objective), u(alpha_f), u(beta_f), int(iterations), u(error))  # fmt: skip
