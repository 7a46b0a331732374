"""Self-check: every registered op against its float64 reference, on every available device and dtype."""

from __future__ import annotations

import torch

from . import _families
from ._library import HAS_CUDA_KERNELS, poison_outputs
from ._registry import SELF_CHECKS


def available_devices() -> list[torch.device]:
    devices = [torch.device("cpu")]
    if HAS_CUDA_KERNELS and torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    return devices


def run_self_checks(log=print) -> bool:
    """Runs every check with poisoned outputs; prints one line per (check, device, dtype). True if all pass."""
    _families.import_all("reference")
    all_passed = True
    log(f"{'check':<28} {'device':<7} {'dtype':<9} {'rel. error':>11} {'tolerance':>10}  result")
    for check in SELF_CHECKS:
        for device in available_devices():
            if device.type not in check.devices:
                continue
            for dtype in check.dtypes:
                try:
                    with poison_outputs(True):
                        error, tolerance = check.run(device, dtype)
                    passed = error <= tolerance
                    line = f"{error:>11.2e} {tolerance:>10.0e}  {'PASS' if passed else 'FAIL'}"
                except Exception as exc:  # noqa: BLE001 - report and go on with the other checks
                    passed, line = False, f"{'':>11} {'':>10}  FAIL ({type(exc).__name__}: {exc})"
                all_passed &= passed
                log(f"{check.name:<28} {device.type:<7} {str(dtype).replace('torch.', ''):<9} {line}")
    return all_passed
