"""python -m fastloss: the one-minute self-check of an installed fastloss.

1. Build information (version, CUDA kernels or not, compiler, threads, GPU).
2. Every op against its float64 reference, on every available device and dtype, with the outputs
   poisoned with NaN first (a kernel that skips an element shows up): one line per check.
3. A short benchmark: the smallest problem of each benchmark case, fastloss next to the peers that
   are installed, no torch.compile; a table with a legend of its columns. Peers' warnings are
   captured (counted, kept in the JSON), not printed.

Exits 1 if a self-check fails, else 0. Measured on the 2-core CPU machine (2026-12-03): 28-35 s at
load 2.6-3 (import 2 s, self-check 7 s, benchmark 18-24 s), 17 s pinned to one core (taskset -c 0:
one torch thread), 47-53 s under load 6 from other processes.
The benchmark stays bounded on a busy machine: it starts no new case after 20 s and interrupts a
call after 1.5 s (shown as '>' and 'stopped'). --no-bench stops after the self-check (10-20 s).
The full benchmark is python -m fastloss.bench (minutes; --quick about 25 s).
"""

from __future__ import annotations

import argparse
import sys

import torch

from . import HAS_CUDA_KERNELS, build_info
from .selfcheck import run_self_checks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastloss", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--no-bench", action="store_true", help="stop after the self-check")
    parser.add_argument("--filter", default="", help="benchmark only the cases whose name contains this text")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the benchmark's JSON here")
    parser.add_argument("--plot", action="store_true",
                        help="also draw the benchmark's ratios against fastloss (PNG next to the JSON, by default "
                             "./fastloss-bench-<device>-<date>.json; needs matplotlib)")  # fmt: skip
    args = parser.parse_args(argv)
    if args.plot:
        from .bench.plot import MissingMatplotlib, require_matplotlib

        try:
            require_matplotlib()
        except MissingMatplotlib as exc:
            parser.error(str(exc))

    print_build_info()
    print("\nself-check against float64 references (outputs poisoned with NaN before each kernel):")
    passed = run_self_checks()
    print("self-check:", "all passed" if passed else "FAILURES above")

    if not args.no_bench:
        from .bench.runner import SELF_CHECK, default_json_path, run, write_json

        device = torch.device("cuda" if torch.cuda.is_available() and HAS_CUDA_KERNELS else "cpu")
        print("\nshort benchmark: the smallest problem of each case (the full run: python -m fastloss.bench)")
        report = run(device, quick=True, name_filter=args.filter, settings=SELF_CHECK)
        if args.json or args.plot:
            path = write_json(report, args.json or default_json_path(report))
            print(f"wrote {path}")
            if args.plot:
                from .bench.plot import plot_ratios

                print(f"wrote {plot_ratios(report, path.with_suffix('.png'))}")
    return 0 if passed else 1


def print_build_info() -> None:
    info = build_info()
    print(f"fastloss {info['version']}  torch {torch.__version__}  python {sys.version.split()[0]}")
    if info.get("cuda_simulated"):
        cuda_state = "CUDA kernels on a simulated device (FASTLOSS_CUDA=SIMULATE; fastloss.simulated_cuda())"
    elif info["cuda"]:
        cuda_state = (
            f"CUDA kernels for {info['cuda_archs']} (runtime {info['cuda_runtime_version']}, "
            f"driver {info['cuda_driver_version'] or 'not found'})"
        )
    else:
        cuda_state = "no CUDA kernels (CPU-only build)"
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU visible"
    print(f"build: {cuda_state}; {info['compiler']}; {info['cpu_threads']} CPU threads; {gpu}")


if __name__ == "__main__":
    raise SystemExit(main())
