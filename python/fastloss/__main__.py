"""python -m fastloss: build information, a self-check of every op against its float64 reference,
and a short side-by-side benchmark on the available device. Exits non-zero if a self-check fails."""

from __future__ import annotations

import argparse
import sys

import torch

from . import HAS_CUDA_KERNELS, build_info
from .selfcheck import run_self_checks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastloss", description=__doc__)
    parser.add_argument("--no-bench", action="store_true", help="skip the benchmark")
    parser.add_argument("--json", default=None, help="also write the benchmark JSON here")
    args = parser.parse_args(argv)

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

    print("\nself-check against float64 references (outputs poisoned with NaN before each kernel):")
    passed = run_self_checks()
    print("self-check:", "all passed" if passed else "FAILURES above")

    if not args.no_bench:
        from .bench.runner import run, write_json

        device = torch.device("cuda" if torch.cuda.is_available() and HAS_CUDA_KERNELS else "cpu")
        print(f"\nshort benchmark, forward + backward (full run: python -m fastloss.bench):")
        report = run(device, quick=True, budget_s=0.5)
        if args.json:
            print(f"wrote {write_json(report, args.json)}")
    return 0 if passed else 1


if __name__ == "__main__":
    raise SystemExit(main())
