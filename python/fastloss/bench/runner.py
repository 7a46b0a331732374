"""Runs the registered benchmark cases side by side and reports them as a table and as JSON."""

from __future__ import annotations

import datetime
import json
import os
import platform
from pathlib import Path

import torch

from .. import _families, build_info
from . import CASES
from .timing import copy_bandwidth_gbps, time_callable


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU ({torch.get_num_threads()} torch threads, {os.cpu_count()} cores)"


def run(device: torch.device, *, quick: bool = False, name_filter: str = "", compile_peer: bool = True,
        budget_s: float = 1.0, log=print) -> dict:
    _families.import_all("bench")
    bandwidth = copy_bandwidth_gbps(device, 64 if quick else 512)
    log(f"device: {device_name(device)}; measured copy bandwidth {bandwidth:.1f} GB/s (read + write)")
    results = []
    for case in CASES:
        if name_filter and name_filter not in case.name:
            continue
        for problem in case.make(device, quick, compile_peer):
            difference = problem.check() if problem.check else None
            floor_ms = problem.floor_ms if problem.floor_ms else problem.bytes_floor / (bandwidth * 1e9) * 1e3
            timings = {c.name: time_callable(c.run, device, budget_s=budget_s) for c in problem.contenders}
            base = timings[problem.contenders[0].name].median_ms
            for contender in problem.contenders:
                timing = timings[contender.name]
                results.append({
                    "family": case.family,
                    "case": case.name,
                    "problem": problem.label,
                    "dtype": str(problem.dtype).replace("torch.", ""),
                    "impl": contender.name,
                    "median_ms": timing.median_ms,
                    "p20_ms": timing.p20_ms,
                    "p80_ms": timing.p80_ms,
                    "samples": timing.samples,
                    "bytes_floor": problem.bytes_floor,
                    "floor_ms": floor_ms,
                    "floor_kind": problem.floor_kind if problem.floor_ms else "bytes",
                    "x_floor": timing.median_ms / floor_ms,
                    "time_vs_fastloss": timing.median_ms / base,
                    "max_rel_grad_difference": difference,
                })
            log(format_rows(results[-len(problem.contenders):], header=len(results) == len(problem.contenders)))
    return {
        "tool": "fastloss.bench",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device_name(device),
        "device_type": device.type,
        "copy_bandwidth_gbps": bandwidth,
        "torch": torch.__version__,
        "fastloss": build_info()["version"],
        "fastloss_build": build_info(),
        "python": platform.python_version(),
        "torch_threads": torch.get_num_threads(),
        # Thread settings change CPU timings a lot (torch's OpenMP spin-waits by default).
        "env": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "FASTLOSS_NUM_THREADS")},
        "quick": quick,
        "results": results,
    }


def format_rows(rows: list[dict], header: bool = False) -> str:
    lines = []
    if header:
        lines.append(f"{'case':<30} {'problem':<18} {'dtype':<9} {'impl':<14} {'median ms':>10} {'p20':>9} {'p80':>9} "
                     f"{'x floor':>8} {'vs fastloss':>11}")
    for r in rows:
        lines.append(f"{r['case']:<30} {r['problem']:<18} {r['dtype']:<9} {r['impl']:<14} {r['median_ms']:>10.3f} "
                     f"{r['p20_ms']:>9.3f} {r['p80_ms']:>9.3f} {r['x_floor']:>8.2f} {r['time_vs_fastloss']:>10.2f}x")
    return "\n".join(lines)


def write_json(report: dict, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    return path


def default_json_path(report: dict) -> Path:
    slug = "".join(ch if ch.isalnum() else "-" for ch in report["device"].split(" (")[0]).strip("-").lower()
    day = report["date"][:10]
    return Path("bench") / "results" / f"python-{report['device_type']}-{slug}-{day}.json"
