"""2-bit LLM weights: mixed 2/4-bit groups in a memory-aligned layout, with fused matmul kernels.

``quantize`` turns a dense weight into a ``QuantizedWeight`` (asymmetric min-max groups along the
input channels; the K-blocks, column stripes of one group across every row, with the largest
range or Hessian-weighted sensitivity get 4 bits), ``matmul`` computes ``x @ W.T + bias`` from
the packed codes, and ``QuantLinear`` / ``quantize_model`` put it in a model. The packed format
is documented in ``docs/quant_format.md``; the kernels are in ``csrc/quant/``.
"""

from __future__ import annotations

import torch

from .. import _library as L
from . import _format, _ops, _quantizer
from ._format import FORMAT_VERSION, QuantizedWeight
from ._linear import QuantLinear, quantize_model

__all__ = ["quantize", "dequantize", "matmul", "QuantizedWeight", "QuantLinear", "quantize_model", "FORMAT_VERSION"]
# The family's names stay under fastloss.quant: fastloss.matmul would read as a dense matmul.
__fastloss_exports__: tuple[str, ...] = ()


def quantize(
    weight: torch.Tensor,
    *,
    bits: int = 2,
    group_size: int = 128,
    frac_4bit: float = 0.1,
    select: str = "range",
    hessian: torch.Tensor | None = None,
    clip: str = "minmax",
    scale_dtype: torch.dtype | None = None,
    double_quant: bool = False,
) -> QuantizedWeight:
    """Quantize a (out_features, in_features) weight.

    Args:
        bits: 2 (the K-blocks are 2-bit, ``frac_4bit`` of them 4-bit) or 4 (every K-block 4-bit).
        group_size: input channels per group, a power of two >= 64; K need not be a multiple.
        frac_4bit: fraction of K-blocks stored in 4 bits when ``bits=2`` (rounded to a count).
        select: how the 4-bit K-blocks are chosen: "range" (largest sum over rows of the squared
            group range), "hessian" (largest diag(H)-weighted 2-bit error; needs ``hessian``: the
            (K, K) matrix H = X^T X, its diagonal (K,), or calibration activations (..., K)), or
            "random" (a baseline).
        clip: "minmax" or "mse" (per-group shrink of the range that minimizes the squared error).
        scale_dtype: float16 or bfloat16; the CUDA kernel needs it to be the activations' dtype.
            Default: the weight's dtype when it is one of those, else float16.
        double_quant: second-order quantization of the scales; not in format version 1 (raises).

    The weight is ``w = (q - z) * s`` per group (see ``QuantizedWeight``).
    """
    fn = "fastloss.quant.quantize"
    if bits not in (2, 4):
        raise ValueError(f"{fn}: 'bits' must be 2 or 4, got {bits!r}")
    if double_quant:
        raise ValueError(f"{fn}: 'double_quant' (second-order quantized scales) is not part of format version "
                         f"{FORMAT_VERSION}; the scales are stored in float16/bfloat16")  # fmt: skip
    if isinstance(frac_4bit, bool) or not isinstance(frac_4bit, (int, float)) or not 0.0 <= float(frac_4bit) <= 1.0:
        raise ValueError(f"{fn}: 'frac_4bit' must be in [0, 1], got {frac_4bit!r}")
    if scale_dtype is None:
        scale_dtype = weight.dtype if isinstance(weight, torch.Tensor) and weight.dtype in _format.SCALE_TYPES else torch.float16
    weight = _quantizer._check_weight(weight)
    group_size = _quantizer._check_group_size(group_size)
    groups = -(-weight.shape[1] // group_size)
    if bits == 4:
        _quantizer._check_choice("select", select, _quantizer.SELECTS)  # unused, but a typo is still an error
        four = torch.ones(groups, dtype=torch.bool, device=weight.device)
    else:
        extra = {"hessian": hessian} if hessian is not None else {}
        scores = _quantizer.block_scores(weight, group_size=group_size, select=select, scale_dtype=scale_dtype, **extra)
        four = _quantizer.choose_4bit_blocks(scores, float(frac_4bit))
    group_bits = torch.where(four, 4, 2).to(torch.int32)
    codes, scales, zeros = _quantizer.quantize_groups(
        weight, group_size=group_size, group_bits=group_bits, clip=clip, scale_dtype=scale_dtype
    )
    return QuantizedWeight.from_codes(codes[:, : weight.shape[1]], scales, zeros, group_bits, group_size)


def dequantize(qw: QuantizedWeight, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """The dense (out_features, in_features) weight in ``dtype``: ``round((q - z) * s)``, the
    product exact in float32 and rounded once, so CPU and CUDA agree bit for bit."""
    if not isinstance(qw, QuantizedWeight):
        raise TypeError(f"fastloss.quant.dequantize: 'qw' must be a QuantizedWeight, got {type(qw).__name__}")
    return qw.dequantize(dtype)


def matmul(x: torch.Tensor, qw: QuantizedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W.T + bias`` for x (..., in_features) with W the quantized weight.

    CUDA: x must be float16 or bfloat16, the dtype of ``qw``'s scales (``qw.to(dtype)``). CPU:
    float32, float16 or bfloat16. The sum runs in float32 and each group's sum is scaled once,
    so the result is x times the exact (q - z) * s. Differentiable in x and bias.
    """
    if not isinstance(qw, QuantizedWeight):
        raise TypeError(f"fastloss.quant.matmul: 'qw' must be a QuantizedWeight, got {type(qw).__name__}")
    return packed_linear(x, qw.main, qw.side, qw.side_index, qw.scales, qw.zeros, bias, qw.shape, qw.group_size,
                         cache_owner=qw)


def packed_linear(x, main, side, side_index, scales, zeros, bias, shape, group_size: int, *,
                  cache_owner=None) -> torch.Tensor:
    """``matmul`` on the arrays of a QuantizedWeight (what QuantLinear calls: no Python object is
    built, so torch.compile traces it whole). ``cache_owner`` (the QuantizedWeight or module the arrays
    belong to) keeps the checked arrays between calls: plain eager calls then check only x and bias."""
    fn = "fastloss.quant.matmul"
    out_features, in_features = shape
    if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[-1] != in_features:
        raise ValueError(f"{fn}: 'x' must end in in_features={in_features}, got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")  # fmt: skip
    if x.device != main.device:
        raise ValueError(f"{fn}: 'x' is on {x.device} but the QuantizedWeight is on {main.device}; move one (qw.to(device))")
    on_gpu = L.is_cuda(x)
    allowed = (scales.dtype,) if on_gpu else _ops.CPU_TYPES
    if x.dtype not in allowed:
        where = "cuda" if on_gpu else x.device.type
        if not x.is_floating_point() or x.dtype not in _format.SCALE_TYPES:
            # Integer (token ids?) or float32/64 activations: the fix is on x's side.
            hint = (f"convert the activations: x.to({scales.dtype})" + ("" if x.is_floating_point() else
                    "; integer x are usually token ids, which need an embedding before a linear layer"))  # fmt: skip
        else:
            hint = f"the CUDA kernel needs the scales' dtype {scales.dtype}: x.to({scales.dtype}), or qw.to({x.dtype})"
        raise ValueError(f"{fn}: 'x' is {x.dtype}; on {where} it must be one of {allowed} ({hint})")
    if bias is not None and (bias.shape != (out_features,) or bias.dtype != x.dtype or bias.device != x.device):
        raise ValueError(f"{fn}: 'bias' must be a {x.dtype} vector of {out_features} on {x.device}")
    x2 = x.reshape(-1, in_features) if x.dim() != 2 else x
    # The packed arrays never need a gradient and share x's device (checked when prepared).
    path = L.direct_path((x,) if bias is None else (x, bias))
    if path is not None:
        arrays = (main, side, side_index, scales, zeros)
        weight = _ops.prepared(cache_owner, *arrays, out_features, in_features, group_size)
        y = _ops.run_matmul(path, x2, arrays, weight, bias)
    else:
        y = _ops.quant_matmul(x2, main, side, side_index, scales, zeros, bias, out_features, in_features, group_size)
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], out_features)
