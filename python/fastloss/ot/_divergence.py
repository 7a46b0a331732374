"""The debiased Sinkhorn divergence between point clouds (Feydy et al. 2019; unbalanced: Sejourne
et al. 2019), from three point-cloud solves with envelope gradients."""

from __future__ import annotations

import torch

from .. import _validate as V
from ._inputs import point_exponent
from ._sinkhorn import sinkhorn_points


def sinkhorn_divergence(
    x: torch.Tensor,
    y: torch.Tensor,
    a: torch.Tensor | None = None,
    b: torch.Tensor | None = None,
    *,
    eps: float,
    p: int = 2,
    reach: float | None = None,
    max_iter: int = 1000,
    tol: float = 1e-6,
    check_every: int = 10,
    eps_scaling: float | None = None,
) -> torch.Tensor:
    """``S_eps(a, b) = OT_eps(a, b) - OT_eps(a, a) / 2 - OT_eps(b, b) / 2`` between the clouds x
    (n, d) with weights a and y (m, d) with weights b (or batches (B, n, d), (B, m, d)).

    S is symmetric, non-negative at convergence and exactly 0 when (x, a) and (y, b) are the same
    inputs; it interpolates between OT (eps -> 0) and an MMD (eps -> inf). The gradient wrt x, y
    (and a, b) is the envelope gradient of the three terms, with no unrolled iterations.

    Args:
        eps: entropic regularization, in cost units (GeomLoss's ``blur`` is ``eps ** (1 / p)``).
        p: 2 for the cost ``|x - y|^2 / 2``, 1 for ``|x - y|``.
        reach: unbalanced OT with the KL marginal penalty ``rho = reach ** p``; the masses of a and
            b may then differ and the term ``eps / 2 * (sum(a) - sum(b)) ** 2`` keeps S >= 0.
        max_iter, tol, check_every, eps_scaling: as in :func:`fastloss.ot.sinkhorn`.

    Returns S with shape () or (B,).
    """
    fn = "ot.sinkhorn_divergence"
    p = point_exponent(fn, p)
    rho = None
    if reach is not None:
        reach = V.real_number(fn, "reach", reach, positive=True)
        rho = reach**p
    options = dict(eps=eps, p=p, max_iter=max_iter, tol=tol, check_every=check_every, eps_scaling=eps_scaling, rho=rho)
    cross = sinkhorn_points(x, y, a, b, **options).cost
    self_x = sinkhorn_points(x, x, a, a, **options).cost
    self_y = sinkhorn_points(y, y, b, b, **options).cost
    divergence = cross - 0.5 * self_x - 0.5 * self_y
    if rho is not None:
        mass_x = x.new_tensor(1.0, dtype=divergence.dtype) if a is None else a.to(divergence.dtype).sum(-1)
        mass_y = y.new_tensor(1.0, dtype=divergence.dtype) if b is None else b.to(divergence.dtype).sum(-1)
        divergence = divergence + 0.5 * eps * (mass_x - mass_y) ** 2
    return divergence
