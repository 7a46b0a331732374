"""Float64 reference of softplus attention, written from the formulas with the full seq x seq
matrix (fastloss.softplus_attention's docstring), and the self-check that compares the kernels with it."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .._library import is_cuda_device
from .._registry import SelfCheck, register_self_check, relative_error


def visibility(len_q: int, len_k: int, *, causal: bool, window: int | None, cu_seqlens=None, device=None):
    """(mask (len_q, len_k) bool, position of each row in its document): rows are aligned to the last
    keys; with cu_seqlens, positions count within each document and nothing crosses documents."""
    rows = torch.arange(len_q, device=device)
    keys = torch.arange(len_k, device=device)
    if cu_seqlens is None:
        row_pos = rows + (len_k - len_q)
        key_pos = keys
        same_doc = torch.ones(len_q, len_k, dtype=torch.bool, device=device)
    else:
        cu = cu_seqlens.to(device=device, dtype=torch.int64)
        doc_of = torch.bucketize(keys, cu[1:], right=True)  # token t is in document doc_of[t]
        start = cu[doc_of]
        row_pos = rows - start
        key_pos = keys - start
        same_doc = doc_of[:, None] == doc_of[None, :]
    diff = row_pos[:, None] - key_pos[None, :]  # how far back key j is from row i, within a document
    mask = same_doc.clone()
    if causal:
        mask &= diff >= 0
    if window is not None:
        mask &= (diff < window) if causal else (diff.abs() < window)
    return mask, row_pos


def softplus_attention(q, k, v, *, causal=True, scale="length", reweight=None, reweight_offset_rows=3,
                       normalize_qk=True, cu_seqlens=None, window=None, dtype=torch.float64):  # fmt: skip
    """The plain formula in ``dtype`` (float64 by default), differentiable by autograd."""
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    if normalize_qk:
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    dim = q.shape[-1]
    mask, row_pos = visibility(q.shape[2], k.shape[2], causal=causal, window=window, cu_seqlens=cu_seqlens,
                               device=q.device)  # fmt: skip
    count = mask.sum(-1).to(dtype)[:, None]  # N_i
    if scale == "length":
        c = math.log(dim) * torch.log(count)
    elif scale is None:
        c = torch.full_like(count, 1.0 / math.sqrt(dim))
    else:
        c = torch.full_like(count, float(scale))
    s = c * (q @ k.transpose(-1, -2))
    sp = torch.where(mask, F.softplus(s), torch.zeros((), dtype=dtype, device=q.device))
    a = sp / sp.sum(-1, keepdim=True)
    if reweight is not None:
        offset = (row_pos >= reweight_offset_rows).to(dtype)[:, None]
        x = torch.relu(count * a - offset)
        powered = torch.where(mask, x, torch.zeros((), dtype=dtype, device=q.device)) ** reweight
        total = powered.sum(-1, keepdim=True)
        a = torch.where(total > 0, powered / torch.where(total > 0, total, 1), 0)
    return a @ v


def _self_check(device: torch.device, dtype: torch.dtype) -> tuple[float, float]:
    from ..attention import softplus_attention as kernel

    if is_cuda_device(device) and dtype not in (torch.float16, torch.bfloat16):
        dtype = torch.bfloat16
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 77, 64, generator=g).to(device, dtype)
    k = torch.randn(2, 2, 77, 64, generator=g).to(device, dtype)
    v = torch.randn(2, 2, 77, 64, generator=g).to(device, dtype)
    out = kernel(q, k, v, reweight=15)
    expected = softplus_attention(q, k, v, reweight=15)
    tol = {torch.float64: 1e-10, torch.float32: 1e-5}.get(dtype, 2e-2)
    return relative_error(out, expected), tol


register_self_check(SelfCheck("attention.softplus_attention", _self_check))
