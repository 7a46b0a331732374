"""Float64 reference of the factored output layer: a dense ``torch.nn.Linear`` (no bias) trained by
``torch.optim.SGD`` on the same loss, with losses written plainly on the dense outputs."""

from __future__ import annotations

import torch

from .._registry import SelfCheck, register_self_check
from . import spherical as dense


def sample_losses(o, target, target_weight=None, *, loss="zloss", a=1.0, b=0.0, eps=None, ignore_index=-100):
    """Per-sample loss of dense outputs o (m, D) against target (m, K): for "mse" ||o - y||^2 with
    y = sum_k w_k e_{c_k}; otherwise sum_k w_k F(o, c_k). Samples with no target entry give 0."""
    o = o.double()
    w = torch.ones(target.shape, dtype=torch.float64) if target_weight is None else target_weight.double().cpu()
    target, o_cpu_device = target.cpu(), o.device
    keep = target != ignore_index
    if loss == "mse":
        y = torch.zeros(o.shape, dtype=torch.float64).scatter_add_(1, torch.where(keep, target, 0), torch.where(keep, w, 0.0))
        per_sample = ((o - y.to(o_cpu_device)) ** 2).sum(1)
    else:
        per_sample = torch.zeros(o.shape[0], dtype=torch.float64, device=o_cpu_device)
        for k in range(target.shape[1]):
            column = target[:, k].to(o_cpu_device)
            if loss == "zloss":
                f = dense.zloss(o, column, a=a, b=b, eps=1e-12 if eps is None else eps, reduction="none", ignore_index=ignore_index)
            elif loss == "spherical_softmax":
                f = dense.spherical_softmax_loss(o, column, eps=1e-6 if eps is None else eps, reduction="none", ignore_index=ignore_index)
            else:
                f = dense.taylor_softmax_loss(o, column, reduction="none", ignore_index=ignore_index)
            per_sample = per_sample + w[:, k].to(o_cpu_device) * f
    return torch.where(keep.any(1).to(o_cpu_device), per_sample, torch.zeros_like(per_sample))


class DenseSGD:
    """The dense layer the factored one must match: W (D, d) float64, trained by torch.optim.SGD."""

    def __init__(self, weight, *, lr, weight_decay=0.0, reduction="mean", **loss_kwargs):
        self.linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, dtype=torch.float64)
        with torch.no_grad():
            self.linear.weight.copy_(weight.double().cpu())
        self.optimizer = torch.optim.SGD(self.linear.parameters(), lr=lr, weight_decay=weight_decay)
        self.reduction = reduction
        self.loss_kwargs = loss_kwargs

    @property
    def weight(self):
        return self.linear.weight.detach()

    def step(self, h, target, target_weight=None, grad_weights=None):
        """One step; returns (loss, dL/dh). ``grad_weights`` weigh the samples of reduction="none"."""
        h = h.detach().double().cpu().requires_grad_()
        per_sample = sample_losses(self.linear(h), target, target_weight, **self.loss_kwargs)
        keep = (target.cpu() != self.loss_kwargs.get("ignore_index", -100)).any(1)
        if self.reduction == "mean":
            out = per_sample.sum() / keep.sum()
            objective = out
        elif self.reduction == "sum":
            out = objective = per_sample.sum()
        else:
            out = per_sample
            objective = (per_sample * grad_weights.double().cpu()).sum()
        self.optimizer.zero_grad()
        objective.backward()
        self.optimizer.step()
        return out.detach(), h.grad


def _self_check_output_layer(device: torch.device, dtype: torch.dtype) -> tuple[float, float]:
    """Five steps of SphericalOutputLayer (V and state in ``dtype``) against dense SGD: the error of W."""
    from .._registry import relative_error
    from ..nn.spherical_output import SphericalOutputLayer

    generator = torch.Generator().manual_seed(0)
    classes, features, samples = 1003, 24, 13  # not multiples of any tile
    torch.manual_seed(0)
    layer = SphericalOutputLayer(features, classes, loss="zloss", lr=0.5, dtype=dtype, state_dtype=dtype, device=device)
    dense = DenseSGD(layer.weight, lr=0.5, loss="zloss")
    for _ in range(5):
        h = torch.randn(samples, features, generator=generator, dtype=torch.float64)
        target = torch.randint(0, classes, (samples, 2), generator=generator)
        layer(h.to(device, dtype), target.to(device)).backward()
        dense.step(h, target)
    return relative_error(layer.weight, dense.weight), (1e-10 if dtype == torch.float64 else 1e-4)


register_self_check(SelfCheck(name="SphericalOutputLayer", run=_self_check_output_layer, dtypes=(torch.float32, torch.float64)))
