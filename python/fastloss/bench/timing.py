"""Timing: warm-up, many samples, median and p20/p80. CUDA samples are timed with events
on the current stream, with the L2 cache flushed between samples; CPU samples with perf_counter.

Quick runs bound each contender twice: ``cap_s`` stops sampling once one sample exists, and
``hard_cap_s`` interrupts a call still running (an interval timer, main thread on POSIX only). On a
busy 2-core machine a loop of small torch ops can take 100x its idle time (OpenMP threads waiting for
a descheduled peer), so without the hard cap one peer's single call could take 20 s."""

from __future__ import annotations

import contextlib
import signal
import statistics
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import torch


@dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    samples: int
    # True when the hard cap interrupted the only call: median_ms is then the time it had run, a lower bound.
    lower_bound: bool = False


def _summarize(samples_ms: list[float]) -> Timing:
    ordered = sorted(samples_ms)

    def quantile(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * (len(ordered) - 1) + 0.5))]

    return Timing(statistics.median(ordered), quantile(0.2), quantile(0.8), len(ordered))


class OutOfTime(BaseException):
    """Raised into a contender's call by the interval timer (a BaseException, so that a peer's
    ``except Exception`` does not swallow it)."""


@contextlib.contextmanager
def interrupt_after(seconds: float | None) -> Iterator[None]:
    """Raises OutOfTime in the block once it has run ``seconds`` (None, or off the main thread: no limit)."""
    usable = hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()
    if seconds is None or not usable:
        yield
        return
    armed = [True]

    def on_alarm(signum, frame):
        if armed[0]:
            raise OutOfTime

    previous = signal.signal(signal.SIGALRM, on_alarm)
    grad_enabled = torch.is_grad_enabled()
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 1e-3))
    try:
        yield
    except OutOfTime:
        # The interrupt can land between a context manager's __enter__ and its block (inside
        # torch.no_grad(), say), whose __exit__ then never runs: restore the global grad mode.
        torch.set_grad_enabled(grad_enabled)
        raise
    finally:
        armed[0] = False
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def time_callable(fn: Callable[[], object], device: torch.device, *, min_samples: int = 10, max_samples: int = 200,
                  budget_s: float = 1.0, warmup: int = 3, cap_s: float | None = None,
                  hard_cap_s: float | None = None) -> Timing:
    """Times ``fn`` after ``warmup`` calls: at least ``min_samples`` samples, more (up to ``max_samples``)
    while ``budget_s`` seconds of sampling last.

    ``cap_s`` bounds the measurement, warm-up included, once one sample exists: a contender too slow for
    ``min_samples`` within it gets fewer samples (``Timing.samples`` says how many), and a warm-up call
    longer than half of it is taken as the only sample. ``hard_cap_s`` interrupts a call still running
    after that many seconds: the samples taken so far count, else the completed warm-up call, else the
    interrupted call's time as a lower bound (``Timing.lower_bound``)."""
    samples: list[float] = []
    warm_ms: list[float] = []
    call_start = [time.perf_counter()]
    try:
        with interrupt_after(hard_cap_s):
            return _measure(fn, device, min_samples, max_samples, budget_s, warmup, cap_s, samples, warm_ms,
                            call_start)  # fmt: skip
    except OutOfTime:
        if samples:
            return _summarize(samples)
        if warm_ms:
            return _summarize(warm_ms[-1:])
        ran_ms = (time.perf_counter() - call_start[0]) * 1e3
        return Timing(ran_ms, ran_ms, ran_ms, 0, lower_bound=True)


def _measure(fn, device, min_samples, max_samples, budget_s, warmup, cap_s, samples, warm_ms, call_start) -> Timing:
    """The measurement proper; fills ``samples`` and ``warm_ms`` as it goes (they survive an interrupt)."""
    started = time.perf_counter()
    for i in range(warmup):
        call_start[0] = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        warm_ms.append((time.perf_counter() - call_start[0]) * 1e3)
        if cap_s is not None and warm_ms[-1] > cap_s * 1e3 / 2:
            return _summarize(warm_ms[-1:])  # too slow to call again within the cap
        # One warm-up is enough for a slow call (compilation and caches are set up by the first one).
        if warm_ms[-1] > budget_s * 1e3 / 4:
            break
    cap_deadline = None if cap_s is None else started + cap_s
    deadline = time.perf_counter() + budget_s
    if device.type == "cuda":
        l2_bytes = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 64 << 20)
        flush = torch.empty(2 * l2_bytes, dtype=torch.uint8, device=device)
        torch.cuda.synchronize(device)
        while _more(samples, min_samples, max_samples, deadline, cap_deadline):
            flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            call_start[0] = time.perf_counter()
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end))
        return _summarize(samples)
    while _more(samples, min_samples, max_samples, deadline, cap_deadline):
        call_start[0] = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - call_start[0]) * 1e3)
    return _summarize(samples)


def _more(samples: list[float], min_samples: int, max_samples: int, deadline: float, cap_deadline: float | None) -> bool:
    now = time.perf_counter()
    if samples and cap_deadline is not None and now > cap_deadline:
        return False
    return len(samples) < min_samples or (len(samples) < max_samples and now < deadline)


def copy_bandwidth_gbps(device: torch.device, megabytes: int = 256) -> float:
    """Measured device-memory bandwidth of a large copy, counting bytes read plus bytes written."""
    n = megabytes * (1 << 20) // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    timing = time_callable(lambda: dst.copy_(src), device, min_samples=5, max_samples=30, budget_s=0.5)
    return 2 * src.numel() * 4 / (timing.median_ms * 1e-3) / 1e9
