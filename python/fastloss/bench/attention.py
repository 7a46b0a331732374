"""Benchmarks of softplus attention against what a user would otherwise run, in one process:

  FlexAttention    the same math through score_mod (shared/reference/attention.md, section 2):
                   LSSA as one call with score = log softplus(c_i s); LSSAR as two calls, the first
                   returning log Z, the second scoring p log(N_i exp(log sp - log Z) - o_i). Compiled
                   (torch.compile) where the compiler runs, as FlexAttention is meant to be used.
                   Compiled flex on the CPU cannot return the LSE either, so there LSSAR's first
                   call runs eagerly.
  plain PyTorch    the formula with the N x N matrix (fastloss.reference.attention in float32).
                   FlexAttention has no backward on the CPU (torch 2.13): fwd+bwd rows there
                   compare with plain PyTorch and SDPA only.
  SDPA             softmax attention (scaled_dot_product_attention): a different function, shown as the
                   speed a user compares any attention kernel with.

Every contender gets the same l2-normalized q and k (the normalization is outside the timed call).
On CUDA the floor is the tensor-core time of the standard attention FLOPs (4 B H N^2 d, halved when
causal, x3.5 for forward + backward) at the H100's 989 TFLOP/s dense bf16.
"""

from __future__ import annotations

import math
from typing import Iterator

import torch
import torch.nn.functional as F

from ..attention import _ops
from ..reference import attention as R
from . import BenchCase, Contender, Problem, register

TENSOR_FLOPS_H100 = 989e12
POWER = 15


def _flex():
    try:
        from torch.nn.attention.flex_attention import flex_attention
    except Exception:  # noqa: BLE001
        return None
    return flex_attention


def _log_softplus(x):
    return torch.where(x < -15.0, x, torch.log(F.softplus(x)))


def _causal_block_mask(n: int, device):
    """FlexAttention's block mask for causal attention, so that it skips the blocks above the
    diagonal as fastloss and SDPA do (a -inf in score_mod alone would compute them)."""
    from torch.nn.attention.flex_attention import create_block_mask

    return create_block_mask(lambda b, h, q_idx, kv_idx: kv_idx <= q_idx, None, None, n, n, device=device)


def _flex_calls(flex, dim: int, causal: bool, compile_peer: bool):
    """(lssa(q, k, v), lssar(q, k, v)) through FlexAttention; q and k already normalized, Nq = Nk."""
    log_d = math.log(dim)
    neg_inf = -float("inf")
    masks: dict = {}

    def block_mask(q):
        if not causal:
            return None
        key = (q.shape[2], str(q.device))
        if key not in masks:
            masks[key] = _causal_block_mask(q.shape[2], q.device)
        return masks[key]

    def row_count(q_idx, n_keys):
        return (q_idx + 1).to(torch.float32) if causal else torch.full_like(q_idx, n_keys, dtype=torch.float32)

    def make_lssa_mod(n_keys):
        def lssa_mod(score, b, h, q_idx, kv_idx):
            log_sp = _log_softplus(log_d * torch.log(row_count(q_idx, n_keys)) * score)
            return torch.where(kv_idx <= q_idx, log_sp, neg_inf) if causal else log_sp

        return lssa_mod

    fn = torch.compile(flex, dynamic=False) if compile_peer else flex

    def lssa(q, k, v):
        return fn(q, k, v, score_mod=make_lssa_mod(k.shape[2]), block_mask=block_mask(q), scale=1.0)

    def lssar(q, k, v):
        n_keys = k.shape[2]
        # Call 1: only log Z is needed, so a one-column V keeps its PV product small.
        lse_call = flex if q.device.type == "cpu" else fn  # compiled flex on the CPU cannot return the LSE
        _, log_z = lse_call(q, k, v[..., :1].expand(*v.shape[:3], 16).contiguous(), score_mod=make_lssa_mod(n_keys),
                                block_mask=block_mask(q), scale=1.0, return_lse=True)  # fmt: skip

        def lssar_mod(score, b, h, q_idx, kv_idx):
            count = row_count(q_idx, n_keys)
            log_sp = _log_softplus(log_d * torch.log(count) * score)
            offset = torch.where(q_idx < 3, 0.0, 1.0)
            x = count * torch.exp(log_sp - log_z[b, h, q_idx]) - offset
            x_safe = torch.where(x > 0, x, 1.0)
            value = torch.where(x > 0, POWER * torch.log(x_safe), neg_inf)
            return torch.where(kv_idx <= q_idx, value, neg_inf) if causal else value

        return fn(q, k, v, score_mod=lssar_mod, block_mask=block_mask(q), scale=1.0)

    return lssa, lssar


def _shapes(device: torch.device, quick: bool):
    if quick:
        return [(1, 2, 128, 64)]
    if device.type == "cpu":
        return [(1, 8, 2048, 128)]
    return [(16, 16, 1024, 128), (4, 16, 4096, 128), (1, 16, 16384, 128)]


def _inputs(shape, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(*shape, generator=g) for _ in range(3))
    return F.normalize(q, dim=-1).to(device, dtype), F.normalize(k, dim=-1).to(device, dtype), v.to(device, dtype)


def _floor_ms(device, shape, causal, factor):
    if device.type != "cuda":
        return None
    b, h, n, d = shape
    return factor * 4.0 * b * h * n * n * d * (0.5 if causal else 1.0) / TENSOR_FLOPS_H100 * 1e3


def _problems(device: torch.device, quick: bool, compile_peer: bool, *, reweight: bool,
              backward: bool) -> Iterator[Problem]:  # fmt: skip
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    flex = _flex()
    p = POWER if reweight else None
    for shape in _shapes(device, quick):
        for causal in (True, False):
            q, k, v = _inputs(shape, dtype, device)
            leaves = [t.clone().requires_grad_(backward) for t in (q, k, v)]

            def ours(leaves=leaves, causal=causal):
                out = _ops.forward(*leaves, None, causal, 0, True, 0.0, float(p or 0), 3)[0]
                if backward:
                    out.backward(torch.ones_like(out))
                return out

            calls = {"fastloss": ours}
            flex_fn = None
            # FlexAttention has no backward on the CPU, and its LSSAR backward needs a gradient for the
            # captured log Z buffer (Triton backend only): there it times forward only.
            if flex is not None and not (backward and (reweight or device.type == "cpu")):
                lssa, lssar = _flex_calls(flex, shape[3], causal, compile_peer)
                flex_fn = lssar if reweight else lssa

                def flex_run(leaves=leaves, fn=flex_fn):
                    out = fn(*leaves)
                    if backward:
                        out.backward(torch.ones_like(out))
                    return out

                calls["FlexAttention" + (" (2 calls)" if reweight else "")] = flex_run
            if shape[0] * shape[1] * shape[2] ** 2 * 4 * 6 < (16 << 30):

                def plain(leaves=leaves, causal=causal):
                    out = R.softplus_attention(*leaves, causal=causal, reweight=p, normalize_qk=False, dtype=dtype)
                    if backward:
                        out.backward(torch.ones_like(out))
                    return out

                calls["torch materialized"] = plain

            def sdpa(leaves=leaves, causal=causal):
                out = F.scaled_dot_product_attention(*leaves, is_causal=causal)
                if backward:
                    out.backward(torch.ones_like(out))
                return out

            calls["SDPA softmax (ceiling)"] = sdpa

            def check(q=q, k=k, v=v, causal=causal, flex_fn=flex_fn):
                """Largest relative output difference from the float64 reference, of fastloss and (when
                it runs here) FlexAttention, on the last 256 rows of the first head (rows are aligned
                to the last keys, so they are rows of the full problem)."""
                rows = slice(max(0, q.shape[2] - 256), q.shape[2])
                expected = R.softplus_attention(q[:1, :1, rows], k[:1, :1], v[:1, :1], causal=causal, reweight=p,
                                                normalize_qk=False)  # fmt: skip
                outputs = [_ops.forward(q[:1, :1, rows], k[:1, :1], v[:1, :1], None, causal, 0, True, 0.0,
                                        float(p or 0), 3)[0]]  # fmt: skip
                if flex_fn is not None:
                    with torch.no_grad():
                        outputs.append(flex_fn(q[:1, :1], k[:1, :1], v[:1, :1])[:, :, rows])
                return max(float((o.double() - expected).norm() / expected.norm()) for o in outputs)

            b, h, n, d = shape
            yield Problem(label=f"B={b} H={h} N={n} d={d} {'causal' if causal else 'full'}", dtype=dtype,
                          contenders=[Contender(name, fn) for name, fn in calls.items()],
                          bytes_floor=4 * b * h * n * d * q.element_size() * (2 if backward else 1), check=check,
                          floor_ms=_floor_ms(device, shape, causal, 3.5 if backward else 1.0),
                          floor_kind="tensor core")  # fmt: skip


register(BenchCase(family="attention", name="attention LSSA forward",
                   make=lambda d, q, c: _problems(d, q, c, reweight=False, backward=False)))  # fmt: skip
register(BenchCase(family="attention", name="attention LSSA fwd+bwd",
                   make=lambda d, q, c: _problems(d, q, c, reweight=False, backward=True)))  # fmt: skip
register(BenchCase(family="attention", name="attention LSSAR forward",
                   make=lambda d, q, c: _problems(d, q, c, reweight=True, backward=False)))  # fmt: skip
register(BenchCase(family="attention", name="attention LSSAR fwd+bwd",
                   make=lambda d, q, c: _problems(d, q, c, reweight=True, backward=True)))  # fmt: skip
