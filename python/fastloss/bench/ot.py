"""Benchmarks of the optimal-transport family, against the peers a user would pick, at equal work:

  sinkhorn (cost matrix)     fastloss.ot.sinkhorn with a fixed iteration count (check_every=0) vs POT's
                             ot.sinkhorn(method="sinkhorn_log") on the same torch tensors (POT's torch
                             backend, stopThr=0 so it runs every iteration) and the plain PyTorch
                             log-domain loop (fastloss.reference.ot.sinkhorn_log).
  sinkhorn_points            fastloss.ot.sinkhorn_points, cost on the fly, vs GeomLoss's SamplesLoss
                             (debias=False, tensorized; KeOps "online" where pykeops builds) with the same
                             number of eps-scaling steps, POT on the materialized cost, and the plain loop.
                             Forward + backward of the loss (envelope gradients everywhere).
  sinkhorn batched           B problems in one call vs a Python loop of POT solves.
  balanced assignment        fastloss.ot.balanced_assignment vs SwAV's exponential-domain loop.
On CUDA the floor is the exponential throughput (2 n m exponentials per iteration at ~3.9e12/s on an
H100, ../shared/reference/ot.md); on the CPU the bytes floor is reported.
"""

from __future__ import annotations

import math
from typing import Iterator

import torch

from .. import ot as O
from ..reference import ot as R
from . import BenchCase, Contender, Problem, optional_import, register

EXP_PER_SECOND_H100 = 3.9e12
ITERATIONS = 100


def _exp_floor_ms(device, exps: float) -> float | None:
    return exps / EXP_PER_SECOND_H100 * 1e3 if device.type == "cuda" else None


def _pot():
    return optional_import("ot")


def _cost_matrix_problems(device: torch.device, quick: bool, compile_peer: bool = True) -> Iterator[Problem]:
    sizes = [(200, 200)] if quick else ([(2000, 2000)] if device.type == "cpu" else [(4096, 4096), (10000, 10000)])
    pot = _pot()
    generator = torch.Generator().manual_seed(0)
    eps = 0.05
    for n, m in sizes:
        C = torch.rand(n, m, generator=generator).to(device)
        a = torch.full((n,), 1 / n, device=device)
        b = torch.full((m,), 1 / m, device=device)
        calls = {"fastloss": lambda C=C: O.sinkhorn(C, eps=eps, max_iter=ITERATIONS, check_every=0).f}
        if pot is not None:
            calls["POT sinkhorn_log"] = lambda C=C, a=a, b=b: pot.sinkhorn(
                a, b, C, eps, method="sinkhorn_log", numItermax=ITERATIONS, stopThr=0.0)
        calls["torch log loop"] = lambda C=C, a=a, b=b: R.sinkhorn_log(C, a, b, eps, ITERATIONS)[0]

        def check(C=C, a=a, b=b):
            ours = O.sinkhorn(C, eps=eps, max_iter=ITERATIONS, check_every=0)
            f, g = R.sinkhorn_log(C.double(), a.double(), b.double(), eps, ITERATIONS)
            return float((ours.f.double() - f).norm() / f.norm())

        yield Problem(label=f"n={n} m={m} it={ITERATIONS}", dtype=torch.float32,
                      contenders=[Contender(k, v) for k, v in calls.items()], bytes_floor=2 * ITERATIONS * n * m * 4,
                      check=check, floor_ms=_exp_floor_ms(device, 2.0 * n * m * ITERATIONS), floor_kind="exp")  # fmt: skip


def _geomloss_steps(x, y, blur, scaling) -> int | None:
    try:
        from geomloss._legacy.sinkhorn_divergence import epsilon_schedule
    except Exception:  # noqa: BLE001
        return None
    diameter = float((torch.cat([x, y]).amax(0) - torch.cat([x, y]).amin(0)).norm())
    return len(epsilon_schedule(2, diameter, blur, scaling))


def _points_problems(device: torch.device, quick: bool, compile_peer: bool = True) -> Iterator[Problem]:
    if quick:
        shapes = [(300, 3)]
    elif device.type == "cpu":
        shapes = [(2000, 3), (2000, 64)]
    else:
        shapes = [(10000, 3), (10000, 64), (10000, 128), (100000, 3), (100000, 64), (100000, 128)]
    geomloss = optional_import("geomloss")
    pot = _pot()
    generator = torch.Generator().manual_seed(1)
    blur, scaling = 0.05, 0.9
    eps = blur**2
    for n, d in shapes:
        x0 = torch.randn(n, d, generator=generator).to(device) / math.sqrt(d)
        y0 = (torch.randn(n, d, generator=generator) / math.sqrt(d) + 0.5 / math.sqrt(d)).to(device)
        # GeomLoss's scaling is on blur = eps^(1/p): its eps shrinks by scaling^p per step, from diameter^p.
        steps = _geomloss_steps(x0, y0, blur, scaling) or 30
        diameter = float((torch.cat([x0, y0]).amax(0) - torch.cat([x0, y0]).amin(0)).norm())
        eps_start = diameter**2

        def ours(x0=x0, y0=y0, steps=steps, eps_start=eps_start):
            x = x0.clone().requires_grad_(True)
            loss = O.sinkhorn_points(x, y0, eps=eps, max_iter=steps, check_every=0, eps_scaling=scaling**2,
                                     eps_start=eps_start).cost  # fmt: skip
            loss.backward()
            return x.grad

        calls = {"fastloss": ours}
        dense_ok = n * n * 4 * 3 < (8 << 30)  # the materialized peers need a few n x n buffers
        if geomloss is not None and dense_ok:
            tensorized = geomloss.SamplesLoss("sinkhorn", p=2, blur=blur, scaling=scaling, debias=False,
                                              backend="tensorized")  # fmt: skip

            def geom(x0=x0, y0=y0, loss_fn=tensorized):
                x = x0.clone().requires_grad_(True)
                loss_fn(x, y0).backward()
                return x.grad

            calls["GeomLoss tensorized"] = geom
        if geomloss is not None and optional_import("pykeops") is not None:
            online = geomloss.SamplesLoss("sinkhorn", p=2, blur=blur, scaling=scaling, debias=False, backend="online")

            def keops(x0=x0, y0=y0, loss_fn=online):
                x = x0.clone().requires_grad_(True)
                loss_fn(x, y0).backward()
                return x.grad

            calls["GeomLoss online"] = keops
        if dense_ok:
            a = torch.full((n,), 1 / n, device=device)

            def plain(x0=x0, y0=y0, a=a, steps=steps):
                x = x0.clone().requires_grad_(True)
                C = R.sq_euclidean_half(x, y0) if d <= 8 else 0.5 * torch.cdist(x, y0).square()
                with torch.no_grad():
                    f, g = R.sinkhorn_log(C, a, a, eps, steps)
                R.dual_value(C, a, a, f, g, eps).backward()  # envelope: potentials held fixed
                return x.grad

            calls["torch log loop"] = plain
            if pot is not None:

                def pot_solve(x0=x0, y0=y0, a=a, steps=steps):
                    x = x0.clone().requires_grad_(True)
                    C = 0.5 * torch.cdist(x, y0).square()
                    loss = pot.solve(C, a, a, reg=eps, method="sinkhorn_log", max_iter=steps, tol=0.0,
                                     grad="envelope").value  # fmt: skip
                    loss.backward()
                    return x.grad

                calls["POT solve"] = pot_solve

        def check(x0=x0, y0=y0, steps=steps, eps_start=eps_start):
            if geomloss is None or not dense_ok:
                return None
            ours_value = O.sinkhorn_points(x0, y0, eps=eps, max_iter=steps, check_every=0, eps_scaling=scaling**2,
                                           eps_start=eps_start).cost  # fmt: skip
            theirs = geomloss.SamplesLoss("sinkhorn", p=2, blur=blur, scaling=scaling, debias=False,
                                          backend="tensorized")(x0, y0)  # fmt: skip
            return float((ours_value - theirs).abs() / theirs.abs())

        yield Problem(label=f"n=m={n} d={d} it={steps}", dtype=torch.float32,
                      contenders=[Contender(k, v) for k, v in calls.items()], bytes_floor=2 * n * (d + 2) * 4,
                      check=check, floor_ms=_exp_floor_ms(device, 2.0 * n * n * (steps + 1)), floor_kind="exp")  # fmt: skip


def _batched_problems(device: torch.device, quick: bool, compile_peer: bool = True) -> Iterator[Problem]:
    B, n = (4, 64) if quick else ((16, 256) if device.type == "cpu" else (64, 512))
    pot = _pot()
    generator = torch.Generator().manual_seed(2)
    C = torch.rand(B, n, n, generator=generator).to(device)
    a = torch.full((n,), 1 / n, device=device)
    eps = 0.05
    calls = {"fastloss": lambda: O.sinkhorn(C, eps=eps, max_iter=ITERATIONS, check_every=0).f}
    if pot is not None:
        calls["POT loop"] = lambda: [pot.sinkhorn(a, a, C[i], eps, method="sinkhorn_log", numItermax=ITERATIONS,
                                                  stopThr=0.0) for i in range(B)]  # fmt: skip
    calls["torch log loop"] = lambda: R.sinkhorn_log(C, a.expand(B, n), a.expand(B, n), eps, ITERATIONS)[0]
    yield Problem(label=f"B={B} n=m={n} it={ITERATIONS}", dtype=torch.float32,
                  contenders=[Contender(k, v) for k, v in calls.items()], bytes_floor=C.numel() * 4,
                  floor_ms=_exp_floor_ms(device, 2.0 * B * n * n * ITERATIONS), floor_kind="exp")  # fmt: skip


def _assignment_problems(device: torch.device, quick: bool, compile_peer: bool = True) -> Iterator[Problem]:
    B, K = (256, 100) if quick else (4096, 3000)
    generator = torch.Generator().manual_seed(3)
    z = torch.nn.functional.normalize(torch.randn(B, 128, generator=generator), dim=1)
    protos = torch.nn.functional.normalize(torch.randn(K, 128, generator=generator), dim=1)
    scores = (z @ protos.t()).to(device)
    calls = {
        "fastloss": lambda: O.balanced_assignment(scores),
        "SwAV exp loop": lambda: R.swav_sinkhorn_knopp(scores, 0.05, 3),
    }

    def check():
        return float((O.balanced_assignment(scores) - R.swav_sinkhorn_knopp(scores.double(), 0.05, 3)).norm()
                     / B**0.5)  # fmt: skip

    yield Problem(label=f"B={B} K={K}", dtype=torch.float32, contenders=[Contender(k, v) for k, v in calls.items()],
                  bytes_floor=scores.numel() * 4 * 2, check=check)  # fmt: skip


register(BenchCase(family="ot", name="ot sinkhorn cost matrix", make=_cost_matrix_problems))
register(BenchCase(family="ot", name="ot sinkhorn_points fwd+bwd", make=_points_problems))
register(BenchCase(family="ot", name="ot sinkhorn batched", make=_batched_problems))
register(BenchCase(family="ot", name="ot balanced assignment", make=_assignment_problems))
