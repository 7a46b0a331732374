"""Calibrates the inline thresholds of the CPU kernels (issue 17): for each kernel kind, a sweep of
sizes timed with 1 thread and with all threads (torch.set_num_threads, which fastloss follows),
interleaved, medians. The threshold is the smallest size where all threads beat one by >= 10%;
below it the kernel should run inline (its grain in csrc/<family>/*_cpu.cpp keeps it there).

    PYTHONPATH=<staged fastloss> python3 bench/threads_calibrate.py [--out file.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

import fastloss
import fastloss.metric
import fastloss.ot
import fastloss.quant


def _sweeps():
    """kind -> [(size label, work (multiply-adds or elements), step)]."""
    g = torch.Generator().manual_seed(0)
    out = {}
    rows = []
    for n, k in [(32, 128), (64, 128), (128, 128), (256, 256), (512, 512), (1024, 1024), (4096, 4096)]:
        qw = fastloss.quant.quantize(torch.randn(n, k, generator=g) * 0.02)
        x = torch.randn(1, k, generator=g)
        rows.append((f"{n}x{k} M=1", n * k, lambda x=x, qw=qw: fastloss.quant.matmul(x, qw)))
    out["quant.matmul M=1 (weights)"] = rows
    rows = []
    for n, k in [(64, 128), (128, 256), (256, 512), (512, 1024), (1024, 1024), (4096, 4096)]:
        qw = fastloss.quant.quantize(torch.randn(n, k, generator=g) * 0.02)
        x = torch.randn(16, k, generator=g)
        rows.append((f"{n}x{k} M=16", 16 * n * k, lambda x=x, qw=qw: fastloss.quant.matmul(x, qw)))
    out["quant.matmul M=16 (MACs)"] = rows
    rows = []
    for r, c in [(8, 1024), (16, 4096), (64, 4096), (64, 16384), (64, 32768)]:
        logits = torch.randn(r, c, generator=g)
        t = torch.randint(0, c, (r,), generator=g)
        rows.append((f"{r}x{c}", r * c, lambda logits=logits, t=t: fastloss.zloss(logits, t)))
    out["zloss forward (elements)"] = rows
    rows = []
    for b in (32, 64, 128, 256, 512):
        q = torch.randn(b, 128, generator=g, requires_grad=True)
        k = torch.randn(b, 128, generator=g, requires_grad=True)
        rows.append((f"B={b} d=128", b * b * 128, lambda q=q, k=k: fastloss.metric.info_nce(q, k).backward()))
    out["metric.info_nce fwd+bwd (B^2 d)"] = rows
    rows = []
    for n in (32, 64, 128, 256):
        cost = torch.rand(n, n, generator=g)
        rows.append((f"{n}x{n}", n * n, lambda cost=cost: fastloss.ot.sinkhorn(cost, eps=0.05).cost))
    out["ot.sinkhorn (n m per iteration)"] = rows
    rows = []
    for n in (32, 64, 128, 256):
        qkv = [torch.randn(1, 4, n, 64, generator=g, requires_grad=True) for _ in range(3)]
        rows.append((f"1x4x{n}x64", 4 * n * n * 64,
                     lambda qkv=qkv: fastloss.attention.softplus_attention(*qkv).sum().backward()))
    out["softplus_attention fwd+bwd (H n^2 d)"] = rows
    rows = []
    for d, m in [(16, 16), (32, 32), (64, 64), (128, 64)]:
        layer = fastloss.nn.SphericalOutputLayer(d, 100_000, loss="zloss", lr=1e-4)
        h = torch.randn(m, d, generator=g, requires_grad=True)
        t = torch.randint(0, 100_000, (m,), generator=g)
        rows.append((f"d={d} m={m}", m * d * d, lambda layer=layer, h=h, t=t: layer(h, t).backward()))
    out["SphericalOutputLayer step (m d^2)"] = rows
    return out


def _median_ms(fn, threads: int, repeats: int) -> float:
    torch.set_num_threads(threads)
    fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    many = torch.get_num_threads()
    report = {"threads": many, "load_average_1min": [os.getloadavg()[0]], "kinds": {}}
    for kind, rows in _sweeps().items():
        print(kind)
        results = []
        for label, work, fn in rows:
            one, all_ = [], []
            for _ in range(args.rounds):  # interleaved, so both see the same load
                one.append(_median_ms(fn, 1, args.repeats))
                all_.append(_median_ms(fn, many, args.repeats))
            t1, tn = statistics.median(one), statistics.median(all_)
            results.append({"size": label, "work": work, "one_thread_ms": round(t1, 4), "all_threads_ms": round(tn, 4),
                            "speedup": round(t1 / tn, 3)})
            print(f"  {label:<16} work {work:>11}  1 thread {t1:9.4f} ms  {many} threads {tn:9.4f} ms  x{t1 / tn:.2f}")
        threshold = next((r for r in results if r["speedup"] >= 1.1), None)
        report["kinds"][kind] = {"sweep": results, "threshold": threshold and threshold["size"]}
    torch.set_num_threads(many)
    report["load_average_1min"].append(os.getloadavg()[0])
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
