"""Self-check: every registered op against its float64 reference, on every available device and dtype."""

from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch

from . import _families
from ._library import HAS_CUDA_KERNELS, SIMULATED_CUDA, poison_outputs, simulated_cuda
from ._registry import SELF_CHECKS


class Target(NamedTuple):
    """Where a check runs: ``label`` in the report, ``kind`` matched against ``SelfCheck.devices``,
    the torch ``device`` the tensors live on, and the ``scope`` the check runs in."""

    label: str
    kind: str
    device: torch.device
    scope: object = contextlib.nullcontext


def available_targets() -> list[Target]:
    targets = [Target("cpu", "cpu", torch.device("cpu"))]
    if HAS_CUDA_KERNELS and torch.cuda.is_available():
        targets.append(Target("cuda", "cuda", torch.device("cuda")))
    if SIMULATED_CUDA:  # the CUDA kernels on the simulated device: CPU tensors, ops routed
        targets.append(Target("cuda-sim", "cuda", torch.device("cpu"), simulated_cuda))
    return targets


def available_devices() -> list[torch.device]:
    return [target.device for target in available_targets() if target.scope is contextlib.nullcontext]


def run_self_checks(log=print) -> bool:
    """Runs every check with poisoned outputs; prints one line per (check, device, dtype). True if all pass."""
    _families.import_all("reference")
    all_passed = True
    log(f"{'check':<28} {'device':<8} {'dtype':<9} {'rel. error':>11} {'tolerance':>10}  result")
    for check in SELF_CHECKS:
        for target in available_targets():
            if target.kind not in check.devices:
                continue
            for dtype in check.dtypes:
                try:
                    with poison_outputs(True), target.scope():
                        error, tolerance = check.run(target.device, dtype)
                    passed = error <= tolerance
                    line = f"{error:>11.2e} {tolerance:>10.0e}  {'PASS' if passed else 'FAIL'}"
                except Exception as exc:  # noqa: BLE001 - report and go on with the other checks
                    passed, line = False, f"{'':>11} {'':>10}  FAIL ({type(exc).__name__}: {exc})"
                all_passed &= passed
                log(f"{check.name:<28} {target.label:<8} {str(dtype).replace('torch.', ''):<9} {line}")
    return all_passed
