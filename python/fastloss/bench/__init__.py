"""Side-by-side benchmarks: fastloss against the implementations a user would otherwise pick,
timed in one run on the available device. Run with ``python -m fastloss.bench``.

Each family registers its cases from ``fastloss/bench/<family>.py``. A case builds, for one
problem size, a dict of named callables that all compute the same thing (forward and backward),
plus the fewest bytes the computation must move, so the runner can report the bytes floor.
Peer libraries (POT, pytorch-metric-learning, geomloss, liger-kernel, ...) are imported only
when installed (the ``bench`` extra).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch


@dataclass
class Contender:
    name: str
    run: Callable[[], object]


@dataclass
class Problem:
    label: str                    # e.g. "N=64 D=32768"
    dtype: torch.dtype
    contenders: list[Contender]   # the first one is fastloss
    bytes_floor: int              # the fewest bytes moved through memory
    check: Callable[[], float] | None = None  # max relative difference between contenders (sanity)
    # For compute-bound kernels: the floor in ms from another limit than bytes (say, the GPU's
    # exponential throughput), and what that limit is. The runner uses it instead of bytes_floor.
    floor_ms: float | None = None
    floor_kind: str = "bytes"


@dataclass
class BenchCase:
    family: str
    name: str
    # make(device, quick) -> the problems to time
    make: Callable[[torch.device, bool], list[Problem]]
    tags: tuple[str, ...] = field(default_factory=tuple)


CASES: list[BenchCase] = []


def register(case: BenchCase) -> BenchCase:
    CASES.append(case)
    return case


def optional_import(module: str):
    """A peer library if it is installed, else None."""
    try:
        return __import__(module)
    except Exception:  # noqa: BLE001 - any import failure means "not available"
        return None
