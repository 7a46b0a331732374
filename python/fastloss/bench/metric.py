"""Benchmarks of the metric family against what a user would otherwise run, in one process:

  InfoNCE / CLIP   fastloss.metric.info_nce vs plain PyTorch (normalize, materialized logits,
                   F.cross_entropy; symmetric: both directions) and torch.compile of it.
                   On CUDA also the CLIP goal: symmetric, bfloat16, B = 65,536 (and 16,384 with every
                   peer), d = 768, against Inf-CL's two-call symmetric loss where `inf-cl` imports.
  label losses     fastloss.metric.* vs pytorch-metric-learning's loss (+ miner where the loss
                   has one fused): MultiSimilarityLoss + MultiSimilarityMiner, SupConLoss,
                   NTXentLoss, CircleLoss, ContrastiveLoss, TripletMarginLoss (all triplets and
                   BatchHardMiner).
Forward + backward of the loss with respect to the embeddings, float32. On CUDA the floor is the
tensor-core time of the similarity products (3 B^2 d FLOP per pass pair); on the CPU the bytes floor.
"""

from __future__ import annotations

from typing import Iterator

import torch
import torch.nn.functional as F

from .. import metric as M
from . import BenchCase, Contender, Problem, optional_import, register


def _grad(loss_fn, *inputs):
    """Forward and backward of loss_fn(*inputs), differentiating the floating-point inputs."""
    def run():
        leaves = [t.detach().requires_grad_() if t.is_floating_point() else t for t in inputs]
        loss = loss_fn(*leaves)
        loss.backward()
        return leaves[0].grad

    return run


def _info_nce_problems(device: torch.device, quick: bool, compile_peer: bool) -> Iterator[Problem]:
    b, d = (256, 64) if quick else (4096, 128)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(b, d, generator=g).to(device)
    k = torch.randn(b, d, generator=g).to(device)
    for symmetric in (False, True):
        def eager(q, k, symmetric=symmetric):
            logits = F.normalize(q, dim=1) @ F.normalize(k, dim=1).T / 0.07
            target = torch.arange(q.shape[0], device=q.device)
            loss = F.cross_entropy(logits, target)
            return 0.5 * (loss + F.cross_entropy(logits.T, target)) if symmetric else loss

        calls = {"fastloss": _grad(lambda q, k, s=symmetric: M.info_nce(q, k, symmetric=s), q, k),
                 "torch eager": _grad(eager, q, k)}  # fmt: skip
        if compile_peer:
            calls["torch.compile"] = _grad(torch.compile(eager, dynamic=False), q, k)

        def check(symmetric=symmetric):
            ours = M.info_nce(q, k, symmetric=symmetric)
            return float((ours - eager(q.double(), k.double())).abs() / eager(q.double(), k.double()).abs())

        yield Problem(label=f"B={b} d={d}{' symmetric' if symmetric else ''}", dtype=torch.float32,
                      contenders=[Contender(n, f) for n, f in calls.items()], bytes_floor=4 * b * d * 4, check=check)  # fmt: skip


TENSOR_FLOPS_H100 = 989e12  # bf16 dense


def _inf_cl():
    module = optional_import("inf_cl")
    return None if module is None else getattr(module, "cal_inf_loss", None)


def _clip_gpu_problems(device: torch.device, quick: bool, compile_peer: bool) -> Iterator[Problem]:
    """Symmetric CLIP in bfloat16 at the issue's size; the floor is 4 similarity-sized products (a
    forward and a recomputing backward) at the tensor-core peak."""
    if device.type != "cuda":
        return
    inf_cl = _inf_cl()
    d = 768
    for b in ((4096,) if quick else (16384, 65536)):
        g = torch.Generator().manual_seed(2)
        q = torch.randn(b, d, generator=g).to(device, torch.bfloat16)
        k = torch.randn(b, d, generator=g).to(device, torch.bfloat16)
        scale = 1 / 0.07

        def eager(q, k):
            logits = F.normalize(q, dim=1) @ F.normalize(k, dim=1).T * scale
            target = torch.arange(q.shape[0], device=q.device)
            return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))

        calls = {"fastloss": _grad(lambda q, k: M.info_nce(q, k, symmetric=True), q, k)}
        if inf_cl is not None:
            scale_t = torch.tensor(scale, device=device)

            def inf_cl_symmetric(q, k):  # Inf-CL computes one direction a call, on normalized inputs
                qn, kn = F.normalize(q, dim=1), F.normalize(k, dim=1)
                return 0.5 * (inf_cl(qn, kn, scale=scale_t) + inf_cl(kn, qn, scale=scale_t))

            calls["inf-cl (two calls)"] = _grad(inf_cl_symmetric, q, k)
        if b <= 16384:  # the materialized logits and their gradients: about 12 B^2 bytes
            calls["torch eager"] = _grad(eager, q, k)
            if compile_peer:
                calls["torch.compile"] = _grad(torch.compile(eager, dynamic=False), q, k)

        def check(q=q, k=k):
            ours = M.info_nce(q[:2048], k[:2048], symmetric=True).double()
            want = eager(q[:2048].double(), k[:2048].double())
            return float((ours - want).abs() / want.abs())

        yield Problem(label=f"CLIP symmetric B={b} d={d}", dtype=torch.bfloat16,
                      contenders=[Contender(n, f) for n, f in calls.items()], bytes_floor=4 * b * d * 2, check=check,
                      floor_ms=4 * 2.0 * b * b * d / TENSOR_FLOPS_H100 * 1e3, floor_kind="tensor-core FLOP")  # fmt: skip


def _label_problems(device: torch.device, quick: bool, compile_peer: bool) -> Iterator[Problem]:
    pml = optional_import("pytorch_metric_learning")
    if pml is None:
        return
    from pytorch_metric_learning import losses, miners

    g = torch.Generator().manual_seed(1)
    # (name, B, d, classes, fastloss, PML)
    cases = [
        ("multi_similarity + mining", 4096, 128, 100, lambda e, y: M.multi_similarity(e, y, mining=True),
         lambda e, y: losses.MultiSimilarityLoss()(e, y, miners.MultiSimilarityMiner(0.1)(e, y))),
        ("multi_similarity + mining", 1024, 512, 64, lambda e, y: M.multi_similarity(e, y, mining=True),
         lambda e, y: losses.MultiSimilarityLoss()(e, y, miners.MultiSimilarityMiner(0.1)(e, y))),
        ("supcon", 4096, 128, 100, lambda e, y: M.supcon(e, y), lambda e, y: losses.SupConLoss()(e, y)),
        ("nt_xent (2 views)", 512, 128, 256, lambda e, y: M.nt_xent(e, y), lambda e, y: losses.NTXentLoss()(e, y)),
        ("circle", 2048, 128, 64, lambda e, y: M.circle(e, y), lambda e, y: losses.CircleLoss()(e, y)),
        ("contrastive", 2048, 128, 64, lambda e, y: M.contrastive(e, y), lambda e, y: losses.ContrastiveLoss()(e, y)),
        ("triplet all", 512, 128, 16, lambda e, y: M.triplet(e, y), lambda e, y: losses.TripletMarginLoss()(e, y)),
        ("triplet batch_hard", 2048, 128, 64, lambda e, y: M.triplet(e, y, mining="batch_hard"),
         lambda e, y: losses.TripletMarginLoss()(e, y, miners.BatchHardMiner()(e, y))),
    ]  # fmt: skip
    for name, b, d, classes, ours, theirs in cases:
        if quick:
            b, d = min(b, 128), min(d, 32)
        e = torch.randn(b, d, generator=g).to(device)
        if name.startswith("nt_xent"):
            y = torch.arange(b // 2, device=device).repeat(2)
        else:
            y = torch.randint(0, classes, (b,), generator=g).to(device)

        def check(ours=ours, theirs=theirs, e=e, y=y):  # (the CUDA kernels take float32 at most)
            a, c = ours(e if e.is_cuda else e.double(), y).double(), theirs(e.double(), y)
            return float((a - c).abs() / c.abs().clamp_min(1e-30))

        yield Problem(label=f"{name} B={b} d={d} classes={classes}", dtype=torch.float32,
                      contenders=[Contender("fastloss", _grad(ours, e, y)),
                                  Contender("pytorch-metric-learning", _grad(theirs, e, y))],
                      bytes_floor=2 * b * d * 4, check=check)  # fmt: skip


register(BenchCase(family="metric", name="metric info_nce fwd+bwd", make=_info_nce_problems))
register(BenchCase(family="metric", name="metric label losses fwd+bwd", make=_label_problems))
register(BenchCase(family="metric", name="metric clip bf16 fwd+bwd", make=_clip_gpu_problems))
