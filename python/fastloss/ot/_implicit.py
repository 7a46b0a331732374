"""Implicit differentiation of Sinkhorn's potentials (cost matrices only).

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


def _conjugate_gradient(P, row_mass, col_mass, rhs_f, rhs_g, mask_f, mask_g, eps):
    """Solves J (u, v) = (rhs_f, rhs_g) on the support masks, orthogonal to the gauge direction."""
    tiny = torch.finfo(P.dtype).tiny

    def apply(u, v):
        return ((row_mass * u + torch.bmm(P, v[:, :, None])[..., 0]) / eps * mask_f,
                (col_mass * v + torch.bmm(P.transpose(1, 2), u[:, :, None])[..., 0]) / eps * mask_g)  # fmt: skip

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
    target = (rf.square().sum(-1) + rg.square().sum(-1)).sqrt() * (1e-10 if P.dtype == torch.float64 else 1e-6)
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
            row = P.sum(-1)
            col = P.sum(-2)
            residual_f, residual_g = row - wa, col - wb
        P0 = P.detach()
        mask_f = (a.detach() > 0).to(acc)
        mask_g = (b.detach() > 0).to(acc)
        u, v = _conjugate_gradient(P0, row.detach(), col.detach(), grad_f, grad_g, mask_f, mask_g, eps)
        inputs = [t for t, need in zip((c, wa, wb), ctx.needs_input_grad[:3]) if need]
        grads = iter(torch.autograd.grad((residual_f, residual_g), inputs, (-u, -v), allow_unused=True) if inputs
                     else ())  # fmt: skip
        out = [next(grads) if need else None for need in ctx.needs_input_grad[:3]]
        if out[0] is not None:
            out[0] = out[0].to(cost.dtype)
        return out[0], out[1], out[2], None, None, None


def potentials(problem: Problem, eps: float, f: torch.Tensor, g: torch.Tensor):
    """f and g as differentiable functions of C, a and b."""
    return _ImplicitPotentials.apply(problem.cost, problem.a, problem.b, f, g, eps)
