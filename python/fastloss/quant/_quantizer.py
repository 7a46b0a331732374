"""Asymmetric min-max group quantization of a weight matrix with mixed 2/4-bit K-blocks, in plain torch.

Layout. A weight W of shape (N, K) is split along K (the input channels, the columns) into groups of
``group_size`` = g consecutive columns of one row. K is zero-padded to K_pad = ceil(K / g) * g, giving
G = K_pad // g groups per row. K-block j is column stripe j: group j of every row. The bit width is
uniform per K-block (every group of stripe j has ``group_bits[j]`` bits, 2 or 4), so a kernel can pick
one unpacking path per stripe for all N rows.

One group with b bits, L = 2^b - 1 levels, statistics over its valid columns only (k < K):
    lo = min(min(w), 0),  hi = max(max(w), 0)            the range always contains 0
    s  = (hi - lo) / L                                   clip="minmax"
         (hi - lo) * alpha / L, alpha from a grid        clip="mse": the alpha with least sum (w - w_hat)^2
    s  = round s to scale_dtype; s = 1 if that is 0      codes use this ROUNDED s, so dequantizing with the
                                                         stored scale gives exactly the w_hat optimised for
    z  = clamp(round(-lo / s), 0, L)
    q  = clamp(round(w / s) + z, 0, L)
    w_hat = (q - z) * s
Padded columns (k >= K) get q = z, so they dequantize to exactly 0.

Everything is computed in float32 on the weight's device; ``round`` is torch.round (half to even).
This module imports nothing from fastloss: it is the plain-torch math that ``fastloss.quant`` wraps.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple, Union

import torch

_FN = "fastloss.quant.quantize"
_DEQUANT_FN = "fastloss.quant.dequantize"

CLIPS = ("minmax", "mse")
SELECTS = ("range", "hessian", "random")
SCALE_DTYPES = (torch.float16, torch.bfloat16)
GROUP_BITS = (2, 4)

# clip="mse" tries the range shrunk by each of these factors: 1.0 first, so a group that no
# shrink improves keeps exactly its min-max quantization (ties keep the earlier, larger alpha).
MSE_ALPHAS = tuple(1.0 - 0.025 * i for i in range(21))  # 1.0, 0.975, ..., 0.5
MSE_CHUNK_ELEMENTS = 1 << 19  # weight entries per step of the clip search (2 MiB of float32)


# ----------------------------------------------------------------------------------------------
# argument checks: each raises ValueError naming the public function and the argument


def _describe(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return f"{type(value).__name__} {value!r}"


def _check_group_size(group_size: object, fn: str = _FN) -> int:
    # The same rule and wording as the packed format's check (csrc/quant/packed_layout.h): a group
    # must cover whole 64-column word tiles.
    ok = isinstance(group_size, int) and not isinstance(group_size, bool)
    ok = ok and group_size >= 64 and (group_size & (group_size - 1)) == 0
    if not ok:
        raise ValueError(
            f"{fn}: group_size must be a power of two >= 64 (the packed word tile is 64 columns), got {group_size!r}"
        )
    return group_size  # type: ignore[return-value]


def _check_weight(weight: object, fn: str = _FN) -> torch.Tensor:
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not weight.is_floating_point():
        got = _describe(weight)
        raise ValueError(f"{fn}: weight must be a 2-D floating point tensor (N, K), got {got}")
    if weight.numel() == 0:
        raise ValueError(f"{fn}: weight must not be empty, got shape {tuple(weight.shape)}")
    if not bool(torch.isfinite(weight).all()):
        raise ValueError(f"{fn}: weight must have finite values (found NaN or inf)")
    return weight


def _check_choice(name: str, value: object, allowed: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in allowed:
        options = ", ".join(repr(a) for a in allowed)
        raise ValueError(f"{_FN}: {name} must be one of {options}, got {value!r}")
    return value


def _check_scale_dtype(scale_dtype: object) -> torch.dtype:
    if scale_dtype not in SCALE_DTYPES:
        raise ValueError(f"{_FN}: scale_dtype must be torch.float16 or torch.bfloat16, got {scale_dtype!r}")
    return scale_dtype  # type: ignore[return-value]


def _check_group_bits(group_bits: object, G: int, device: torch.device) -> torch.Tensor:
    bits = torch.as_tensor(group_bits)
    if bits.dtype == torch.bool or bits.is_floating_point() or bits.is_complex() or bits.shape != (G,):
        raise ValueError(
            f"{_FN}: group_bits must be an integer tensor of shape (G,) = ({G},), "
            f"got a {bits.dtype} tensor of shape {tuple(bits.shape)}"
        )
    allowed = torch.isin(bits, torch.tensor(GROUP_BITS, dtype=bits.dtype, device=bits.device))
    if not bool(allowed.all()):
        bad = sorted(set(bits[~allowed].tolist()))
        raise ValueError(f"{_FN}: group_bits values must be 2 or 4, got {bad}")
    return bits.to(device)


# ----------------------------------------------------------------------------------------------
# core math on (N, G, g) group views


def _groups(weight: torch.Tensor, group_size: int) -> torch.Tensor:
    """W as float32 (N, G, g), zero-padded along K. Zero padding changes no statistic: the range
    already contains 0, a 0 codes to exactly z (round(0 / s) = 0), and so adds no squared error."""
    N, K = weight.shape
    G = -(-K // group_size)
    w = weight.to(torch.float32)
    if G * group_size != K:
        w = torch.nn.functional.pad(w, (0, G * group_size - K))
    return w.reshape(N, G, group_size)


def _range(wg: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-group (lo, hi) with 0 inside the range, each (N, G)."""
    return wg.amin(dim=-1).clamp(max=0.0), wg.amax(dim=-1).clamp(min=0.0)


def _scale_zero(
    lo: torch.Tensor, hi: torch.Tensor, levels: torch.Tensor, scale_dtype: torch.dtype
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Rounded scale (float32 holding a scale_dtype value) and zero point, each (N, G)."""
    s = ((hi - lo) / levels).to(scale_dtype).to(torch.float32)
    # An all-zero group (or one whose scale underflows scale_dtype) would divide by 0: any s
    # works there since every value codes to z, and 1 keeps the arithmetic finite.
    s = torch.where(s == 0, torch.ones_like(s), s)
    z = torch.round(-lo / s).clamp_(min=0.0).clamp_(max=levels)
    return s, z


def _codes(wg: torch.Tensor, s: torch.Tensor, z: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """q = clamp(round(w / s) + z, 0, L) as float32 (N, G, g)."""
    q = torch.round(wg / s.unsqueeze(-1)).add_(z.unsqueeze(-1))
    return q.clamp_(min=0.0).clamp_(max=levels.unsqueeze(-1))


def _squared_error(wg: torch.Tensor, s: torch.Tensor, z: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """sum over each group of (w - w_hat)^2, (N, G). Padded columns contribute exactly 0."""
    q = _codes(wg, s, z, levels)
    w_hat = q.sub_(z.unsqueeze(-1)).mul_(s.unsqueeze(-1))
    return w_hat.sub_(wg).square_().sum(dim=-1)


def _levels(bits: torch.Tensor) -> torch.Tensor:
    """L = 2^b - 1 per K-block as float32 (1, G), broadcast over rows."""
    return (2 ** bits.long() - 1).to(torch.float32)[None, :]


def _fit(
    wg: torch.Tensor, levels: torch.Tensor, clip: str, scale_dtype: torch.dtype
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(s, z) per group, each (N, G), for the given clip rule."""
    lo, hi = _range(wg)
    s, z = _scale_zero(lo, hi, levels, scale_dtype)
    if not bool(torch.isfinite(s).all()):
        raise ValueError(
            f"{_FN}: the range of some group of weight exceeds what a {scale_dtype} scale can hold "
            f"(max (hi - lo) / L = {float(((hi - lo) / levels).max()):.4g})"
        )
    if clip == "minmax":
        return s, z
    # The search makes ~8 passes per candidate over its input: on row chunks that stay in cache it
    # runs about 5x faster on CPU than on a whole 4096 x 4096 weight. Groups are independent, so
    # chunking changes no result.
    rows = max(1, MSE_CHUNK_ELEMENTS // (wg.shape[1] * wg.shape[2]))
    for r in range(0, wg.shape[0], rows):
        part = slice(r, r + rows)
        s[part], z[part] = _mse_search(wg[part], lo[part], hi[part], s[part], z[part], levels, scale_dtype)
    return s, z


def _mse_search(
    wg: torch.Tensor,
    lo: torch.Tensor,
    hi: torch.Tensor,
    s: torch.Tensor,
    z: torch.Tensor,
    levels: torch.Tensor,
    scale_dtype: torch.dtype,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per group, the (s, z) of the alpha in MSE_ALPHAS with the least squared error; (s, z) on entry
    are those of alpha = 1."""
    best_err = _squared_error(wg, s, z, levels)
    for alpha in MSE_ALPHAS[1:]:
        s_a, z_a = _scale_zero(lo * alpha, hi * alpha, levels, scale_dtype)
        err = _squared_error(wg, s_a, z_a, levels)
        better = err < best_err  # strict: on a tie the larger alpha, seen first, stays
        best_err = torch.where(better, err, best_err)
        s = torch.where(better, s_a, s)
        z = torch.where(better, z_a, z)
    return s, z


# ----------------------------------------------------------------------------------------------
# public functions


def quantize_groups(
    weight: torch.Tensor,
    *,
    group_size: int,
    group_bits: Union[torch.Tensor, Sequence[int]],
    clip: str = "minmax",
    scale_dtype: torch.dtype = torch.float16,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric min-max group quantization with a bit width per K-block.

    Args:
        weight: (N, K) floating point, finite; any dtype and device (computed in float32 there).
        group_size: g, consecutive input channels (columns) per group; a power of two >= 64.
        group_bits: integer tensor (G,), G = ceil(K / g), values 2 or 4: the bit width b of K-block j
            (column stripe j: group j of every row).
        clip: "minmax" or "mse".
        scale_dtype: torch.float16 or torch.bfloat16, the storage dtype of the scales.

    Each group uses its valid entries only (padded columns k >= K are ignored), L = 2^b - 1:
        lo = min(min(w), 0), hi = max(max(w), 0)   (the range always contains 0)
        clip="minmax": s = (hi - lo) / L.
        clip="mse": for alpha in MSE_ALPHAS (1.0 down to 0.5 in 20 steps) use lo * alpha, hi * alpha and
            keep, per group, the alpha with the least sum (w - w_hat)^2 over the group's valid entries
            (on a tie the larger alpha).
        s is rounded to scale_dtype; if it is or rounds to 0 (e.g. an all-zero group), s = 1. Codes are
            computed with the rounded s, so dequantizing with the stored scale is consistent.
        z = clamp(round(-lo / s), 0, L);  q = clamp(round(w / s) + z, 0, L);  w_hat = (q - z) * s.
        Padded columns (k >= K) get q = z, so they dequantize to exactly 0.

    Returns:
        codes: uint8 (N, K_pad), K_pad = G * g, one code per byte (unpacked).
        scales: scale_dtype (N, G).
        zeros: uint8 (N, G).

    Raises:
        ValueError: naming fastloss.quant.quantize and the argument at fault.
    """
    weight = _check_weight(weight)
    group_size = _check_group_size(group_size)
    clip = _check_choice("clip", clip, CLIPS)
    scale_dtype = _check_scale_dtype(scale_dtype)
    wg = _groups(weight, group_size)
    N, G, _ = wg.shape
    levels = _levels(_check_group_bits(group_bits, G, weight.device))
    s, z = _fit(wg, levels, clip, scale_dtype)
    codes = _codes(wg, s, z, levels).reshape(N, G * group_size).to(torch.uint8)
    return codes, s.to(scale_dtype), z.to(torch.uint8)


def dequantize_groups(
    codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, *, group_size: int, K: int
) -> torch.Tensor:
    """The plain reference dequantization: w_hat = (q - z) * s in float32, cropped to K columns.

    Args:
        codes: (N, K_pad) integer codes q (uint8 from quantize_groups), K_pad = G * group_size.
        scales: (N, G) scales s, any float dtype (upcast to float32).
        zeros: (N, G) zero points z.
        group_size: g, a power of two >= 64.
        K: the original number of columns, K_pad - g < K <= K_pad.

    Returns:
        float32 (N, K) on the device of codes.
    """
    group_size = _check_group_size(group_size, _DEQUANT_FN)
    if codes.dim() != 2 or scales.dim() != 2 or zeros.dim() != 2:
        raise ValueError(
            f"{_DEQUANT_FN}: codes, scales and zeros must be 2-D, got shapes "
            f"{tuple(codes.shape)}, {tuple(scales.shape)}, {tuple(zeros.shape)}"
        )
    N, K_pad = codes.shape
    G = K_pad // group_size
    if K_pad != G * group_size or scales.shape != (N, G) or zeros.shape != (N, G):
        raise ValueError(
            f"{_DEQUANT_FN}: with group_size={group_size}, codes (N, G * group_size) needs scales and zeros (N, G); "
            f"got codes {tuple(codes.shape)}, scales {tuple(scales.shape)}, zeros {tuple(zeros.shape)}"
        )
    if isinstance(K, bool) or not isinstance(K, int) or not (K_pad - group_size < K <= K_pad):
        raise ValueError(
            f"{_DEQUANT_FN}: K must be an int in ({K_pad - group_size}, {K_pad}] "
            f"for codes of {K_pad} columns, got {K!r}"
        )
    q = codes.to(torch.float32).reshape(N, G, group_size)
    w_hat = (q - zeros.to(torch.float32).unsqueeze(-1)) * scales.to(torch.float32).unsqueeze(-1)
    return w_hat.reshape(N, K_pad)[:, :K]


def _hessian_diag(hessian: object, K: int, device: torch.device) -> torch.Tensor:
    """diag(H) as float32 (K,) from H (K, K), diag(H) (K,) or activations X (..., K).

    The rule is by shape alone: 1-D -> diag(H); 2-D (K, K) -> H; anything else whose last dim is K ->
    activations, diag(H)_k = sum over rows of X_k^2. So K activation rows of K channels would read as
    H: pass them as (1, K, K)."""
    ok = isinstance(hessian, torch.Tensor) and hessian.is_floating_point() and hessian.dim() >= 1
    ok = ok and hessian.shape[-1] == K and (hessian.dim() != 1 or hessian.shape[0] == K)
    if not ok or hessian.numel() == 0:
        got = _describe(hessian)
        raise ValueError(
            f"{_FN}: select='hessian' needs hessian: a floating point (K, K) matrix H, its diagonal (K,), "
            f"or calibration activations (..., K), with K = {K}; got {got}"
        )
    h = hessian.to(device=device, dtype=torch.float32)
    if h.dim() == 1:
        diag = h
    elif h.dim() == 2 and h.shape[0] == K:
        diag = torch.diagonal(h)
    else:
        diag = h.reshape(-1, K).square().sum(dim=0)
    if not bool(torch.isfinite(diag).all()):
        raise ValueError(f"{_FN}: hessian must have finite values (found NaN or inf)")
    return diag


def block_scores(
    weight: torch.Tensor,
    *,
    group_size: int,
    select: str = "range",
    hessian: Optional[torch.Tensor] = None,
    generator: Optional[torch.Generator] = None,
    scale_dtype: torch.dtype = torch.float16,
) -> torch.Tensor:
    """Sensitivity of each K-block to being 2-bit: float32 (G,), larger = more deserving of 4-bit.

    With lo, hi per group as in quantize_groups (the range including 0):
        select="range":   score_j = sum_n (hi_nj - lo_nj)^2. The squared error of min-max
            quantization scales with range^2, hence the square.
        select="hessian": score_j = sum_{k in block j} diag(H)_k * sum_n (w_nk - w2hat_nk)^2, where
            w2hat is the 2-bit min-max dequantized weight (scales rounded to scale_dtype): the expected
            increase of the output error ||X W^T - X W_hat^T||^2 when block j is 2-bit, keeping only
            the diagonal of H = X^T X. ``hessian`` is H (K, K) (its diagonal is used), diag(H) (K,), or
            calibration activations X (..., K) with diag(H)_k = sum over rows of X_k^2. The rule is by
            shape alone: 1-D -> diag(H); 2-D (K, K) -> H; anything else with last dim K ->
            activations. K activation rows of K channels would therefore read as H: pass them as (1, K, K).
        select="random":  uniform [0, 1) scores from ``generator`` (the global RNG if None), for
            baselines and tests.

    Raises:
        ValueError: naming fastloss.quant.quantize and the argument at fault; `hessian` missing or of a
            wrong shape for select="hessian", or given for another select.
    """
    weight = _check_weight(weight)
    group_size = _check_group_size(group_size)
    select = _check_choice("select", select, SELECTS)
    scale_dtype = _check_scale_dtype(scale_dtype)
    if select != "hessian" and hessian is not None:
        # Refuse rather than ignore: a caller passing calibration data expects it to be used.
        raise ValueError(f"{_FN}: hessian is only used with select='hessian', got select={select!r}")
    K = weight.shape[1]
    wg = _groups(weight, group_size)
    G = wg.shape[1]
    if select == "random":
        # Drawn where the generator lives (a CUDA generator cannot fill a CPU tensor), then moved.
        device = generator.device if generator is not None else weight.device
        return torch.rand(G, generator=generator, device=device, dtype=torch.float32).to(weight.device)
    if select == "range":
        lo, hi = _range(wg)
        return (hi - lo).square().sum(dim=0)
    diag = _hessian_diag(hessian, K, weight.device)
    levels = torch.full((1, G), 3.0, device=weight.device)
    s, z = _fit(wg, levels, "minmax", scale_dtype)
    q = _codes(wg, s, z, levels)
    err = q.sub_(z.unsqueeze(-1)).mul_(s.unsqueeze(-1)).sub_(wg).square_().sum(dim=0)  # (G, g)
    diag = torch.nn.functional.pad(diag, (0, G * group_size - K)).reshape(G, group_size)
    return (err * diag).sum(dim=-1)


def choose_4bit_blocks(scores: torch.Tensor, frac_4bit: float) -> torch.Tensor:
    """bool (G,): True for the K-blocks that get 4 bits, the top round(frac_4bit * G) by score
    (rounded half up; ties broken by the lower index). frac_4bit must be in [0, 1]."""
    if isinstance(frac_4bit, bool) or not isinstance(frac_4bit, (int, float)) or not (0.0 <= frac_4bit <= 1.0):
        raise ValueError(f"{_FN}: frac_4bit must be a number in [0, 1], got {frac_4bit!r}")
    if not isinstance(scores, torch.Tensor) or scores.dim() != 1 or not scores.is_floating_point():
        raise ValueError(f"{_FN}: scores must be a 1-D floating point tensor (G,), got {_describe(scores)}")
    if not bool(torch.isfinite(scores).all()):
        raise ValueError(f"{_FN}: scores must have finite values (found NaN or inf)")
    G = scores.shape[0]
    count = int(math.floor(frac_4bit * G + 0.5))
    # A stable ascending sort of -scores keeps equal scores in index order, so ties go to lower j.
    order = torch.sort(-scores, stable=True).indices
    mask = torch.zeros(G, dtype=torch.bool, device=scores.device)
    mask[order[:count]] = True
    return mask
