"""The benchmark's printed table: a legend, then per problem a title line and one aligned row per
contender. Text columns are cut to a fixed width so the numbers stay aligned whatever the names."""

from __future__ import annotations

IMPL_WIDTH = 24


def legend(show_floor: bool) -> str:
    lines = [
        "columns: ms = median time of one call (forward + backward where the case says fwd+bwd); p20-p80 = the",
        "  middle 60% of the timed calls; x fastloss = the contender's median over fastloss's (2.00x: twice as",
        "  slow as fastloss, 0.50x: twice as fast); n = calls timed. 'agree' = largest relative difference",
        "  between the contenders' results (a sanity check, not an accuracy claim). '>' and 'stopped': the call",
        "  was interrupted at the time limit, so the time is a lower bound.",
    ]
    if show_floor:
        lines.append("  x floor = median over the least time the work could take: its fewest bytes at the measured copy")
        lines.append("  bandwidth, or the compute limit named by floor_kind in the JSON (1.0 is the roofline).")
    return "\n".join(lines)


def header(show_floor: bool) -> str:
    return _row("contender", "ms", "p20-p80", "x fastloss", "x floor" if show_floor else None, "n")


def problem_title(problem: str, dtype: str, agreement: float | None) -> str:
    agree = "" if agreement is None else f", agree {agreement:.0e}"
    return f"  {problem}, {dtype}{agree}"


def contender_row(row: dict, show_floor: bool) -> str:
    if row.get("lower_bound"):  # interrupted at the hard cap: at least this long
        median, spread = ">" + format_ms(row["median_ms"]), "stopped"
    else:
        median, spread = format_ms(row["median_ms"]), f"{format_ms(row['p20_ms'])}-{format_ms(row['p80_ms'])}"
    ratio = format_ratio(row["time_vs_fastloss"])
    if row.get("lower_bound") != row.get("base_lower_bound"):
        ratio = (">" if row.get("lower_bound") else "<") + ratio
    elif row.get("lower_bound"):
        ratio = "?"
    return _row(row["impl"], median, spread, ratio, format_ratio(row["x_floor"]) if show_floor else None,
                str(row["samples"]))  # fmt: skip


def _row(impl: str, median: str, spread: str, ratio: str, floor: str | None, samples: str) -> str:
    line = f"    {fit(impl, IMPL_WIDTH):<{IMPL_WIDTH}} {median:>8} {spread:>17} {ratio:>10}"
    if floor is not None:
        line += f" {floor:>9}"
    return line + f" {samples:>4}"


def fit(text: str, width: int) -> str:
    """text cut to width characters (the last one a '~' when cut), so columns never shift."""
    return text if len(text) <= width else text[: width - 1] + "~"


def format_ms(ms: float) -> str:
    """Three significant digits, no exponent: 0.0123, 1.23, 12.3, 1234."""
    if ms >= 100:
        return f"{ms:.0f}"
    if ms >= 10:
        return f"{ms:.1f}"
    if ms >= 1:
        return f"{ms:.2f}"
    if ms >= 0.1:
        return f"{ms:.3f}"
    return f"{ms:.4f}"


def format_ratio(ratio: float) -> str:
    if ratio >= 100:
        return f"{ratio:.0f}x"
    if ratio >= 10:
        return f"{ratio:.1f}x"
    return f"{ratio:.2f}x"
