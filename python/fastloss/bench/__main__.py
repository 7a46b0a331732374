"""python -m fastloss.bench: fastloss against the implementations a user would otherwise pick (POT,
GeomLoss, pytorch-metric-learning, FlexAttention, SDPA, plain PyTorch and torch.compile of it, ...),
timed side by side in one process on one device. Peers that are not installed are left out
(pip install "fastloss[bench]" installs them).

Prints one line per case as it starts and one block per problem as it ends (a legend explains the
columns), writes the JSON (by default ./fastloss-bench-<device>-<date>.json, path printed) and, with
--plot, a PNG of the time ratios against fastloss next to it.

How long: the full run takes several minutes on a GPU and longer on a 2-core CPU (larger sizes,
1 s of samples per contender, torch.compile contenders; --budget changes the 1 s). --quick takes
the smallest sizes, 0.05 s of samples per contender (about 0.5 s each at most, a call interrupted
at 1.5 s), 2.5 s per case, the first case of every family first, and starts no new case after
20 s (the others are listed in the JSON): 28 s on the 2-core CPU at load 2.6, import included
(measured 2026-12-03). --filter TEXT runs only the cases whose name contains TEXT.
"""

from __future__ import annotations

import argparse

import torch

from .runner import default_json_path, run, write_json


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastloss.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--quick", action="store_true",
                        help="smallest sizes, short timing, no torch.compile, no new case after 20 s: "
                             "about 30 s on 2 CPU cores")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu or cuda (default: cuda when a GPU is visible)")
    parser.add_argument("--filter", default="", help="only cases whose name contains this text, e.g. 'ot '")
    parser.add_argument("--json", default=None, metavar="PATH",
                        help="where to write the JSON (default: ./fastloss-bench-<device>-<date>.json)")
    parser.add_argument("--no-json", action="store_true", help="print the table only")
    parser.add_argument("--plot", action="store_true",
                        help="also draw the ratios against fastloss per problem (PNG next to the JSON; needs matplotlib, "
                             "in the bench extra)")  # fmt: skip
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="time the torch.compile contenders (default: yes, except with --quick, where "
                             "compiling takes longer than the rest of the run)")  # fmt: skip
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds of samples per contender (default 1.0, 0.05 with --quick)")
    parser.add_argument("--overhead", action="store_true",
                        help="per-call overhead at tiny sizes against torch's nearest ops (fastloss.bench.overhead)")
    args = parser.parse_args(argv)
    if args.plot and args.no_json:
        parser.error("--plot writes its figure next to the JSON: drop --no-json")
    if args.plot:
        from .plot import MissingMatplotlib, require_matplotlib

        try:
            require_matplotlib()
        except MissingMatplotlib as exc:  # before the run, not after minutes of it
            parser.error(str(exc))
    if args.overhead:
        from . import overhead

        return overhead.main(["--device", args.device, "--filter", args.filter]
                             + (["--json", args.json] if args.json else []))
    report = run(torch.device(args.device), quick=args.quick, name_filter=args.filter, compile_peer=args.compile,
                 budget_s=args.budget)  # fmt: skip
    if not args.no_json:
        path = write_json(report, args.json or default_json_path(report))
        print(f"wrote {path}")
        if args.plot:
            from .plot import plot_ratios

            print(f"wrote {plot_ratios(report, path.with_suffix('.png'))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
