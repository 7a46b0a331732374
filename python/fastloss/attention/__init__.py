"""Softplus attention (LSSA, LSSAR): FlashAttention-style fused forward and backward kernels.

Kernels: ``csrc/attention/``; ops: :mod:`fastloss.attention._ops`; design notes:
``docs/attention.md``; module: ``fastloss.nn.SoftplusAttention``.
"""

from __future__ import annotations

from ._api import softplus_attention

__all__ = ["softplus_attention"]
