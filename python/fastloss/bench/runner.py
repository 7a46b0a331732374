"""Runs the registered benchmark cases side by side and reports them as a table and as JSON.

Peer libraries warn a lot while they are timed (POT's "Sinkhorn did not converge" at a fixed
iteration count, FlexAttention's eager-mode notice, deprecations): those warnings say nothing about
the comparison, so the runner captures every warning raised inside a case. Warnings of fastloss's
own contenders are printed under their problem (they may matter); peers' are counted and kept in
the JSON (``peer_warnings``)."""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import time
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Iterator

import torch

from .. import _families, build_info
from . import CASES, BenchCase, Problem
from . import table
from .timing import OutOfTime, Timing, copy_bandwidth_gbps, interrupt_after, time_callable

_FASTLOSS_DIR = str(Path(__file__).resolve().parent.parent)


@dataclass(frozen=True)
class Settings:
    """How long the runner measures. ``budget_s``: seconds of samples per contender, with at least
    ``min_samples`` after ``warmup`` calls; ``cap_s``: the most seconds one contender may take once it
    has one sample (None: no cap); ``hard_cap_s``: a call still running after that many seconds is
    interrupted (its time is then a lower bound); ``case_budget_s``: once a case has run this long, its remaining
    problems are skipped (None: no limit); ``problems_per_case``: the first problems of each case only;
    ``total_budget_s``: once the run has taken this long, the cases not started are skipped (None: no limit),
    which bounds the run on a slow or busy machine; ``interleave_families``: run the first case of every
    family, then the second, ... (so that a run cut short by ``total_budget_s`` still covers every family)."""

    budget_s: float = 1.0
    min_samples: int = 10
    warmup: int = 3
    cap_s: float | None = None
    hard_cap_s: float | None = None
    case_budget_s: float | None = None
    problems_per_case: int | None = None
    total_budget_s: float | None = None
    interleave_families: bool = False


FULL = Settings()
# --quick: the smallest sizes, 0.05 s of samples and about 0.5 s per contender (a call still running at 1.5 s
# is interrupted), 2.5 s per case, every family's first case first, and no new case after 20 s.
QUICK = Settings(budget_s=0.05, min_samples=3, warmup=1, cap_s=0.5, hard_cap_s=1.5, case_budget_s=2.5,
                 total_budget_s=20.0, interleave_families=True)
# python -m fastloss: the first (smallest) problem of each case, with the quick timing.
SELF_CHECK = replace(QUICK, problems_per_case=1)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU ({torch.get_num_threads()} torch threads, {os.cpu_count()} cores)"


class _Warnings:
    """Captures the warnings of one problem: fastloss's own (shown) and the peers' (counted)."""

    def __init__(self) -> None:
        self.ours: list[str] = []
        self.peers: list[str] = []

    @contextlib.contextmanager
    def capture(self, owner: str | None) -> Iterator[None]:
        """owner: "fastloss" or "peer" for a contender's calls; None (set-up and checks) decides by the file
        that raised the warning."""
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
        for w in caught:
            text = f"{w.category.__name__}: {str(w.message).splitlines()[0][:160]}"
            ours = owner == "fastloss" if owner else str(w.filename).startswith(_FASTLOSS_DIR)
            found = self.ours if ours else self.peers
            if text not in found:
                found.append(text)


def run(device: torch.device, *, quick: bool = False, name_filter: str = "", compile_peer: bool | None = None,
        budget_s: float | None = None, settings: Settings | None = None,
        log: Callable[[str], object] = print) -> dict:
    """Times every registered case whose name contains ``name_filter`` on ``device`` and returns the report
    (the JSON's content). ``quick``: the smallest sizes with ``QUICK`` timing; ``compile_peer``: also time
    the torch.compile contenders (default: not in quick runs, where compiling takes longer than timing);
    ``budget_s`` overrides the settings' seconds of samples per contender."""
    settings = settings or (QUICK if quick else FULL)
    if budget_s is not None:
        settings = replace(settings, budget_s=budget_s)
    if compile_peer is None:
        compile_peer = not quick
    show_floor = not quick  # at the quick sizes a roofline ratio mostly measures call overhead
    _families.import_all("bench")
    started = time.perf_counter()
    bandwidth = copy_bandwidth_gbps(device, 64 if quick else 512)
    log(f"device: {device_name(device)}; measured copy bandwidth {bandwidth:.1f} GB/s (read + write)")
    log(table.legend(show_floor))
    log(table.header(show_floor))
    cases = [case for case in CASES if name_filter in case.name]
    if settings.interleave_families:
        cases = _interleave_families(cases)
    results: list[dict] = []
    skipped: list[str] = []
    peer_warning_count = 0
    for index, case in enumerate(cases, 1):
        if settings.total_budget_s is not None and index > 1 and time.perf_counter() - started > settings.total_budget_s:
            skipped = [c.name for c in cases[index - 1:]]
            log(f"(the run's {settings.total_budget_s:.0f} s budget is spent: {len(skipped)} more cases skipped, listed "
                "in the JSON; python -m fastloss.bench --quick --filter TEXT runs the cases whose name has TEXT)")
            break
        progress = f"[{index}/{len(cases)}] {case.name}"
        for rows, notes in _run_case(case, device, quick, compile_peer, settings, bandwidth,
                                     announce=lambda progress=progress: log(progress)):
            results.extend(rows)
            peer_warning_count += len(rows[0]["peer_warnings"]) if rows else 0
            if rows:
                log(table.problem_title(rows[0]["problem"], rows[0]["dtype"], rows[0]["max_rel_grad_difference"]))
            for row in rows:
                log(table.contender_row(row, show_floor))
            for note in notes:
                log(f"    {note}")
    elapsed = time.perf_counter() - started
    problems = len({(r["case"], r["problem"], r["dtype"]) for r in results})
    log(f"{problems} problems in {elapsed:.0f} s"
        + (f"; {peer_warning_count} distinct warnings from peer libraries captured (in the JSON: peer_warnings)"
           if peer_warning_count else ""))  # fmt: skip
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
        "compile_peer": compile_peer,
        "settings": asdict(settings),
        "elapsed_s": elapsed,
        "skipped_cases": skipped,
        "results": results,
    }


def _interleave_families(cases: list[BenchCase]) -> list[BenchCase]:
    """The first case of every family (in registration order), then every family's second case, ..."""
    by_family: dict[str, list[BenchCase]] = {}
    for case in cases:
        by_family.setdefault(case.family, []).append(case)
    rounds = max((len(group) for group in by_family.values()), default=0)
    return [group[i] for i in range(rounds) for group in by_family.values() if i < len(group)]


def _run_case(case: BenchCase, device: torch.device, quick: bool, compile_peer: bool, settings: Settings,
              bandwidth: float, announce: Callable[[], object]) -> Iterator[tuple[list[dict], list[str]]]:
    """Yields, per problem of the case, its result rows and the notes to print under them. ``announce`` is
    called before the first problem runs (a case with no problem on this device prints nothing)."""
    started = time.perf_counter()
    captured = _Warnings()
    with captured.capture(None):
        problems = iter(case.make(device, quick, compile_peer))
    done = 0
    while True:
        if settings.problems_per_case is not None and done >= settings.problems_per_case:
            break
        if settings.case_budget_s is not None and done and time.perf_counter() - started > settings.case_budget_s:
            yield [], [f"(the case's {settings.case_budget_s:.0f} s budget is spent: its remaining problems are skipped)"]
            break
        with captured.capture(None):
            problem = next(problems, None)
        if problem is None:
            break
        if not done:
            announce()
        failures: list[str] = []
        rows = _run_problem(case, problem, device, settings, bandwidth, captured, failures)
        if not rows:  # no title line will name the problem
            failures = [table.fit(f"{problem.label}: {note}", 104) for note in failures]
        notes = failures + [table.fit(f"! fastloss warned: {text}", 104) for text in captured.ours]
        yield rows, notes
        done += 1
        captured = _Warnings()
    close = getattr(problems, "close", None)
    if close is not None:  # a generator may hold large tensors of the next problem
        close()


def _run_problem(case: BenchCase, problem: Problem, device: torch.device, settings: Settings, bandwidth: float,
                 captured: _Warnings, failures: list[str]) -> list[dict]:
    """Times the problem's contenders; a contender that raises is left out and described in ``failures``."""
    difference = None
    with captured.capture(None):
        try:
            with interrupt_after(settings.hard_cap_s):  # a quick run does not wait for a slow reference
                difference = problem.check() if problem.check else None
        except OutOfTime:
            pass
    floor_ms = problem.floor_ms if problem.floor_ms else problem.bytes_floor / (bandwidth * 1e9) * 1e3
    timings: dict[str, Timing] = {}
    for contender in problem.contenders:
        owner = "fastloss" if contender.name.startswith("fastloss") else "peer"
        try:
            with captured.capture(owner):
                timings[contender.name] = time_callable(
                    contender.run, device, min_samples=settings.min_samples, budget_s=settings.budget_s,
                    warmup=settings.warmup, cap_s=settings.cap_s, hard_cap_s=settings.hard_cap_s)  # fmt: skip
        except Exception as exc:  # noqa: BLE001 - one broken contender (a peer's new version) must not end the run
            failures.append(table.fit(f"! {contender.name} failed: {type(exc).__name__}: {exc}", 104))
            if contender is problem.contenders[0]:
                return []  # no fastloss time to compare with
    base = timings[problem.contenders[0].name].median_ms
    rows = []
    for contender in problem.contenders:
        if contender.name not in timings:
            continue
        timing = timings[contender.name]
        rows.append({
            "family": case.family,
            "case": case.name,
            "problem": problem.label,
            "dtype": str(problem.dtype).replace("torch.", ""),
            "impl": contender.name,
            "median_ms": timing.median_ms,
            "p20_ms": timing.p20_ms,
            "p80_ms": timing.p80_ms,
            "samples": timing.samples,
            # interrupted at the hard cap: median_ms is a lower bound, and so is time_vs_fastloss
            "lower_bound": timing.lower_bound,
            "bytes_floor": problem.bytes_floor,
            "floor_ms": floor_ms,
            "floor_kind": problem.floor_kind if problem.floor_ms else "bytes",
            "x_floor": timing.median_ms / floor_ms,
            "time_vs_fastloss": timing.median_ms / base,
            "base_lower_bound": timings[problem.contenders[0].name].lower_bound,
            "max_rel_grad_difference": difference,
            "peer_warnings": list(captured.peers),
        })
    return rows


def format_rows(rows: list[dict], header: bool = False, show_floor: bool = True) -> str:
    """The table lines of some result rows (grouped by problem), with the column header if asked."""
    lines = [table.header(show_floor)] if header else []
    previous = None
    for row in rows:
        key = (row["case"], row["problem"], row["dtype"])
        if key != previous:
            lines.append(table.problem_title(row["problem"], row["dtype"], row["max_rel_grad_difference"]))
            previous = key
        lines.append(table.contender_row(row, show_floor))
    return "\n".join(lines)


def write_json(report: dict, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    return path


def default_json_path(report: dict) -> Path:
    """./fastloss-bench-<device type>-<device>-<UTC date>T<hhmm>.json in the current directory."""
    slug = "".join(ch if ch.isalnum() else "-" for ch in report["device"].split(" (")[0]).strip("-").lower()
    while "--" in slug:
        slug = slug.replace("--", "-")
    stamp = report["date"][:10] + "T" + report["date"][11:16].replace(":", "")
    return Path.cwd() / f"fastloss-bench-{report['device_type']}-{slug}-{stamp}.json"
