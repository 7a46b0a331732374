"""Per-call overhead: every public op at tiny sizes against torch's nearest op, in one run.

At tiny sizes the kernels take a few microseconds and what a call costs is its host path: argument
checks, allocations, the dispatcher, autograd. This measures exactly that, forward alone and forward +
backward, side by side with the torch op a user would otherwise call (``None`` where torch has none).

    python -m fastloss.bench.overhead [--device cpu|cuda] [--json PATH] [--rounds N] [--filter TEXT]

Timing: wall clock over ``calls`` back-to-back calls, repeated in ``rounds`` interleaved rounds (every
case once a round, so a load change on a shared machine hits all cases alike); the figure is the
median round's time per call. CUDA calls are synchronized once per round, not per call, so the figure
is the host path (or the kernel, whichever is longer).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F


@dataclass
class Case:
    name: str
    fastloss: Callable[[], object]
    torch_op: Callable[[], object] | None
    torch_name: str


def _backward(fn: Callable[[], object]) -> Callable[[], object]:
    """fn() + backward of a scalar made from its result."""

    def run():
        out = fn()
        if isinstance(out, tuple):
            out = out[0]
        out = getattr(out, "cost", out)
        (out.sum() if out.dim() else out).backward()

    return run


def cases(device: torch.device, grad: bool) -> list[Case]:
    """The public ops at tiny sizes; with ``grad`` the differentiable inputs require a gradient."""
    import fastloss
    import fastloss.metric as metric
    import fastloss.ot as ot
    import fastloss.quant as quant

    g = torch.Generator().manual_seed(0)

    def rand(*shape, dtype=torch.float32, requires_grad=grad):
        return torch.randn(*shape, generator=g).to(device, dtype).requires_grad_(requires_grad)

    def labels(n, classes):
        return torch.randint(0, classes, (n,), generator=g).to(device)

    out: list[Case] = []
    logits, target = rand(4, 16), labels(4, 16)
    ce = (lambda: F.cross_entropy(logits, target))
    out += [Case("zloss 4x16", lambda: fastloss.zloss(logits, target), ce, "F.cross_entropy"),
            Case("spherical_softmax_loss 4x16", lambda: fastloss.spherical_softmax_loss(logits, target), ce,
                 "F.cross_entropy"),
            Case("taylor_softmax_loss 4x16", lambda: fastloss.taylor_softmax_loss(logits, target), ce,
                 "F.cross_entropy")]

    x8, y8 = rand(8, 32), rand(8, 32)

    def materialized_info_nce():
        s = F.normalize(x8, dim=1) @ F.normalize(y8, dim=1).t() / 0.07
        return F.cross_entropy(s, torch.arange(8, device=device))

    out.append(Case("info_nce B=8 d=32", lambda: metric.info_nce(x8, y8), materialized_info_nce,
                    "normalize + matmul + F.cross_entropy"))
    e16, l16 = rand(16, 32), labels(16, 4)
    for fn in ("nt_xent", "supcon", "multi_similarity", "contrastive", "triplet", "circle"):
        out.append(Case(f"{fn} B=16 d=32", (lambda f=getattr(metric, fn): f(e16, l16)), None, ""))
    out.append(Case("auc_loss B=8 d=32", lambda: metric.auc_loss(x8, y8), None, ""))
    keys, positives = rand(16, 32), torch.zeros(8, 16, dtype=torch.bool, device=device)
    positives[:, :2] = True
    out.append(Case("decoupled_softmax 8x16 keys", lambda: metric.decoupled_softmax(x8, keys, positives), None, ""))

    q, k, v = (rand(1, 2, 8, 32) for _ in range(3))
    out.append(Case("softplus_attention N=8 d=32", lambda: fastloss.softplus_attention(q, k, v),
                    lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), "F.scaled_dot_product_attention"))

    cost = rand(8, 8).detach().abs().requires_grad_(grad)
    out.append(Case("ot.sinkhorn 8x8 10 iter", lambda: ot.sinkhorn(cost, eps=0.1, max_iter=10), None, ""))
    px, py = rand(8, 3), rand(8, 3)
    out.append(Case("ot.sinkhorn_divergence 8x8", lambda: ot.sinkhorn_divergence(px, py, eps=0.1, max_iter=10),
                    None, ""))
    if not grad:  # no gradient through an assignment
        scores = rand(16, 8, requires_grad=False)
        out.append(Case("ot.balanced_assignment 16x8", lambda: ot.balanced_assignment(scores), None, ""))
        weight = torch.randn(64, 128, generator=g)
        qw = quant.quantize(weight).to(device)
        x1 = rand(1, 128, dtype=torch.float16, requires_grad=False)
        w16 = weight.to(device, torch.float16)
        out.append(Case("quant.matmul 64x128 M=1", lambda: quant.matmul(x1, qw), lambda: F.linear(x1, w16),
                        "F.linear (fp16 weight)"))
    return out


def _time_rounds(fns: list[Callable[[], object]], device: torch.device, rounds: int, calls: int) -> list[float]:
    """Median over interleaved rounds of the microseconds per call of each fn."""
    samples: list[list[float]] = [[] for _ in fns]
    for fn in fns:
        for _ in range(3):
            fn()
    for _ in range(rounds):
        for i, fn in enumerate(fns):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            samples[i].append((time.perf_counter() - start) / calls * 1e6)
    return [statistics.median(s) for s in samples]


def run(device: torch.device, *, rounds: int = 15, calls: int = 200, name_filter: str = "", log=print) -> dict:
    rows = []
    for mode in ("forward", "forward+backward"):
        grad = mode != "forward"
        selected = [c for c in cases(device, grad) if name_filter in c.name]
        fns, owners = [], []
        for c in selected:
            for impl, fn in (("fastloss", c.fastloss), ("torch", c.torch_op)):
                if fn is None:
                    continue
                fns.append(_backward(fn) if grad else _no_grad(fn))
                owners.append((c, impl))
        times = _time_rounds(fns, device, rounds, calls if not grad else max(1, calls // 2))
        by_case: dict[str, dict] = {}
        for (c, impl), us in zip(owners, times):
            row = by_case.setdefault(c.name, {"case": c.name, "mode": mode, "torch_op": c.torch_name or None})
            row[f"{impl}_us"] = us
        for row in by_case.values():
            torch_us = row.get("torch_us")
            row["ratio"] = row["fastloss_us"] / torch_us if torch_us else None
            rows.append(row)
            ratio = f"{row['ratio']:.2f}x" if row["ratio"] else "-"
            log(f"{mode:16s} {row['case']:34s} fastloss {row['fastloss_us']:9.1f} us   "
                f"{(row['torch_op'] or '-'):38s} {torch_us or math.nan:9.1f} us   {ratio}")
    return {
        "tool": "fastloss.bench.overhead",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": _device_name(device),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "torch": torch.__version__,
        "rounds": rounds,
        "calls_per_round": calls,
        "rows": rows,
    }


def _no_grad(fn: Callable[[], object]) -> Callable[[], object]:
    def run():
        with torch.no_grad():
            return fn()

    return run


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU ({torch.get_num_threads()} torch threads, {os.cpu_count()} cores)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastloss.bench.overhead", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--filter", default="")
    parser.add_argument("--json", default=None, help="where to write the JSON (default: bench/results/overhead-...)")
    args = parser.parse_args(argv)
    report = run(torch.device(args.device), rounds=args.rounds, calls=args.calls, name_filter=args.filter)
    path = Path(args.json or f"bench/results/overhead-{args.device}-{datetime.date.today().isoformat()}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
