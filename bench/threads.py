"""CPU threads benchmark (issue 17): each fastloss CPU op alone vs. in a loop alternating with a torch matmul.

In a training loop fastloss ops follow torch ops, whose OpenMP workers keep spinning for a while after a
parallel region, and other processes (data loaders) share the cores. This measures, in one run, every
fastloss CPU op at a realistic size

  alone        the op back to back,
  alternating  torch matmul (512 x 512), then the op (only the op is timed),

on a quiet machine and with one core kept busy by a busy-loop subprocess, in the default environment.
The goal is alternating / alone <= 1.3 in both conditions.

    python3 bench/threads.py                                # the importable fastloss
    python3 bench/threads.py --build before=/tmp/a --build after=/tmp/b   # staged builds, interleaved
    python3 bench/threads.py --build own=/tmp/b,FASTLOSS_CPU_POOL=own      # a build with extra environment

Each build runs in its own worker process (PYTHONPATH=<dir>); builds and conditions are interleaved
round by round and the medians over rounds are reported, so two builds see the same machine noise.
Writes bench/results/cpu-threads-<date>.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MATMUL_N = 512


def _cases():
    """(name, step) for every fastloss CPU op; imported in the worker only."""
    import torch

    import fastloss
    import fastloss.metric
    import fastloss.ot
    import fastloss.quant
    from fastloss.nn import SphericalOutputLayer

    g = torch.Generator().manual_seed(0)
    cases = []

    layer = SphericalOutputLayer(128, 100_000, loss="zloss", lr=1e-4)
    h = torch.randn(64, 128, generator=g, requires_grad=True)
    target = torch.randint(0, 100_000, (64,), generator=g)
    cases.append(("SphericalOutputLayer step D=100000 d=128 m=64", lambda: layer(h, target).backward()))

    logits = torch.randn(64, 32768, generator=g)
    labels = torch.randint(0, 32768, (64,), generator=g)
    cases.append(("zloss forward 64x32768", lambda: fastloss.zloss(logits, labels)))
    logits_g = logits.clone().requires_grad_()
    cases.append(("zloss fwd+bwd 64x32768", lambda: fastloss.zloss(logits_g, labels).backward()))

    qw = fastloss.quant.quantize(torch.randn(4096, 4096, generator=g) * 0.02)
    for m in (1, 16):
        x = torch.randn(m, 4096, generator=g)
        cases.append((f"quant.matmul M={m} 4096x4096", lambda x=x: fastloss.quant.matmul(x, qw)))

    q = torch.randn(512, 128, generator=g, requires_grad=True)
    k = torch.randn(512, 128, generator=g, requires_grad=True)
    cases.append(("metric.info_nce fwd+bwd B=512 d=128", lambda: fastloss.metric.info_nce(q, k).backward()))

    cost = torch.rand(256, 256, generator=g)
    cases.append(("ot.sinkhorn 256x256 eps=0.05", lambda: fastloss.ot.sinkhorn(cost, eps=0.05).cost))

    qa, ka, va = (torch.randn(1, 4, 256, 64, generator=g, requires_grad=True) for _ in range(3))
    cases.append(("softplus_attention fwd+bwd 1x4x256x64",
                  lambda: fastloss.attention.softplus_attention(qa, ka, va).sum().backward()))
    return cases


def _time_ms(fn) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def worker(blocks: int, per_block: int, only: str) -> dict:
    """One measurement round: for every op, `blocks` interleaved blocks of alone / alternating calls."""
    import torch

    a = torch.randn(MATMUL_N, MATMUL_N)
    b = torch.randn(MATMUL_N, MATMUL_N)
    out = {}
    for name, step in _cases():
        if only and not any(word in name for word in only.split(",")):
            continue
        for _ in range(3):
            step()
        alone, alternating, matmul = [], [], []
        for _ in range(blocks):
            for _ in range(per_block):
                alone.append(_time_ms(step))
            for _ in range(per_block):
                matmul.append(_time_ms(lambda: torch.mm(a, b)))
                alternating.append(_time_ms(step))
        out[name] = {"alone_ms": statistics.median(alone), "alternating_ms": statistics.median(alternating),
                     "matmul_ms": statistics.median(matmul)}
    import fastloss
    return {"results": out, "torch_threads": torch.get_num_threads(), "build": fastloss.build_info()}


def _busy_loop() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def _run_worker(spec: str | None, blocks: int, per_block: int, only: str) -> dict:
    """spec: DIR[,VAR=VALUE...], the staged package and extra environment of one build."""
    env = dict(os.environ)
    path, *extra = (spec or "").split(",")
    if path:
        env["PYTHONPATH"] = path + os.pathsep + env.get("PYTHONPATH", "")
    env.update(item.split("=", 1) for item in extra)
    cmd = [sys.executable, __file__, "--worker", "--blocks", str(blocks), "--per-block", str(per_block), "--only", only]
    done = subprocess.run(cmd, env=env, cwd="/tmp", capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _summary(rounds: list[dict]) -> dict:
    out = {}
    for name in rounds[0]["results"]:
        alone = statistics.median(r["results"][name]["alone_ms"] for r in rounds)
        alt = statistics.median(r["results"][name]["alternating_ms"] for r in rounds)
        ratios = [r["results"][name]["alternating_ms"] / r["results"][name]["alone_ms"] for r in rounds]
        out[name] = {"alone_ms": round(alone, 4), "alternating_ms": round(alt, 4), "ratio": round(alt / alone, 3),
                     "ratio_per_round": [round(x, 3) for x in ratios],
                     "alone_ms_per_round": [round(r["results"][name]["alone_ms"], 4) for r in rounds]}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--build", action="append", default=[],
                    help="NAME=DIR[,VAR=VALUE...]: a staged fastloss to put on PYTHONPATH, with extra environment")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--blocks", type=int, default=4)
    ap.add_argument("--per-block", type=int, default=8)
    ap.add_argument("--conditions", default="quiet,busy")
    ap.add_argument("--only", default="", help="comma-separated substrings of the op names to run")
    ap.add_argument("--out", default=None)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.blocks, args.per_block, args.only)))
        return
    builds = [b.split("=", 1) for b in args.build] or [["current", None]]
    conditions = args.conditions.split(",")
    raw = {(c, name): [] for c in conditions for name, _ in builds}
    loads = {c: [] for c in conditions}
    for r in range(args.rounds):
        for condition in conditions:
            busy = _busy_loop() if condition == "busy" else None
            try:
                time.sleep(0.5 if busy else 0)
                loads[condition].append(os.getloadavg()[0])
                for name, path in (builds if r % 2 == 0 else builds[::-1]):
                    raw[(condition, name)].append(_run_worker(path, args.blocks, args.per_block, args.only))
            finally:
                if busy:
                    busy.kill()
                    busy.wait()
            print(f"round {r + 1}/{args.rounds} {condition} done (load {loads[condition][-1]:.1f})", file=sys.stderr)
    report = {
        "tool": "bench/threads.py",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs",
        "env": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "FASTLOSS_NUM_THREADS")},
        "matmul": f"torch.mm {MATMUL_N}x{MATMUL_N} float32 before each alternating call",
        "goal": "alternating_ms / alone_ms <= 1.3",
        "rounds": args.rounds, "blocks": args.blocks, "per_block": args.per_block,
        "load_average_1min": loads,
        "builds": {name: spec for name, spec in builds},
        "results": {c: {name: _summary(raw[(c, name)]) for name, _ in builds} for c in conditions},
    }
    for condition in conditions:
        print(f"\n{condition} (1-min load average {', '.join(f'{x:.1f}' for x in loads[condition])})")
        print(f"{'op':<46}" + "".join(f"{name + ' alone/alt ms (ratio)':>36}" for name, _ in builds))
        for op in report["results"][condition][builds[0][0]]:
            cells = []
            for name, _ in builds:
                s = report["results"][condition][name][op]
                cells.append(f"{s['alone_ms']:9.3f} /{s['alternating_ms']:9.3f} ({s['ratio']:.2f})")
            print(f"{op:<46}" + "".join(f"{c:>36}" for c in cells))
    out = Path(args.out) if args.out else REPO / "bench" / "results" / f"cpu-threads-{datetime.date.today()}.json"
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
