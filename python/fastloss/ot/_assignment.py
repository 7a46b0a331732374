"""SwAV's balanced assignment (the equal-partition Sinkhorn-Knopp of Caron et al. 2020) in the log
domain, optionally over a torch.distributed process group."""

from __future__ import annotations

import math

import torch

from .. import _validate as V
from . import _ops


def _global_logsumexp(local: torch.Tensor, process_group) -> torch.Tensor:
    """log sum_ranks exp(local), element-wise, without overflow: a max then a sum all-reduce."""
    if process_group is None:
        return local
    import torch.distributed as dist

    peak = local.clone()
    dist.all_reduce(peak, op=dist.ReduceOp.MAX, group=process_group)
    peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
    total = torch.exp(local - peak)
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=process_group)
    return peak + torch.log(total)


@torch.no_grad()
def balanced_assignment(
    scores: torch.Tensor, *, eps: float = 0.05, n_iter: int = 3, process_group=None
) -> torch.Tensor:
    """Soft assignments of B samples to K prototypes with equal total mass per prototype (SwAV).

    Computes what SwAV's ``distributed_sinkhorn`` computes: Q = exp(scores / eps), normalized
    ``n_iter`` times so that each prototype gets 1/K of the (global) mass and each sample 1/B,
    returned as (B, K) rows that sum to 1. Here it runs in the log domain (two fastloss softmin
    kernels per iteration), so any scores / eps is safe: no overflow in float16/bfloat16 or with
    unnormalized features, where the exponential form gives inf/NaN.

    Args:
        scores: (B, K) similarities of this rank's samples to the prototypes (any float type).
        eps: temperature of the assignment (SwAV: 0.05). n_iter: normalization rounds (SwAV: 3).
        process_group: a torch.distributed group; the prototype sums then run over every rank's
            samples (B is the global batch), as in multi-GPU SwAV. Each rank gets its own rows.

    Returns (B, K) float32 (float64 for float64 scores) assignments; no gradient.
    """
    fn = "ot.balanced_assignment"
    V.tensor(fn, "scores", scores)
    V.dtype_in(fn, "scores", scores, V.FLOAT_DTYPES)
    if scores.dim() != 2 or scores.shape[1] == 0:
        raise ValueError(f"fastloss.{fn}: scores must be (B, K) with K >= 1, got shape {tuple(scores.shape)}")
    eps = V.real_number(fn, "eps", eps, positive=True)
    n_iter = V.integer(fn, "n_iter", n_iter)
    if n_iter < 1:
        raise ValueError(f"fastloss.{fn}: n_iter must be >= 1, got {n_iter}")
    local_batch, prototypes = scores.shape
    global_batch = local_batch
    if process_group is not None:
        import torch.distributed as dist

        count = torch.tensor([local_batch], dtype=torch.int64, device=scores.device)
        dist.all_reduce(count, group=process_group)
        global_batch = int(count.item())
    if global_batch == 0:
        raise ValueError(f"fastloss.{fn}: no samples (B = 0 on every rank)")
    acc = torch.float64 if scores.dtype == torch.float64 else torch.float32
    cost = (-scores).unsqueeze(0).contiguous()  # the kernels minimize a cost: C = -scores
    zeros_b = torch.zeros((1, local_batch), dtype=acc, device=scores.device)
    zeros_k = torch.zeros((1, prototypes), dtype=acc, device=scores.device)
    v = zeros_b.clone()  # per-sample log-scaling
    u = zeros_k.clone()  # per-prototype log-scaling
    for _ in range(n_iter):
        # Prototypes: u_k = -log K - LSE_i(s_ik / eps + v_i), the LSE over every rank's samples.
        local = -_ops.softmin(cost, None, None, eps * v, zeros_b, 0, eps, 1.0, True) / eps
        u = -math.log(prototypes) - _global_logsumexp(local, process_group)
        # Samples: v_i = -log B - LSE_k(s_ik / eps + u_k).
        v = _ops.softmin(cost, None, None, eps * u, zeros_k, 0, eps, 1.0, False) / eps - math.log(global_batch)
    # SwAV returns B * Q: per sample, a softmax over prototypes of s / eps + u.
    return torch.softmax(scores.to(acc) / eps + u, dim=1)
