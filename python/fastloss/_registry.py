"""Self-checks that ``python -m fastloss`` runs: each family registers its own from
``fastloss/reference/<family>.py``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class SelfCheck:
    name: str
    # run(device, dtype) -> (relative error against the float64 reference, tolerance)
    run: Callable[[torch.device, torch.dtype], tuple[float, float]]
    dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16, torch.float64)
    # Device types the family has kernels for (a family may be CPU-only while its CUDA kernels are written).
    devices: tuple[str, ...] = ("cpu", "cuda")


SELF_CHECKS: list[SelfCheck] = []


def register_self_check(check: SelfCheck) -> SelfCheck:
    SELF_CHECKS.append(check)
    return check


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| in float64; NaN anywhere gives inf."""
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    if not bool(torch.isfinite(actual).all()) and not bool(torch.equal(torch.isnan(actual), torch.isnan(expected))):
        return float("inf")
    actual, expected = torch.nan_to_num(actual), torch.nan_to_num(expected)
    scale = float(expected.norm())
    return float((actual - expected).norm()) / (scale if scale > 0 else 1.0)
