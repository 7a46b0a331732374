"""Timing: warm-up, many samples, median and p20/p80. CUDA samples are timed with events
on the current stream, with the L2 cache flushed between samples; CPU samples with perf_counter."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    samples: int


def _summarize(samples_ms: list[float]) -> Timing:
    ordered = sorted(samples_ms)

    def quantile(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * (len(ordered) - 1) + 0.5))]

    return Timing(statistics.median(ordered), quantile(0.2), quantile(0.8), len(ordered))


def time_callable(fn: Callable[[], object], device: torch.device, *, min_samples: int = 10, max_samples: int = 200,
                  budget_s: float = 1.0, warmup: int = 3) -> Timing:
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        return _time_cuda(fn, device, min_samples, max_samples, budget_s)
    samples: list[float] = []
    deadline = time.perf_counter() + budget_s
    while len(samples) < min_samples or (len(samples) < max_samples and time.perf_counter() < deadline):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return _summarize(samples)


def _time_cuda(fn, device, min_samples, max_samples, budget_s) -> Timing:
    l2_bytes = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 64 << 20)
    flush = torch.empty(2 * l2_bytes, dtype=torch.uint8, device=device)
    samples: list[float] = []
    deadline = time.perf_counter() + budget_s
    torch.cuda.synchronize(device)
    while len(samples) < min_samples or (len(samples) < max_samples and time.perf_counter() < deadline):
        flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end))
    return _summarize(samples)


def copy_bandwidth_gbps(device: torch.device, megabytes: int = 256) -> float:
    """Measured device-memory bandwidth of a large copy, counting bytes read plus bytes written."""
    n = megabytes * (1 << 20) // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    timing = time_callable(lambda: dst.copy_(src), device, min_samples=5, max_samples=30, budget_s=0.5)
    return 2 * src.numel() * 4 / (timing.median_ms * 1e-3) / 1e9
