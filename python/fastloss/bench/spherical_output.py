"""Benchmark of one training step of a huge-vocabulary output layer (imported by ``bench/spherical.py``).

Contenders, one step each (forward, backward, SGD update of the D x d output weights):
  fastloss factored       SphericalOutputLayer (Z-loss), the exact O(d^2) update (defaults: stability guard on).
  fastloss factored graph the same step captured once in a CUDA graph and replayed (guard off), CUDA only.
  dense zloss             a float32 nn.Linear-style W, logits = h W^T, fastloss.zloss, W -= lr dW: the same loss.
  torch CE fp32           F.cross_entropy on float32 logits + SGD: the softmax baseline.
  torch CE bf16 autocast  the same under bf16 autocast (float32 master W), what a user runs for speed.
  torch linear_CE         torch.nn.functional.linear_cross_entropy, where this torch has it.
  liger FLCE / cut CE     LigerFusedLinearCrossEntropyLoss / cut_cross_entropy.linear_cross_entropy (bf16), where installed.
The ratio the issue asks for is fastloss against the fastest softmax-CE contender of the same problem.
"""

from __future__ import annotations

from typing import Iterator

import torch
import torch.nn.functional as F

from .. import spherical as dense_losses
from ..nn.spherical_output import SphericalOutputLayer
from . import BenchCase, Contender, Problem, optional_import, register

LR = 1e-3
PAPER_D = 793_471
CUDA_GRID = [(PAPER_D, d, m) for d in (512, 1024, 2048) for m in (128, 1024)] + [(D, 512, 128) for D in (10_000, 100_000, 1_000_000)]
CPU_GRID = [(D, 128, 128) for D in (10_000, 100_000, 1_000_000)] + [(PAPER_D, 256, 128)]
QUICK_GRID = [(5_000, 32, 16)]


def _factored_step(layer, h, target):
    def step():
        layer(h, target).backward()

    return step


def _factored_graph_step(layer, h, target):
    """Capture one step (forward, backward, update) in a CUDA graph; each call replays it."""
    layer.check_stability = False
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            layer(h, target).backward()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        layer(h, target).backward()
    return graph.replay


def _sgd_step(weight, loss):
    (grad,) = torch.autograd.grad(loss, weight)
    with torch.no_grad():
        weight.sub_(grad, alpha=LR)


def _dense_step(weight, h, target, loss_fn, autocast=False):
    def step():
        with torch.autocast(h.device.type, dtype=torch.bfloat16, enabled=autocast):
            logits = h @ weight.t()
        _sgd_step(weight, loss_fn(logits.float() if not autocast else logits, target))

    return step


def _peer_steps(weight, h, target) -> list[Contender]:
    peers = []
    if hasattr(F, "linear_cross_entropy"):
        peers.append(Contender("torch linear_CE", lambda: _sgd_step(weight, F.linear_cross_entropy(h, weight, target))))
    liger = optional_import("liger_kernel.transformers")
    if liger is not None and h.is_cuda:
        flce = liger.LigerFusedLinearCrossEntropyLoss()
        w16, h16 = weight.detach().bfloat16().requires_grad_(), h.bfloat16()
        peers.append(Contender("liger FLCE bf16", lambda: _sgd_step(w16, flce(w16, h16, target))))
    cce = optional_import("cut_cross_entropy")
    if cce is not None and h.is_cuda:
        w16, h16 = weight.detach().bfloat16().requires_grad_(), h.bfloat16()
        peers.append(Contender("cut CE bf16", lambda: _sgd_step(w16, cce.linear_cross_entropy(h16, w16, target))))
    return peers


def _problems(device: torch.device, quick: bool, compile_peer: bool = True) -> Iterator[Problem]:
    """A generator: each problem (up to 20 GB of weights at d=2048) is built when the runner reaches it."""
    grid = QUICK_GRID if quick else (CUDA_GRID if device.type == "cuda" else CPU_GRID)
    for classes, d, m in grid:
        generator = torch.Generator(device=device).manual_seed(classes + d + m)
        h = torch.randn(m, d, device=device, generator=generator)
        target = torch.randint(0, classes, (m,), device=device, generator=generator)
        layer = SphericalOutputLayer(d, classes, loss="zloss", lr=LR, device=device)
        contenders = [Contender("fastloss factored", _factored_step(layer, h, target))]
        if device.type == "cuda":
            graph_layer = SphericalOutputLayer(d, classes, loss="zloss", lr=LR, device=device)
            contenders.append(Contender("fastloss graph", _factored_graph_step(graph_layer, h, target)))
        weight = layer.weight.float().requires_grad_()
        contenders.append(Contender("dense zloss", _dense_step(weight, h, target, dense_losses.zloss)))
        contenders.append(Contender("torch CE fp32", _dense_step(weight, h, target, F.cross_entropy)))
        if device.type == "cuda":
            contenders.append(Contender("torch CE bf16", _dense_step(weight, h, target, F.cross_entropy, autocast=True)))
        contenders.extend(_peer_steps(weight, h, target))
        state_bytes = (3 * d * d + 2 * d) * layer.packed.element_size()
        yield Problem(label=f"D={classes} d={d} m={m}", dtype=torch.float32, contenders=contenders,
                      bytes_floor=2 * state_bytes)  # fmt: skip
        del layer, weight, contenders


register(BenchCase(family="spherical", name="output layer step", make=_problems))
