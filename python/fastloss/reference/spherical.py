"""Plain-PyTorch references for the spherical-family losses.

``compute_dtype=torch.float64`` gives the float64 reference the tests and self-checks use;
``compute_dtype=torch.float32`` is the composition a user would write by hand, which the
benchmarks time eagerly and under ``torch.compile``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import spherical as kernels
from .._registry import SelfCheck, register_self_check, relative_error


def _rows(logits: torch.Tensor, target: torch.Tensor, ignore_index: int, compute_dtype: torch.dtype):
    o = logits.to(compute_dtype)
    keep = target != ignore_index
    o_target = o.gather(-1, torch.where(keep, target, 0).unsqueeze(-1)).squeeze(-1)
    return o, o_target, keep


def _reduce(per_row: torch.Tensor, keep: torch.Tensor, reduction: str) -> torch.Tensor:
    per_row = torch.where(keep, per_row, torch.zeros_like(per_row))
    if reduction == "none":
        return per_row
    if reduction == "sum":
        return per_row.sum()
    return per_row.sum() / keep.sum()


def zloss(logits, target, *, a=1.0, b=0.0, eps=1e-12, reduction="mean", ignore_index=-100, compute_dtype=torch.float64):
    o, o_target, keep = _rows(logits, target, ignore_index, compute_dtype)
    mean = o.mean(-1)
    sigma = torch.sqrt(((o - mean.unsqueeze(-1)) ** 2).mean(-1) + eps)
    z = (o_target - mean) / sigma
    return _reduce(F.softplus(a * (b - z)) / a, keep, reduction)


def spherical_softmax_loss(logits, target, *, eps=1e-6, reduction="mean", ignore_index=-100, compute_dtype=torch.float64):
    o, o_target, keep = _rows(logits, target, ignore_index, compute_dtype)
    per_row = torch.log((o * o + eps).sum(-1)) - torch.log(o_target * o_target + eps)
    return _reduce(per_row, keep, reduction)


def taylor_softmax_loss(logits, target, *, reduction="mean", ignore_index=-100, compute_dtype=torch.float64):
    o, o_target, keep = _rows(logits, target, ignore_index, compute_dtype)

    def t(x):
        return 1 + x + 0.5 * x * x

    per_row = torch.log(t(o).sum(-1)) - torch.log(t(o_target))
    return _reduce(per_row, keep, reduction)


# (fastloss function, reference function, keyword arguments) for every loss of the family.
LOSSES = {
    "zloss": (kernels.zloss, zloss, {"a": 1.5, "b": 0.5}),
    "spherical_softmax_loss": (kernels.spherical_softmax_loss, spherical_softmax_loss, {"eps": 1e-6}),
    "taylor_softmax_loss": (kernels.taylor_softmax_loss, taylor_softmax_loss, {}),
}


def _self_check(name: str):
    fast, ref, kwargs = LOSSES[name]

    def run(device: torch.device, dtype: torch.dtype) -> tuple[float, float]:
        generator = torch.Generator().manual_seed(0)
        rows, classes = 37, 5003  # neither a multiple of any tile
        logits = (torch.randn(rows, classes, generator=generator) * 3 + 1).to(dtype)
        target = torch.randint(0, classes, (rows,), generator=generator)
        target[::7] = -100
        weights = torch.rand(rows, generator=generator, dtype=torch.float64)
        # Separate leaves: for float64 CPU logits .double() and .to(device) would return `logits` itself.
        expected_logits = logits.double().clone().requires_grad_()
        expected = ref(expected_logits, target, reduction="none", **kwargs)
        (expected * weights).sum().backward()
        actual_logits = logits.to(device).clone().requires_grad_()
        actual = fast(actual_logits, target.to(device), reduction="none", **kwargs)
        (actual.double() * weights.to(device)).sum().backward()
        error = max(relative_error(actual, expected), relative_error(actual_logits.grad, expected_logits.grad))
        tolerance = {torch.float64: 1e-10, torch.float32: 1e-4}.get(dtype, 1e-2)
        return error, tolerance

    return SelfCheck(name=name, run=run)


for _name in LOSSES:
    register_self_check(_self_check(_name))


from . import spherical_output  # noqa: E402,F401  (registers the output layer's self-check)
