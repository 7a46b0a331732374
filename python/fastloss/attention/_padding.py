"""Key-padding masks for ``fastloss.softplus_attention`` (SDPA's boolean convention: True = attend).

A padded batch row is treated as the sequence of its valid keys, in order: query row i is aligned with key
position ``seq_k - seq_q + i`` (as without a mask); its causal visibility, window, N_i (the length scale's
key count) and offset-rows position count *valid keys only*, so a padded row gives exactly what the
unpadded sequence gives alone. A query row aligned with a padded key outputs zeros (and passes no gradient).

Two exact paths:

* seq_q == seq_k (prefill, training): the fused kernels on packed documents. Each batch row becomes three
  documents of a batch-1 sequence: [one dummy row + the padding before the valid run], [the valid run],
  [the padding after it + one dummy row]; the dummies keep every document non-empty (a fully valid or
  fully padded row) so the offsets increase strictly. Needs the valid keys of each row to be one
  contiguous run (left or right padding): checked on the host on the CPU, on the device on CUDA.
* seq_q < seq_k (decoding against a padded KV cache): plain torch ops on the (seq_q, seq_k) scores,
  which for a decode step (seq_q = 1) is O(seq_k) like the kernel; any pattern of valid keys.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .. import _library as L
from .. import _validate as V

FN = "softplus_attention"

_NOT_ONE_RUN = L.register_device_error(
    FN, "key_padding_mask", lambda row, _a, _b: f"row {row} has valid keys that are not one contiguous run; with as many "
    "queries as keys the mask must be left or right padding (the rows were computed from its first run)",
)  # fmt: skip


def key_padding(key_padding_mask, attn_mask, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor | None:
    """The (batch, seq_k) bool mask from either argument, or None; refuses what is not key padding."""
    if key_padding_mask is not None and attn_mask is not None:
        raise ValueError(f"fastloss.{FN}: give 'key_padding_mask' or 'attn_mask', not both")
    name, mask = ("key_padding_mask", key_padding_mask) if key_padding_mask is not None else ("attn_mask", attn_mask)
    if mask is None:
        return None
    V.tensor(FN, name, mask)
    batch, seq_k = k.shape[0], k.shape[2]
    if mask.dtype != torch.bool:
        raise TypeError(f"fastloss.{FN}: argument '{name}' must be a bool tensor (True = attend, as SDPA's boolean "
                        f"attn_mask), got {mask.dtype}; additive float masks are not supported")  # fmt: skip
    if mask.device != q.device:
        raise ValueError(f"fastloss.{FN}: argument '{name}' is on {mask.device}, q on {q.device}")
    if name == "key_padding_mask":
        if tuple(mask.shape) != (batch, seq_k):
            raise ValueError(f"fastloss.{FN}: argument 'key_padding_mask' must have shape (batch, seq_k) = "
                             f"{(batch, seq_k)}, got {tuple(mask.shape)}")  # fmt: skip
        return mask
    shape = (1,) * (4 - mask.dim()) + tuple(mask.shape) if mask.dim() <= 4 else tuple(mask.shape)
    if len(shape) != 4 or shape[3] != seq_k or shape[0] not in (1, batch) or shape[1] != 1 or shape[2] != 1:
        raise ValueError(
            f"fastloss.{FN}: argument 'attn_mask' must be a key-padding mask broadcastable to (batch, 1, 1, seq_k) = "
            f"{(batch, 1, 1, seq_k)}, got {tuple(mask.shape)}. General (per-query or per-head) masks are not supported: "
            "use causal=True for causal masking, cu_seqlens for packed documents and window= for local attention"
        )
    return mask.reshape(shape[0], seq_k).expand(batch, seq_k)


def _valid_run(mask: torch.Tensor, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(start, end) of each row's valid run, and the check that the mask is exactly that run."""
    seq = mask.shape[1]
    count = mask.sum(1)
    start = torch.where(count > 0, mask.to(torch.int8).argmax(1), 0)
    end = start + count
    positions = torch.arange(seq, device=mask.device)
    one_run = (positions >= start[:, None]) & (positions < end[:, None])
    mismatch = (one_run != mask).any(1)
    if L.may_inspect_values(mask):
        if bool(mismatch.any()):
            row = int(mismatch.to(torch.int8).argmax())
            raise ValueError(f"fastloss.{FN}: argument 'key_padding_mask' row {row} has valid keys that are not one "
                             f"contiguous run; with as many queries as keys the mask must be left or right padding "
                             f"(for several documents per row use cu_seqlens)")  # fmt: skip
    elif L.is_cuda(mask) and not torch.compiler.is_compiling():
        row = mismatch.to(torch.int8).argmax().reshape(1)
        L.report_device_error_if(q, _NOT_ONE_RUN, mismatch.any(), torch.cat([row, torch.zeros(2, dtype=row.dtype,
                                                                                                device=row.device)]))  # fmt: skip
    return start, end


def packed_forward(forward, q, k, v, mask, causal, window, length_scale, scale, power, offset_rows) -> torch.Tensor:
    """seq_q == seq_k: the rows as three packed documents per batch row (see the module docstring)."""
    batch, heads_q, seq, dim = q.shape
    start, end = _valid_run(mask, q)
    period = seq + 2
    base = torch.arange(batch, device=mask.device) * period
    empty = end == start
    first = torch.where(empty, 1, start + 1)
    second = torch.where(empty, seq + 1, end + 1)
    cu = torch.stack([base, base + first, base + second], dim=1).reshape(-1)
    cu = torch.cat([cu, base.new_full((1,), batch * period)]).to(torch.int32)

    def pack(t: torch.Tensor) -> torch.Tensor:
        padded = F.pad(t, (0, 0, 1, 1))
        return padded.transpose(0, 1).reshape(1, t.shape[1], batch * period, dim)

    out, _ = forward(pack(q), pack(k), pack(v), cu, causal, window, length_scale, scale, power, offset_rows)
    out = out.reshape(heads_q, batch, period, dim).transpose(0, 1)[:, :, 1 : seq + 1]
    return torch.where(mask[:, None, :, None], out, out.new_zeros(()))


def rows_forward(q, k, v, mask, causal, window, length_scale, scale, power, offset_rows) -> torch.Tensor:
    """seq_q < seq_k: the rows from the (seq_q, seq_k) scores in torch (float32 for 16-bit, float64 for float64)."""
    batch, heads_q, seq_q, dim = q.shape
    seq_k = k.shape[2]
    acc = L.accumulator_dtype(q.dtype)
    repeat = heads_q // k.shape[1]
    qf = q.to(acc)
    kf = k.to(acc).repeat_interleave(repeat, dim=1)
    vf = v.to(acc).repeat_interleave(repeat, dim=1)
    rank = mask.to(torch.int64).cumsum(1) - 1  # each key's position among the valid keys of its row
    row_rank = rank[:, seq_k - seq_q :, None]  # (B, Sq, 1): the query's position in its unpadded sequence
    row_valid = mask[:, seq_k - seq_q :]
    key_rank = rank[:, None, :]
    visible = mask[:, None, :].expand(batch, seq_q, seq_k)
    if causal:
        visible = visible & (key_rank <= row_rank)
        if window:
            visible = visible & (key_rank > row_rank - window)
    elif window:
        visible = visible & ((key_rank - row_rank).abs() < window)
    count = visible.sum(-1)  # N_i
    scores = torch.matmul(qf, kf.transpose(-1, -2))
    if length_scale:
        c = math.log(dim) * torch.log(count.clamp_min(1).to(acc))
        scores = scores * c[:, None, :, None]
    else:
        scores = scores * scale
    visible4 = visible[:, None]
    zero = scores.new_zeros(())
    weights = torch.where(visible4, F.softplus(scores), zero)
    weights = weights / weights.sum(-1, keepdim=True).clamp_min(torch.finfo(acc).tiny)
    if power > 0:
        offset = torch.where(row_rank < offset_rows, 0.0, 1.0).to(acc)  # (B, Sq, 1)
        x = count[:, None, :, None].to(acc) * weights - offset[:, None]
        u = torch.where(visible4, torch.relu(x), zero)
        largest = u.amax(-1, keepdim=True)
        u = torch.where(largest > 0, (u / largest.clamp_min(torch.finfo(acc).tiny)) ** power, zero)
        weights = u / u.sum(-1, keepdim=True).clamp_min(torch.finfo(acc).tiny)
    out = torch.matmul(weights, vf)
    return torch.where(row_valid[:, None, :, None], out, zero).to(q.dtype)
