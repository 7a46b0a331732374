"""The benchmark's figure: for every problem, each other contender's median time over fastloss's, as
horizontal bars on a log axis with a line at 1.0 (right of it: fastloss is faster). matplotlib is
optional (the ``bench`` extra); it is drawn with the Agg canvas, so no display is needed."""

from __future__ import annotations

import os
from pathlib import Path


class MissingMatplotlib(RuntimeError):
    """--plot was asked for and matplotlib is not installed."""


def require_matplotlib() -> None:
    """Raises MissingMatplotlib with the install command when matplotlib cannot be imported."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise MissingMatplotlib(
            "fastloss.bench: --plot needs matplotlib, which is not installed: pip install \"fastloss[bench]\" "
            "(or pip install matplotlib)") from exc  # fmt: skip


def plot_ratios(report: dict, path: str | os.PathLike) -> Path:
    """Draws the report's ratios against fastloss (``time_vs_fastloss`` of every contender but the
    problem's first) into ``path`` (PNG) and returns the path."""
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    problems: dict[tuple[str, str, str], list[dict]] = {}
    for row in report["results"]:
        problems.setdefault((row["case"], row["problem"], row["dtype"]), []).append(row)
    bars = [(key, row) for key, rows in problems.items() for row in rows[1:]]  # rows[0] is fastloss itself
    impls = sorted({row["impl"] for _, row in bars})
    figure = Figure(figsize=(10, 1.5 + 0.22 * max(len(bars), 1) + 0.35 * len(problems)))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    # Each bar is labelled with its contender's name (a legend of 15+ colours would be ambiguous); the
    # colour only groups a contender's bars across problems.
    palette = [f"tab:{c}" for c in ("blue", "orange", "green", "red", "purple", "brown", "pink", "gray", "olive", "cyan")]
    colors = {impl: palette[i % len(palette)] for i, impl in enumerate(impls)}
    y, ticks, labels = 0.0, [], []
    for key, rows in reversed(list(problems.items())):
        peers = rows[1:]
        if not peers:
            continue
        start = y
        for row in reversed(peers):
            ratio = row["time_vs_fastloss"]
            stopped = bool(row.get("lower_bound"))  # interrupted at the time limit: a lower bound, hatched
            axes.barh(y, ratio, height=0.8, color=colors[row["impl"]], hatch="//" if stopped else None)
            axes.text(ratio, y, f" {row['impl']} {'>' if stopped else ''}{_ratio_text(ratio)}", va="center", fontsize=7)
            y += 1
        ticks.append((start + y - 1) / 2)
        labels.append(f"{key[0]}\n{key[1]}, {key[2]}")
        y += 0.8  # a gap between problems
    axes.set_xscale("log")
    if bars:  # room on the right for the labels of the longest bars
        ratios = [row["time_vs_fastloss"] for _, row in bars]
        axes.set_xlim(min(min(ratios), 1.0) / 2, max(max(ratios), 1.0) * 30)
    axes.axvline(1.0, color="black", linewidth=1)
    axes.set_yticks(ticks, labels, fontsize=7)
    axes.set_xlabel("contender time / fastloss time (log scale; above 1: fastloss is faster)")
    axes.set_title(f"fastloss.bench {'--quick ' if report.get('quick') else ''}on {report['device']}, "
                   f"{report['date'][:10]}", fontsize=9)  # fmt: skip
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    return path


def _ratio_text(ratio: float) -> str:
    return f"{ratio:.0f}x" if ratio >= 10 else f"{ratio:.2g}x"
