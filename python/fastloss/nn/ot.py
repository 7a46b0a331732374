"""Modules of the optimal-transport family: Sinkhorn losses between point clouds."""

from __future__ import annotations

import torch

from .. import _validate as V
from .. import ot as F

__all__ = ["SinkhornLoss", "SinkhornDivergence"]


class _PointCloudLoss(torch.nn.Module):
    def __init__(self, eps: float, p: int = 2, *, max_iter: int = 1000, tol: float = 1e-6, check_every: int = 10,
                 eps_scaling: float | None = None) -> None:  # fmt: skip
        super().__init__()
        self.eps, self.p, self.max_iter, self.tol = eps, p, max_iter, tol
        self.check_every, self.eps_scaling = check_every, eps_scaling

    def extra_repr(self) -> str:
        return f"eps={self.eps}, p={self.p}, max_iter={self.max_iter}, tol={self.tol}"

    def _options(self) -> dict:
        return dict(eps=self.eps, p=self.p, max_iter=self.max_iter, tol=self.tol, check_every=self.check_every,
                    eps_scaling=self.eps_scaling)  # fmt: skip


class SinkhornLoss(_PointCloudLoss):
    """The entropic OT value ``OT_eps(a, b)`` between point clouds (``fastloss.ot.sinkhorn_points``'s
    ``cost``), with envelope gradients. ``reduction`` over a batch: "mean", "sum" or "none"."""

    def __init__(self, eps: float, p: int = 2, *, rho: float | None = None, reduction: str = "mean", **options) -> None:
        super().__init__(eps, p, **options)
        self.rho, self.reduction = rho, V.reduction("nn.SinkhornLoss", reduction)

    def forward(self, x, y, a=None, b=None) -> torch.Tensor:
        value = F.sinkhorn_points(x, y, a, b, rho=self.rho, **self._options()).cost
        return _reduce(value, self.reduction)


class SinkhornDivergence(_PointCloudLoss):
    """The debiased Sinkhorn divergence ``S_eps`` (``fastloss.ot.sinkhorn_divergence``), a loss that
    is 0 exactly when the two weighted clouds are the same; ``reach`` makes it unbalanced."""

    def __init__(self, eps: float, p: int = 2, *, reach: float | None = None, reduction: str = "mean",
                 **options) -> None:  # fmt: skip
        super().__init__(eps, p, **options)
        self.reach, self.reduction = reach, V.reduction("nn.SinkhornDivergence", reduction)

    def forward(self, x, y, a=None, b=None) -> torch.Tensor:
        value = F.sinkhorn_divergence(x, y, a, b, reach=self.reach, **self._options())
        return _reduce(value, self.reduction)


def _reduce(value: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return value.mean()
    if reduction == "sum":
        return value.sum()
    return value  # "none" (checked in __init__)
