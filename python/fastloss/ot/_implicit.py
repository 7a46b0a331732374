"""Implicit differentiation of Sinkhorn's potentials (cost matrices, and point clouds matrix-free).

At the solution, F(f, g; C, a, b) = (P 1 - a, P^T 1 - b) = 0 with
P_ij = a_i b_j exp((f_i + g_j - C_ij) / eps). Its Jacobian in (f, g),
J = (1/eps) [[diag(P 1), P], [P^T, diag(P^T 1)]], is symmetric positive semi-definite with the
gauge direction (1, -1) (f + c, g - c) as null space. The backward solves J w = (df, dg) by
preconditioned conjugate gradients on the complement of that direction (matrix-free: two
products with P per iteration), then returns -w^T dF/d(C, a, b) through autograd on F. Memory:
the plan (n x m, as large as C) and a few vectors; independent of the Sinkhorn iterations.
Gradients of a loss that depends on f or g through their gauge (the constant c) are not defined;
the gauge component of (df, dg) is dropped.
"""

from __future__ import annotations

import torch

from ._inputs import Problem

CG_MAX_ITER = 1000


def _dense_plan(cost, a, b, f, g, eps):
    return a[:, :, None] * b[:, None, :] * torch.exp((f[:, :, None] + g[:, None, :] - cost) / eps)


def plan(problem: Problem, eps: float, f: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """The plan as a differentiable function of f, g, C, a and b."""
    return _dense_plan(problem.cost.to(f.dtype), problem.a, problem.b, f, g, eps)


def _conjugate_gradient(plan_times, row_mass, col_mass, rhs_f, rhs_g, mask_f, mask_g, eps):
    """Solves J (u, v) = (rhs_f, rhs_g) on the support masks, orthogonal to the gauge direction.
    plan_times(u, v) returns (P v, P^T u)."""
    tiny = torch.finfo(row_mass.dtype).tiny

    def apply(u, v):
        pv, ptu = plan_times(u, v)
        return (row_mass * u + pv) / eps * mask_f, (col_mass * v + ptu) / eps * mask_g

    null_f, null_g = mask_f, -mask_g
    null_norm = (null_f.square().sum(-1) + null_g.square().sum(-1)).clamp_min(tiny)

    def project(u, v):
        c = ((u * null_f).sum(-1) + (v * null_g).sum(-1)) / null_norm
        return u - c[:, None] * null_f, v - c[:, None] * null_g

    inv_f = torch.where(row_mass > tiny, eps / row_mass.clamp_min(tiny), 0) * mask_f
    inv_g = torch.where(col_mass > tiny, eps / col_mass.clamp_min(tiny), 0) * mask_g
    rf, rg = project(rhs_f * mask_f, rhs_g * mask_g)
    uf, ug = torch.zeros_like(rf), torch.zeros_like(rg)
    zf, zg = inv_f * rf, inv_g * rg
    zf, zg = project(zf, zg)
    pf, pg = zf, zg
    rz = (rf * zf).sum(-1) + (rg * zg).sum(-1)
    target = (rf.square().sum(-1) + rg.square().sum(-1)).sqrt() * (1e-10 if row_mass.dtype == torch.float64 else 1e-6)
    for step in range(CG_MAX_ITER):
        qf, qg = apply(pf, pg)
        denom = (pf * qf).sum(-1) + (pg * qg).sum(-1)
        alpha = torch.where(denom > 0, rz / denom.clamp_min(tiny), 0)
        uf, ug = uf + alpha[:, None] * pf, ug + alpha[:, None] * pg
        rf, rg = rf - alpha[:, None] * qf, rg - alpha[:, None] * qg
        if step % 10 == 9:
            residual = (rf.square().sum(-1) + rg.square().sum(-1)).sqrt()
            if bool((residual <= target).all()):
                break
        zf, zg = project(inv_f * rf, inv_g * rg)
        rz_new = (rf * zf).sum(-1) + (rg * zg).sum(-1)
        beta = torch.where(rz > 0, rz_new / rz.clamp_min(tiny), 0)
        pf, pg = zf + beta[:, None] * pf, zg + beta[:, None] * pg
        rz = rz_new
    return project(uf, ug)


class _ImplicitPotentials(torch.autograd.Function):
    @staticmethod
    def forward(ctx, cost, a, b, f, g, eps: float):
        ctx.eps = eps
        ctx.save_for_backward(cost, a, b, f, g)
        return f.clone(), g.clone()

    @staticmethod
    def backward(ctx, grad_f, grad_g):
        cost, a, b, f, g = ctx.saved_tensors
        eps = ctx.eps
        acc = f.dtype
        grad_f = torch.zeros_like(f) if grad_f is None else grad_f.to(acc)
        grad_g = torch.zeros_like(g) if grad_g is None else grad_g.to(acc)
        with torch.enable_grad():
            c = cost.detach().to(acc).requires_grad_(ctx.needs_input_grad[0])
            wa = a.detach().requires_grad_(ctx.needs_input_grad[1])
            wb = b.detach().requires_grad_(ctx.needs_input_grad[2])
            P = _dense_plan(c, wa, wb, f, g, eps)
            row = P.sum(-1)  # P is 0 at infinite costs: no 0 * inf anywhere below
            col = P.sum(-2)
            residual_f, residual_g = row - wa, col - wb
        P0 = P.detach()
        mask_f = (a.detach() > 0).to(acc)
        mask_g = (b.detach() > 0).to(acc)
        def plan_times(u, v):
            return torch.bmm(P0, v[:, :, None])[..., 0], torch.bmm(P0.transpose(1, 2), u[:, :, None])[..., 0]

        u, v = _conjugate_gradient(plan_times, row.detach(), col.detach(), grad_f, grad_g, mask_f, mask_g, eps)
        inputs = [t for t, need in zip((c, wa, wb), ctx.needs_input_grad[:3]) if need]
        grads = iter(torch.autograd.grad((residual_f, residual_g), inputs, (-u, -v), allow_unused=True) if inputs
                     else ())  # fmt: skip
        out = [next(grads) if need else None for need in ctx.needs_input_grad[:3]]
        if out[0] is not None:
            out[0] = out[0].to(cost.dtype)
        return out[0], out[1], out[2], None, None, None


class _ImplicitPotentialsOfPoints(torch.autograd.Function):
    """The same for point clouds, with no n x m matrix: P v and P^T u are fastloss transport passes with
    per-source weights, and the parameter gradients are transport passes with the point gradient:
      dx_k = (u_k sum_j P_kj grad_x c_kj + sum_j v_j P_kj grad_x c_kj) / eps, likewise for y;
      da_k = -(u_k (r_k - 1) + sum_j v_j b_j e^((f_k + g_j - c_kj)/eps)), r_k = sum_j b_j e^(...),
    which is -(d/da of u.F_rows + v.F_cols)."""

    @staticmethod
    def forward(ctx, x, y, a, b, f, g, problem: Problem, eps: float):
        ctx.problem, ctx.eps = problem, eps
        ctx.save_for_backward(a, b, f, g, x, y)
        return f.clone(), g.clone()

    @staticmethod
    def backward(ctx, grad_f, grad_g):
        from . import _ops

        problem, eps = ctx.problem, ctx.eps
        a, b, f, g, x, y = ctx.saved_tensors
        grad_f = torch.zeros_like(f) if grad_f is None else grad_f.to(f.dtype)
        grad_g = torch.zeros_like(g) if grad_g is None else grad_g.to(g.dtype)
        geometry = (None, x.detach(), y.detach())
        la, lb, p = problem.log_a, problem.log_b, problem.p

        def transport(transpose, with_grad=False, weight=None, log_a=la, log_b=lb):
            return _ops.transport(*geometry, f, g, log_a, log_b, p, eps, transpose, with_grad, weight)

        row_mass = transport(False)[0]
        col_mass = transport(True)[0]

        def plan_times(u, v):
            return transport(False, weight=v)[0], transport(True, weight=u)[0]

        mask_f = (a.detach() > 0).to(f.dtype)
        mask_g = (b.detach() > 0).to(g.dtype)
        u, v = _conjugate_gradient(plan_times, row_mass, col_mass, grad_f, grad_g, mask_f, mask_g, eps)
        need = ctx.needs_input_grad
        grads = [None] * 8
        if need[0]:
            grads[0] = (u[:, :, None] * transport(False, True)[2] + transport(False, True, v)[2]) / eps
        if need[1]:
            grads[1] = (v[:, :, None] * transport(True, True)[2] + transport(True, True, u)[2]) / eps
        if need[2]:  # the same products with a = 1 (log-weight 0): ratios and weighted sums per unit mass
            unit = torch.zeros_like(la)
            ratio = transport(False, log_a=unit)[0]
            grads[2] = -(u * (ratio - 1) + transport(False, weight=v, log_a=unit)[0])
        if need[3]:
            unit = torch.zeros_like(lb)
            ratio = transport(True, log_b=unit)[0]
            grads[3] = -(v * (ratio - 1) + transport(True, weight=u, log_b=unit)[0])
        return tuple(grads)


def potentials(problem: Problem, eps: float, f: torch.Tensor, g: torch.Tensor):
    """f and g as differentiable functions of C (or x, y), a and b."""
    if problem.p != 0:
        return _ImplicitPotentialsOfPoints.apply(problem.x, problem.y, problem.a, problem.b, f, g, problem, eps)
    return _ImplicitPotentials.apply(problem.cost, problem.a, problem.b, f, g, eps)


def points_plan(problem: Problem, eps: float, f: torch.Tensor, g: torch.Tensor):
    """The plan of point clouds and their cost matrix as differentiable torch expressions (n x m)."""
    sq = (problem.x[:, :, None, :] - problem.y[:, None, :, :]).square().sum(-1)
    positive = sq > 0  # |x - y| has no gradient at 0: take the 0 subgradient, as the kernels do
    cost = 0.5 * sq if problem.p == 2 else torch.where(positive, sq, 1).sqrt() * positive
    return _dense_plan(cost, problem.a, problem.b, f, g, eps), cost
