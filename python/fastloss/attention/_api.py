"""``fastloss.softplus_attention``: argument checks, the optional q/k normalization (in torch, so
autograd differentiates it) and the call of the fused op."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .. import _library as L
from .. import _validate as V
from . import _ops, _padding

FN = "softplus_attention"


def _check_tensors(q, k, v) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        V.tensor(FN, name, t)
        V.dtype_in(FN, name, t, V.FLOAT_DTYPES)
        if t.dim() != 4:
            raise ValueError(f"fastloss.{FN}: argument '{name}' must be (batch, heads, seq, head_dim), got shape "
                             f"{tuple(t.shape)}")  # fmt: skip
    V.same_device(FN, q=q, k=k, v=v)
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"fastloss.{FN}: q, k and v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.shape != v.shape:
        raise ValueError(f"fastloss.{FN}: k {tuple(k.shape)} and v {tuple(v.shape)} must have one shape")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"fastloss.{FN}: q {tuple(q.shape)} and k {tuple(k.shape)} must agree on batch and head_dim")
    if k.shape[1] == 0 or q.shape[1] == 0 or q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"fastloss.{FN}: the query heads ({q.shape[1]}) must be a positive multiple of the key/value heads "
                         f"({k.shape[1]})")  # fmt: skip
    if q.shape[3] == 0:
        raise ValueError(f"fastloss.{FN}: head_dim must be >= 1")
    if q.shape[2] > k.shape[2]:
        raise ValueError(f"fastloss.{FN}: query rows are aligned to the last keys, so q's sequence length "
                         f"({q.shape[2]}) must be <= k's ({k.shape[2]})")  # fmt: skip


_BAD_CU_SEQLENS = L.register_device_error(
    FN, "cu_seqlens", lambda first, last, length: f"must increase strictly from 0 to the packed length {length}, "
    f"got first {first} and last {last} (or a step that does not increase); the rows were computed from clamped offsets",
)  # fmt: skip


def _check_cu_seqlens(cu_seqlens, q, k) -> torch.Tensor:
    V.tensor(FN, "cu_seqlens", cu_seqlens)
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 or cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"fastloss.{FN}: argument 'cu_seqlens' must be a 1-D int32/int64 tensor of documents + 1 "
                         f"offsets, got {cu_seqlens.dtype} of shape {tuple(cu_seqlens.shape)}")  # fmt: skip
    if q.shape[0] != 1 or q.shape[2] != k.shape[2]:
        raise ValueError(f"fastloss.{FN}: with cu_seqlens the documents are packed along the sequence of a batch of 1 "
                         f"with as many queries as keys, got q {tuple(q.shape)} and k {tuple(k.shape)}")  # fmt: skip
    if cu_seqlens.device != q.device:
        raise ValueError(f"fastloss.{FN}: 'cu_seqlens' is on {cu_seqlens.device}, q on {q.device}")
    if L.is_cuda(cu_seqlens) and not L.may_inspect_values(cu_seqlens) and not torch.compiler.is_compiling():
        # Checked on the device and reported as a device error (raised by the next call on the device or by
        # fastloss.check_device_errors()); the kernels clamp the offsets, so bad ones give wrong rows, never
        # reads outside k and v. fastloss.set_target_checks(True) checks them on the host instead.
        c = cu_seqlens.to(torch.int64)
        bad = (c[0] != 0) | (c[-1] != k.shape[2]) | (c[1:] <= c[:-1]).any()
        L.report_device_error_if(q, _BAD_CU_SEQLENS, bad, torch.cat([c[:1], c[-1:], torch.full_like(c[:1], k.shape[2])]))
    elif L.may_inspect_values(cu_seqlens):
        host = cu_seqlens.cpu()
        if int(host[0]) != 0 or int(host[-1]) != k.shape[2] or not bool((host[1:] > host[:-1]).all()):
            raise ValueError(f"fastloss.{FN}: 'cu_seqlens' must increase strictly from 0 to the packed length "
                             f"{k.shape[2]}, got {host.tolist()[:8]}{'...' if host.numel() > 8 else ''}")  # fmt: skip
    return cu_seqlens.to(torch.int32)


def _scale(scale, dim: int) -> tuple[bool, float]:
    if isinstance(scale, str):
        if scale != "length":
            raise ValueError(f"fastloss.{FN}: argument 'scale' must be 'length', a float or None, got {scale!r}")
        return True, 0.0
    if scale is None:
        return False, 1.0 / math.sqrt(dim)
    return False, V.real_number(FN, "scale", scale, positive=True)


def softplus_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    scale: str | float | None = "length",
    reweight: float | None = None,
    reweight_offset_rows: int = 3,
    normalize_qk: bool = True,
    cu_seqlens: torch.Tensor | None = None,
    max_seqlen: int | None = None,
    window: int | None = None,
    key_padding_mask: torch.Tensor | None = None,
    attn_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Softplus attention with l1 normalization (LSSA) and, with ``reweight=p``, re-weighting (LSSAR),
    from Gao & Spratling, "Softplus Attention with Re-weighting Boosts Length Extrapolation" (ICML 2026).

    For query row i and the keys j it sees (N_i of them)::

        s_ij = c_i * (q_i . k_j)        q, k l2-normalized first when normalize_qk (cosine scores)
        A_ij = softplus(s_ij) / sum_j softplus(s_ij)                          LSSA
        W_ij = relu(N_i A_ij - o_i)^p / sum_j relu(N_i A_ij - o_i)^p          LSSAR (reweight=p)
        out_i = sum_j A_ij v_j   (or W_ij)

    Args:
        q: (batch, heads_q, seq_q, head_dim). k, v: (batch, heads_kv, seq_k, head_dim) with heads_q a
            multiple of heads_kv (GQA, MQA). seq_q <= seq_k: query rows are aligned to the *last* keys,
            so seq_q = 1 is a decode step against a KV cache (row position seq_k - 1).
        causal: row i sees keys up to its own position.
        scale: "length" (the paper): c_i = log(head_dim) * log(N_i), natural logs, no 1/sqrt(d);
            a float: c_i = scale; None: c_i = 1/sqrt(head_dim).
        reweight: None for LSSA, or p >= 1 for LSSAR (the paper uses 15 for long contexts). The kernels
            normalize by the row's largest x before the power, so it never overflows; the result is the
            exact ratio (no epsilon in the denominator). A row with no x_ij > 0 outputs 0.
        reweight_offset_rows: rows at (document) positions below this have o_i = 0, the others 1: the
            paper's rule for its first rows, keyed on the row's position (also under a window or
            without causal masking, where N_i is not position + 1).
        normalize_qk: l2-normalize q and k over head_dim (differentiably, in torch) before the kernel.
        cu_seqlens: packed documents (FlashAttention's varlen): q, k, v of batch 1 hold the documents
            back to back along the sequence, and cu_seqlens (documents + 1 increasing offsets from 0
            to seq) marks them. N_i, positions and the offset-rows rule count within each document.
        max_seqlen: accepted for FlashAttention-style callers; the kernels do not need it.
        window: a row sees at most its last ``window`` keys (causal) or the keys within ``window - 1``
            positions of it (non-causal).
        key_padding_mask: bool (batch, seq_k), True = attend (SDPA's boolean ``attn_mask`` convention), for
            padded batches. Each batch row is the sequence of its valid keys: causality, ``window``, N_i and
            the offset-rows rule count valid keys only, so a padded row gives what the unpadded sequence gives
            alone; query row i is aligned with key ``seq_k - seq_q + i`` and outputs zeros when that key is
            padding. With seq_q == seq_k the valid keys of a row must be one run (left or right padding; fused
            kernels on packed documents); with seq_q < seq_k (decoding against a padded cache) any pattern
            (torch ops on the (seq_q, seq_k) scores: meant for short seq_q). Not with ``cu_seqlens``.
        attn_mask: the same as a bool mask broadcastable to (batch, 1, 1, seq_k), as SDPA takes it. Other
            masks (per query or per head, additive floats) are refused: use ``causal``, ``cu_seqlens`` or
            ``window``.

    Returns the output, shaped and typed like q. Differentiable in q, k and v.

    Kernels: CPU (float32, float64; float16 / bfloat16 computed in float32) and CUDA (float16,
    bfloat16; head_dim 32, 64, 96 or 128). Memory is O(seq * head_dim): no seq x seq matrix.
    """
    _check_tensors(q, k, v)
    causal = bool(causal)
    length_scale, scale_value = _scale(scale, q.shape[3])
    if reweight is None:
        power = 0.0
    else:
        power = V.real_number(FN, "reweight", reweight)
        if power < 1.0:
            raise ValueError(f"fastloss.{FN}: argument 'reweight' (the power p of LSSAR) must be >= 1, got {reweight!r}")
    offset_rows = V.integer(FN, "reweight_offset_rows", reweight_offset_rows)
    if offset_rows < 0:
        raise ValueError(f"fastloss.{FN}: argument 'reweight_offset_rows' must be >= 0, got {offset_rows}")
    window_size = 0
    if window is not None:
        window_size = V.integer(FN, "window", window)
        if window_size < 1:
            raise ValueError(f"fastloss.{FN}: argument 'window' must be >= 1 (or None), got {window}")
    if max_seqlen is not None and V.integer(FN, "max_seqlen", max_seqlen) < 0:
        raise ValueError(f"fastloss.{FN}: argument 'max_seqlen' must be >= 0, got {max_seqlen}")
    mask = _padding.key_padding(key_padding_mask, attn_mask, q, k)
    if mask is not None and cu_seqlens is not None:
        raise ValueError(f"fastloss.{FN}: give 'cu_seqlens' (packed documents) or a key padding mask, not both")
    cu = None if cu_seqlens is None else _check_cu_seqlens(cu_seqlens, q, k)
    L.require_cuda_kernels(FN, q)
    if normalize_qk:
        acc = L.accumulator_dtype(q.dtype)  # the norm of a 16-bit row is taken in float32
        q = F.normalize(q.to(acc), dim=-1).to(q.dtype)
        k = F.normalize(k.to(acc), dim=-1).to(k.dtype)
    if mask is not None:
        args = (mask, causal, window_size, length_scale, scale_value, power, offset_rows)
        if q.shape[2] == k.shape[2]:
            return _padding.packed_forward(_ops.forward, q, k, v, *args)
        return _padding.rows_forward(q, k, v, *args)
    out, _ = _ops.forward(q, k, v, cu, causal, window_size, length_scale, scale_value, power, offset_rows)
    return out
