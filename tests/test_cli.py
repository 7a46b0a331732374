"""The first hour: `python -m fastloss` and `python -m fastloss.bench` (help texts, the table, peers'
warnings kept out of the output, time bounds, where the JSON and the plot go)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

import fastloss
from fastloss.bench import BenchCase, Contender, Problem
from fastloss.bench import __main__ as bench_main
from fastloss.bench import runner
from fastloss.bench.timing import time_callable

CPU = torch.device("cpu")
TINY = dataclasses.replace(runner.SELF_CHECK, budget_s=0.01, cap_s=0.2)


def _python(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    package_root = str(Path(fastloss.__file__).resolve().parent.parent)  # the fastloss under test
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH", "")) if p)
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_help_texts_say_what_each_command_does_and_how_long(tmp_path):
    main = _python("-m", "fastloss", "--help", cwd=tmp_path)
    assert main.returncode == 0, main.stderr
    for text in ("self-check", "float64 reference", "--no-bench", "--json", "--plot", "2-core CPU", "s"):
        assert text in main.stdout, text
    bench = _python("-m", "fastloss.bench", "--help", cwd=tmp_path)
    assert bench.returncode == 0, bench.stderr
    for text in ("--quick", "--plot", "--json", "--compile", "./fastloss-bench-", "2-core CPU", "matplotlib"):
        assert text in bench.stdout, text
    assert "a few seconds" not in bench.stdout  # the old, untrue claim


def _warning_case(calls: list[str]) -> BenchCase:
    """A case whose set-up, check, fastloss contender and peer all warn."""

    def make(device, quick, compile_peer):
        warnings.warn("set-up warning from a peer import", DeprecationWarning)

        def ours():
            calls.append("fastloss")
            warnings.warn("fastloss.tiny: something the user should see", UserWarning)

        def peer():
            calls.append("peer")
            warnings.warn("Sinkhorn did not converge (peer)", UserWarning)

        def check():
            warnings.warn("peer warning during the check", FutureWarning)
            return 1e-7

        problem = Problem(label="n=4", dtype=torch.float32, bytes_floor=64, check=check,
                          contenders=[Contender("fastloss", ours), Contender("some peer library", peer)])  # fmt: skip
        return [problem, problem]

    return BenchCase(family="test", name="tiny warning case", make=make)


def test_runner_captures_warnings_and_prints_an_aligned_table(monkeypatch):
    calls: list[str] = []
    monkeypatch.setattr(runner, "CASES", [_warning_case(calls)])
    lines: list[str] = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a warning escaping the runner fails the test
        report = runner.run(CPU, quick=True, settings=TINY, log=lines.append)
    assert "fastloss" in calls and "peer" in calls
    out = "\n".join(lines)
    # The legend explains every column; no unexplained floor column in a quick run.
    assert "x fastloss = the contender's median over fastloss's" in out and "p20-p80" in out
    assert "x floor" not in out
    header = next(line for line in lines if line.strip().startswith("contender"))
    rows = [line for line in lines if line.startswith("    fastloss") or line.startswith("    some peer")]
    assert len(rows) == 2  # problems_per_case=1: one problem, two contenders
    assert all(len(row) == len(header) for row in rows), "\n".join([header, *rows])
    # Columns line up: each row's numbers end where the header's column names end.
    for column in ("ms", "p20-p80", "x fastloss"):
        end = header.index(column) + len(column)
        assert all(row[end - 1] != " " and (end == len(row) or row[end] == " ") for row in rows), column
    assert "[1/1] tiny warning case" in lines
    # fastloss's own warning is shown under its problem, the peers' are counted and kept in the JSON.
    assert "    ! fastloss warned: UserWarning: fastloss.tiny: something the user should see" in lines
    assert "Sinkhorn did not converge" not in out
    assert "3 distinct warnings from peer libraries captured" in lines[-1]
    peer_warnings = report["results"][0]["peer_warnings"]
    assert len(peer_warnings) == 3 and any("Sinkhorn did not converge" in w for w in peer_warnings)
    assert report["results"][1]["time_vs_fastloss"] == pytest.approx(
        report["results"][1]["median_ms"] / report["results"][0]["median_ms"])


def test_no_peer_warning_leaks_from_a_real_peer(capsys):
    """POT warns 'Sinkhorn did not converge' at a fixed iteration count; with warnings as errors a leak would
    fail. (No hard cap here: an interrupted POT call would end before its warning.)"""
    settings = dataclasses.replace(TINY, hard_cap_s=None)
    lines: list[str] = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = runner.run(CPU, quick=True, name_filter="ot sinkhorn cost matrix", settings=settings, log=lines.append)
    captured = capsys.readouterr()
    assert "Warning" not in captured.err + captured.out, captured
    pot_rows = [r for r in report["results"] if r["impl"] == "POT sinkhorn_log"]  # POT is in the test extra
    assert pot_rows and any("did not converge" in w for w in pot_rows[0]["peer_warnings"]), pot_rows
    assert "distinct warnings from peer libraries captured" in lines[-1], lines[-1]


def test_time_cap_bounds_a_slow_contender():
    started = time.perf_counter()
    timing = time_callable(lambda: time.sleep(0.15), CPU, min_samples=10, budget_s=0.05, warmup=3, cap_s=0.3)
    elapsed = time.perf_counter() - started
    assert 1 <= timing.samples <= 2 and elapsed < 0.9, (timing, elapsed)
    assert timing.median_ms >= 150


def test_hard_cap_interrupts_a_call_that_runs_on():
    started = time.perf_counter()
    timing = time_callable(lambda: time.sleep(5), CPU, min_samples=3, budget_s=0.05, warmup=1, hard_cap_s=0.3)
    assert time.perf_counter() - started < 2
    assert timing.lower_bound and timing.samples == 0 and timing.median_ms >= 290
    # An interrupt inside torch.no_grad() (here: before its block could restore the mode) leaves grad mode on.
    def stuck_in_no_grad():
        torch.set_grad_enabled(False)
        time.sleep(5)

    timing = time_callable(stuck_in_no_grad, CPU, min_samples=3, budget_s=0.05, warmup=1, hard_cap_s=0.2)
    assert timing.lower_bound and torch.is_grad_enabled()
    # A completed warm-up call is kept as the sample when the next call is interrupted.
    durations = iter([0.05, 5.0])
    timing = time_callable(lambda: time.sleep(next(durations)), CPU, min_samples=3, budget_s=0.01, warmup=1,
                           hard_cap_s=0.5)  # fmt: skip
    assert not timing.lower_bound and timing.samples == 1 and 40 <= timing.median_ms < 400


def test_a_failing_peer_is_reported_and_the_run_goes_on(monkeypatch):
    def broken():
        raise RuntimeError("peer API changed")

    problem = Problem(label="n=2", dtype=torch.float32, bytes_floor=8,
                      contenders=[Contender("fastloss", lambda: None), Contender("broken peer", broken)])  # fmt: skip
    after: list[str] = []
    monkeypatch.setattr(runner, "CASES", [
        BenchCase(family="a", name="broken case", make=lambda d, q, c: [problem]),
        BenchCase(family="b", name="next case", make=lambda d, q, c: after.append("made") or [])])  # fmt: skip
    lines: list[str] = []
    report = runner.run(CPU, quick=True, settings=TINY, log=lines.append)
    assert "    ! broken peer failed: RuntimeError: peer API changed" in lines and after == ["made"]
    assert [r["impl"] for r in report["results"]] == ["fastloss"]


def test_total_budget_skips_the_remaining_cases(monkeypatch):
    problem = Problem(label="n=1", dtype=torch.float32, bytes_floor=8,
                      contenders=[Contender("fastloss", lambda: time.sleep(0.05))])  # fmt: skip
    slow = BenchCase(family="test", name="slow case", make=lambda d, q, c: [problem])
    never: list[str] = []
    other = BenchCase(family="test", name="never run", make=lambda d, q, c: never.append("made") or [])
    monkeypatch.setattr(runner, "CASES", [slow, other])
    lines: list[str] = []
    report = runner.run(CPU, quick=True, settings=dataclasses.replace(TINY, total_budget_s=0.0), log=lines.append)
    assert not never and report["skipped_cases"] == ["never run"]
    assert any("1 more cases skipped" in line for line in lines)


def test_bench_writes_json_in_the_current_directory_and_the_plot_next_to_it(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert bench_main.main(["--quick", "--device", "cpu", "--filter", "zloss", "--budget", "0.01", "--plot"]) == 0
    out = capsys.readouterr().out
    (json_path,) = tmp_path.glob("fastloss-bench-cpu-*.json")
    png_path = json_path.with_suffix(".png")
    assert f"wrote {json_path}" in out and f"wrote {png_path}" in out
    data = json.loads(json_path.read_text())
    assert {r["impl"] for r in data["results"]} == {"fastloss", "torch eager"}  # --quick: no torch.compile
    assert data["quick"] and data["compile_peer"] is False
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png_path.stat().st_size > 5000
    # --json PATH is honoured, in a directory created for it.
    target = tmp_path / "sub" / "mine.json"
    assert bench_main.main(["--quick", "--device", "cpu", "--filter", "zloss", "--budget", "0.01", "--json",
                            str(target)]) == 0  # fmt: skip
    assert f"wrote {target}" in capsys.readouterr().out and json.loads(target.read_text())["results"]


def test_plot_without_matplotlib_says_how_to_install_it(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    ran: list[bool] = []
    monkeypatch.setattr(bench_main, "run", lambda *a, **k: ran.append(True))
    with pytest.raises(SystemExit) as exc:
        bench_main.main(["--quick", "--plot"])
    assert exc.value.code == 2 and not ran  # refused before any benchmark ran
    assert 'pip install "fastloss[bench]"' in capsys.readouterr().err
