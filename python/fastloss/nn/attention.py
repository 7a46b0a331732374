"""Modules of the softplus-attention family: a drop-in attention layer (projections, optional RoPE,
GQA, KV cache for decoding) around ``fastloss.softplus_attention``."""

from __future__ import annotations

from typing import Callable

import torch

from .. import _validate as V
from ..attention import softplus_attention

__all__ = ["SoftplusAttention"]

# rotary(q, k, positions) -> (q, k): q (B, Hq, N, d), k (B, Hkv, N, d), positions (N,) absolute.
RotaryHook = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class SoftplusAttention(torch.nn.Module):
    """Multi-head self-attention with softplus attention (LSSA, or LSSAR with ``reweight=p``) in place
    of softmax: ``x (B, N, embed_dim) -> (B, N, embed_dim)``.

    Args:
        embed_dim, num_heads: model width and query heads.
        num_kv_heads: key/value heads (GQA; default num_heads). Must divide num_heads.
        head_dim: default embed_dim // num_heads.
        rotary: optional RoPE hook ``rotary(q, k, positions) -> (q, k)`` applied before the kernel
            (the paper applies RoPE before normalizing q and k; rotation keeps their norms).
        bias: biases of the projections.
        causal, scale, reweight, reweight_offset_rows, normalize_qk, window: as in
            ``fastloss.softplus_attention``.

    ``forward(x, *, cu_seqlens=None, past_key_value=None, use_cache=False, positions=None, key_padding_mask=None)``: with a
    cache ``(k, v)`` of earlier positions (B, Hkv, P, d), already rotated, the new rows attend to the
    cache and to themselves (decoding: N = 1); with ``use_cache`` it returns ``(out, (k, v))``.
    ``positions`` (N,) are the absolute positions given to ``rotary``; by default they continue from
    the cache length, which is right unless the cache was trimmed (a sliding window). The kernel's
    N_i and offset-rows rule count the keys it is given.
    """

    def __init__(self, embed_dim: int, num_heads: int, *, num_kv_heads: int | None = None, head_dim: int | None = None,
                 rotary: RotaryHook | None = None, bias: bool = False, causal: bool = True,
                 scale: str | float | None = "length", reweight: float | None = None, reweight_offset_rows: int = 3,
                 normalize_qk: bool = True, window: int | None = None, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:  # fmt: skip
        super().__init__()
        fn = "nn.SoftplusAttention"
        embed_dim, num_heads = V.integer(fn, "embed_dim", embed_dim), V.integer(fn, "num_heads", num_heads)
        num_kv_heads = num_heads if num_kv_heads is None else V.integer(fn, "num_kv_heads", num_kv_heads)
        if embed_dim < 1 or num_heads < 1 or num_kv_heads < 1 or num_heads % num_kv_heads:
            raise ValueError(f"fastloss.{fn}: need embed_dim, num_heads >= 1 and num_kv_heads dividing num_heads, got "
                             f"{embed_dim}, {num_heads}, {num_kv_heads}")  # fmt: skip
        if head_dim is None:
            if embed_dim % num_heads:
                raise ValueError(f"fastloss.{fn}: embed_dim {embed_dim} is not a multiple of num_heads {num_heads}; "
                                 "pass head_dim")  # fmt: skip
            head_dim = embed_dim // num_heads
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, V.integer(fn, "head_dim", head_dim)
        factory = dict(device=device, dtype=dtype)
        self.q_proj = torch.nn.Linear(embed_dim, num_heads * head_dim, bias=bias, **factory)
        self.k_proj = torch.nn.Linear(embed_dim, num_kv_heads * head_dim, bias=bias, **factory)
        self.v_proj = torch.nn.Linear(embed_dim, num_kv_heads * head_dim, bias=bias, **factory)
        self.out_proj = torch.nn.Linear(num_heads * head_dim, embed_dim, bias=bias, **factory)
        self.rotary = rotary
        self.options = dict(causal=causal, scale=scale, reweight=reweight, reweight_offset_rows=reweight_offset_rows,
                            normalize_qk=normalize_qk, window=window)  # fmt: skip

    def extra_repr(self) -> str:
        opts = ", ".join(f"{k}={v}" for k, v in self.options.items())
        return f"heads={self.num_heads}, kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, {opts}"

    def forward(
        self,
        x: torch.Tensor,
        *,
        cu_seqlens: torch.Tensor | None = None,
        past_key_value: tuple[torch.Tensor, torch.Tensor] | None = None,
        use_cache: bool = False,
        positions: torch.Tensor | None = None,
        key_padding_mask: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Self-attention of ``x`` (batch, seq, embed_dim) -> (batch, seq, embed_dim).

        Args:
            x: the new positions.
            cu_seqlens: packed documents in a batch of 1 (see ``fastloss.softplus_attention``).
            past_key_value: ``(k, v)`` of earlier positions, (batch, num_kv_heads, P, head_dim), already
                rotated; the new rows attend to it and to themselves (decoding: seq = 1). Its batch must be x's.
            use_cache: also return the updated ``(k, v)``.
            positions: (seq,) absolute positions for ``rotary``; default: continuing from the cache length.
            key_padding_mask: bool (batch, P + seq), True = attend, over the cache and the new positions
                (SDPA's boolean convention); ``attn_mask``: the same, broadcastable to (batch, 1, 1, P + seq).
                A padded batch row gives what its unpadded sequence gives alone; query rows at padded
                positions give zeros before ``out_proj`` (its bias after it). ``positions`` given to
                ``rotary`` stay the padded ones: pass ``positions`` (or left-pad) if RoPE must skip padding.

        Returns the output, or ``(output, (k, v))`` with ``use_cache``.
        """
        batch, seq, _ = x.shape
        q = self.q_proj(x).view(batch, seq, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if past_key_value is not None:
            if not (isinstance(past_key_value, (tuple, list)) and len(past_key_value) == 2):
                raise TypeError("fastloss.nn.SoftplusAttention: 'past_key_value' must be a (k, v) pair")
            cached = past_key_value[0].shape[0]
            if cached != batch or past_key_value[1].shape[0] != batch:
                raise ValueError(f"fastloss.nn.SoftplusAttention: 'past_key_value' holds a batch of {cached} but 'x' has "
                                 f"{batch}; the cache must come from a call on the same batch (reorder or slice it "
                                 f"with the batch, e.g. for beam search)")  # fmt: skip
        past = 0 if past_key_value is None else past_key_value[0].shape[2]
        if positions is None:
            positions = torch.arange(past, past + seq, device=x.device)
        elif positions.shape != (seq,):
            raise ValueError(f"fastloss.nn.SoftplusAttention: 'positions' must have shape ({seq},), got "
                             f"{tuple(positions.shape)}")  # fmt: skip
        if self.rotary is not None:
            q, k = self.rotary(q, k, positions)
        if past_key_value is not None:
            k = torch.cat([past_key_value[0], k], dim=2)
            v = torch.cat([past_key_value[1], v], dim=2)
        out = softplus_attention(q, k, v, cu_seqlens=cu_seqlens, key_padding_mask=key_padding_mask, attn_mask=attn_mask,
                                 **self.options)  # fmt: skip
        out = self.out_proj(out.transpose(1, 2).reshape(batch, seq, self.num_heads * self.head_dim))
        return (out, (k, v)) if use_cache else out
