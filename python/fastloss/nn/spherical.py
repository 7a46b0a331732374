"""Modules for the spherical-family losses (see :mod:`fastloss.spherical`)."""

from __future__ import annotations

import torch

from .. import spherical as F
from .spherical_output import SphericalOutputLayer

__all__ = ["ZLoss", "SphericalSoftmaxLoss", "TaylorSoftmaxLoss", "SphericalOutputLayer"]


class _ClassificationLoss(torch.nn.Module):
    def __init__(self, reduction: str = "mean", ignore_index: int = -100) -> None:
        super().__init__()
        self.reduction = reduction
        self.ignore_index = ignore_index

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}, ignore_index={self.ignore_index}"


class ZLoss(_ClassificationLoss):
    """Module form of :func:`fastloss.zloss` (the shift- and scale-invariant Z-loss, not PaLM's z-loss)."""

    def __init__(self, a: float = 1.0, b: float = 0.0, eps: float = 1e-12, reduction: str = "mean", ignore_index: int = -100) -> None:
        super().__init__(reduction, ignore_index)
        self.a, self.b, self.eps = a, b, eps

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The Z-loss of logits ``input`` (..., D) against class indices ``target`` (...) int64; see :func:`fastloss.zloss`."""
        return F.zloss(input, target, a=self.a, b=self.b, eps=self.eps, reduction=self.reduction, ignore_index=self.ignore_index)

    def extra_repr(self) -> str:
        return f"a={self.a}, b={self.b}, eps={self.eps}, " + super().extra_repr()


class SphericalSoftmaxLoss(_ClassificationLoss):
    """Module form of :func:`fastloss.spherical_softmax_loss`."""

    def __init__(self, eps: float = 1e-6, reduction: str = "mean", ignore_index: int = -100) -> None:
        super().__init__(reduction, ignore_index)
        self.eps = eps

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The spherical-softmax loss of ``input`` (..., D) against ``target`` (...) int64; see
        :func:`fastloss.spherical_softmax_loss`."""
        return F.spherical_softmax_loss(input, target, eps=self.eps, reduction=self.reduction, ignore_index=self.ignore_index)

    def extra_repr(self) -> str:
        return f"eps={self.eps}, " + super().extra_repr()


class TaylorSoftmaxLoss(_ClassificationLoss):
    """Module form of :func:`fastloss.taylor_softmax_loss`."""

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The Taylor-softmax loss of ``input`` (..., D) against ``target`` (...) int64; see
        :func:`fastloss.taylor_softmax_loss`."""
        return F.taylor_softmax_loss(input, target, reduction=self.reduction, ignore_index=self.ignore_index)
