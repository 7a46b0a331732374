"""Float64 references of the 2-bit weight family, written from the format's definition
(``w = (q - z) * s`` per group of ``group_size`` input channels), and its self-check."""

from __future__ import annotations

import torch

from .. import quant as kernels
from .._registry import SelfCheck, register_self_check, relative_error


def dense_weight(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """(N, K) float64 weight from codes (N, K), scales (N, G) and zeros (N, G)."""
    cols = codes.shape[1]
    group = torch.arange(cols, device=codes.device) // group_size
    q = codes.double()
    return (q - zeros.double()[:, group]) * scales.double()[:, group]


def matmul(x: torch.Tensor, codes, scales, zeros, group_size: int, bias=None) -> torch.Tensor:
    """x (..., K) times the float64 weight, plus bias, in float64."""
    y = x.double() @ dense_weight(codes, scales, zeros, group_size).t()
    return y + bias.double() if bias is not None else y


def _self_check(device: torch.device, dtype: torch.dtype) -> tuple[float, float]:
    generator = torch.Generator(device="cpu").manual_seed(7)
    weight = torch.randn(200, 320, generator=generator)
    qw = kernels.quantize(weight, frac_4bit=0.25, group_size=64, scale_dtype=torch.bfloat16 if dtype == torch.bfloat16 else torch.float16)
    qw = qw.to(device)
    x = torch.randn(5, 320, generator=generator).to(device, dtype)
    actual = kernels.matmul(x, qw)
    expected = matmul(x, qw.codes(), qw.scale_matrix(), qw.zero_matrix(), qw.group_size)
    # float32 sums of exact products; the output rounding to dtype dominates
    return relative_error(actual, expected), (2e-3 if dtype == torch.float16 else 4e-3)


register_self_check(SelfCheck("quant.matmul", _self_check, dtypes=(torch.float16, torch.bfloat16)))
