"""python -m fastloss.bench [--quick] [--device cpu|cuda] [--filter TEXT] [--json PATH] [--no-compile] [--overhead]"""

from __future__ import annotations

import argparse

import torch

from .runner import default_json_path, run, write_json


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastloss.bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes, a few seconds")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--filter", default="", help="only cases whose name contains this text")
    parser.add_argument("--json", default=None, help="where to write the JSON (default: bench/results/...)")
    parser.add_argument("--no-json", action="store_true", help="print the table only")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile contenders")
    parser.add_argument("--budget", type=float, default=1.0, help="seconds of samples per contender")
    parser.add_argument("--overhead", action="store_true",
                        help="per-call overhead at tiny sizes against torch's nearest ops (fastloss.bench.overhead)")
    args = parser.parse_args(argv)
    if args.overhead:
        from . import overhead

        return overhead.main(["--device", args.device, "--filter", args.filter]
                             + (["--json", args.json] if args.json else []))
    report = run(torch.device(args.device), quick=args.quick, name_filter=args.filter,
                 compile_peer=not args.no_compile, budget_s=args.budget)
    if not args.no_json:
        path = write_json(report, args.json or default_json_path(report))
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
