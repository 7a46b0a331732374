"""Float64 references for fastloss.ot, written plainly in PyTorch from the formulas (materialized
n x m matrices, Python loops): the log-domain Sinkhorn loop (unrolled, so autograd through it is the
"differentiate every iteration" baseline), the plan, the dual value, SwAV's kernel-domain
Sinkhorn-Knopp and the quadratic-OT plan of dual variables. Also the "plain PyTorch" peer of the
benchmarks."""

from __future__ import annotations

import math

import torch

from .. import ot as kernels
from .._registry import SelfCheck, register_self_check, relative_error


def sq_euclidean_half(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """|x_i - y_j|^2 / 2 from differences (no norm expansion), (..., n, m)."""
    return 0.5 * (x[..., :, None, :] - y[..., None, :, :]).square().sum(-1)


def euclidean(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (x[..., :, None, :] - y[..., None, :, :]).square().sum(-1).sqrt()


def sinkhorn_log(C, a, b, eps: float, n_iter: int, f=None, g=None, rho: float | None = None):
    """n_iter log-domain iterations f <- softmin_j(g), g <- softmin_i(f) (damped by rho / (rho + eps)
    when unbalanced), from zero potentials; differentiable by autograd through every iteration."""
    log_a, log_b = a.log(), b.log()
    f = torch.zeros_like(a) if f is None else f
    g = torch.zeros_like(b) if g is None else g
    damping = 1.0 if rho is None else rho / (rho + eps)
    for _ in range(n_iter):
        f = -damping * eps * torch.logsumexp((g[..., None, :] - C) / eps + log_b[..., None, :], dim=-1)
        g = -damping * eps * torch.logsumexp((f[..., :, None] - C) / eps + log_a[..., :, None], dim=-2)
    return f, g


def plan(C, a, b, f, g, eps: float) -> torch.Tensor:
    return a[..., :, None] * b[..., None, :] * torch.exp((f[..., :, None] + g[..., None, :] - C) / eps)


def dual_value(C, a, b, f, g, eps: float, rho: float | None = None) -> torch.Tensor:
    """<a, phi(f)> + <b, phi(g)> - eps (sum P - sum a sum b), phi = identity (balanced) or
    rho (1 - exp(-./rho)) (unbalanced)."""
    phi = (lambda t: t) if rho is None else (lambda t: rho * (1 - torch.exp(-t / rho)))
    mass = plan(C, a, b, f, g, eps).sum((-2, -1))
    return (a * phi(f)).sum(-1) + (b * phi(g)).sum(-1) - eps * (mass - a.sum(-1) * b.sum(-1))


def swav_sinkhorn_knopp(scores: torch.Tensor, eps: float = 0.05, n_iter: int = 3) -> torch.Tensor:
    """SwAV's distributed_sinkhorn on one process, in the kernel (exponential) domain."""
    Q = torch.exp(scores / eps).t()
    Q = Q / Q.sum()
    K, B = Q.shape
    for _ in range(n_iter):
        Q = Q / Q.sum(1, keepdim=True) / K
        Q = Q / Q.sum(0, keepdim=True) / B
    return (Q * B).t()


def swav_sinkhorn_log(scores: torch.Tensor, eps: float = 0.05, n_iter: int = 3) -> torch.Tensor:
    """The same normalizations on log Q = scores / eps with logsumexp: finite for any scores."""
    log_q = scores / eps
    B, K = scores.shape
    for _ in range(n_iter):
        log_q = log_q - torch.logsumexp(log_q, 0, keepdim=True) - math.log(K)
        log_q = log_q - torch.logsumexp(log_q, 1, keepdim=True) - math.log(B)
    return torch.exp(log_q + math.log(B))


def sparse_dual_value(C, a, b, alpha, beta, gamma: float, k: int | None) -> torch.Tensor:
    """The sparsity-constrained quadratic-OT dual <alpha, a> + <beta, b> - sum_j delta_k(alpha + beta_j - C_j),
    delta_k(z) = 1/(2 gamma) * sum of [z_i]_+^2 over the k largest z_i of the column (all when k is None)."""
    z = alpha[:, None] + beta[None, :] - C
    if k is not None and k < z.shape[0]:
        z = z.topk(k, dim=0).values
    return (alpha * a).sum() + (beta * b).sum() - z.clamp_min(0).square().sum() / (2 * gamma)


def _self_check(device: torch.device, dtype: torch.dtype) -> tuple[float, float]:
    generator = torch.Generator(device="cpu").manual_seed(11)
    x = torch.randn(37, 3, generator=generator, dtype=torch.float64)
    y = torch.randn(29, 3, generator=generator, dtype=torch.float64) + 0.5
    eps = 0.5
    C = sq_euclidean_half(x, y)
    a = torch.full((37,), 1 / 37, dtype=torch.float64)
    b = torch.full((29,), 1 / 29, dtype=torch.float64)
    f, g = sinkhorn_log(C, a, b, eps, 300)
    expected = dual_value(C, a, b, f, g, eps)
    actual = kernels.sinkhorn_points(x.to(device, dtype), y.to(device, dtype), eps=eps, tol=1e-7).cost
    return relative_error(actual, expected), (1e-9 if dtype == torch.float64 else 2e-2 if dtype == torch.bfloat16 else 1e-5)


register_self_check(SelfCheck("ot.sinkhorn_points", _self_check))
