#!/usr/bin/env python3
"""Shows that the simulated CUDA tests can fail: plants one bug at a time in a CUDA kernel (a dropped
__syncthreads, a short or missing cp.async wait, an off-by-one tile bound), rebuilds the simulated
module, runs that family's GPU tests against it, and records whether they caught the bug. Every
planted bug must be caught; the source is restored after each one, whatever happens.

    python scripts/sim_planted_bugs.py --build-dir /tmp/fl-sim [--only quant] [--out FILE]

The build folder is configured here (FASTLOSS_CUDA=SIMULATE) on the first run and rebuilt
incrementally after each edit, so one bug costs one translation unit's compile and the family's
tests (with -x: the first failure ends the run). It takes 10-20 minutes for the whole list on two
cores: it is a check to run after changing the simulator or the tests, not a CI step.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class PlantedBug:
    family: str
    file: str
    what: str
    old: str
    new: str


FAMILY_TESTS = {
    "spherical": ["tests/test_spherical.py", "tests/test_spherical_output.py"],
    "quant": ["tests/test_quant.py"],
    "ot": ["tests/test_ot.py", "tests/test_ot_nonfinite.py"],
    "metric": ["tests/test_metric.py"],
    "attention": ["tests/test_attention.py"],
}

BUGS = [
    PlantedBug("spherical", "csrc/spherical/dense_loss_cuda.cu", "off-by-one: a row chunk stops one column short",
               "const int64_t end = p.cols < begin + chunk_len ? p.cols : begin + chunk_len;",
               "const int64_t end = p.cols < begin + chunk_len ? p.cols - 1 : begin + chunk_len;"),
    PlantedBug("spherical", "csrc/spherical/factored_layer_cuda.cu", "off-by-one: the m x m Gram tile skips the last sample",
               "if (i >= m || j >= m) return;", "if (i >= m - 1 || j >= m) return;"),
    PlantedBug("quant", "csrc/quant/matmul_cuda.cu", "short cp.async wait: one more group left in flight",
               "cp_async_wait<kStages - 2>();", "cp_async_wait<kStages - 1>();"),
    PlantedBug("quant", "csrc/quant/pack_cuda.cu", "dropped __syncthreads between the dequantized tile and its store",
               "  }\n  __syncthreads();\n  const int64_t col0", "  }\n  const int64_t col0"),
    PlantedBug("ot", "csrc/ot/cuda_kernels.cuh", "dropped __syncthreads before merging the column groups",
               "  shared_sum[ty][tx] = acc.sum;\n  __syncthreads();", "  shared_sum[ty][tx] = acc.sum;"),
    PlantedBug("ot", "csrc/ot/cuda_kernels.cuh", "off-by-one: a points tile drops its last source",
               "hb[threadIdx.x] = j < p.len_src ?", "hb[threadIdx.x] = j < p.len_src - 1 ?"),
    PlantedBug("metric", "csrc/common/cuda_gemm.cuh", "dropped __syncthreads in the GEMM main loop (stage reuse)",
               "      if (step + 1 < steps) put(stage ^ 1);  // that stage's last readers finished before the barrier below\n      __syncthreads();",
               "      if (step + 1 < steps) put(stage ^ 1);  // that stage's last readers finished before the barrier below"),
    PlantedBug("metric", "csrc/metric/info_nce_cuda.cu", "dropped __syncthreads before the next tile reuses shared memory",
               "    __syncthreads();  // the next tile_product reuses the shared memory", "    // (planted: barrier dropped)"),
    PlantedBug("attention", "csrc/attention/attention_cuda.cu", "missing cp.async wait for the key tile",
               "cp_async_wait<1>();  // q and k are in; v may still be on its way", "cp_async_wait<2>();"),
    PlantedBug("attention", "csrc/attention/decode_cuda.cu", "dropped __syncthreads after staging q in shared memory",
               "  for (int c = threadIdx.x; c < D; c += kDecodeThreads) q_s[c] = to_acc(q[c]);\n  __syncthreads();",
               "  for (int c = threadIdx.x; c < D; c += kDecodeThreads) q_s[c] = to_acc(q[c]);"),
]


def run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, text=True, capture_output=True, **kwargs)


def configure(build: Path) -> None:
    if (build / "build.ninja").exists():
        return
    import pybind11  # noqa: F401  (the build needs it)

    result = run(["cmake", "-S", str(ROOT), "-B", str(build), "-G", "Ninja", "-DFASTLOSS_CUDA=SIMULATE",
                  f"-DPython_EXECUTABLE={sys.executable}",
                  f"-Dpybind11_DIR={run([sys.executable, '-m', 'pybind11', '--cmakedir']).stdout.strip()}"])
    if result.returncode:
        sys.exit(f"configure failed:\n{result.stdout}\n{result.stderr}")


def build_module(build: Path, stage: Path) -> None:
    result = run(["cmake", "--build", str(build), "--target", "_C"])
    if result.returncode:
        raise RuntimeError(f"build failed:\n{result.stdout[-3000:]}")
    package = stage / "fastloss"
    if package.exists():
        shutil.rmtree(package)
    shutil.copytree(ROOT / "python" / "fastloss", package)
    for so in glob.glob(str(build / "_C*.so")):
        shutil.copy(so, package)


def family_tests(family: str, stage: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(stage))
    tests = [t for t in FAMILY_TESTS[family] if (ROOT / t).exists()]
    return run([sys.executable, "-m", "pytest", "-q", "-x", "-m", "gpu", "-p", "no:cacheprovider", *tests],
               cwd=ROOT, env=env)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--build-dir", type=Path, required=True)
    parser.add_argument("--only", choices=sorted(FAMILY_TESTS), action="append")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args()
    build = args.build_dir.resolve()
    stage = build / "planted-stage"
    configure(build)
    results = []
    for bug in BUGS:
        if args.only and bug.family not in args.only:
            continue
        path = ROOT / bug.file
        original = path.read_text()
        if original.count(bug.old) != 1:
            results.append({**bug.__dict__, "caught": None, "detail": "the text to mutate is not found exactly once"})
            print(f"[{bug.family}] {bug.what}: SKIPPED (source changed; update the mutation)", flush=True)
            continue
        start = time.time()
        try:
            path.write_text(original.replace(bug.old, bug.new))
            build_module(build, stage)
            outcome = family_tests(bug.family, stage)
        finally:
            path.write_text(original)
        lines = [l for l in outcome.stdout.splitlines() if l.startswith(("FAILED", "ERROR")) or "passed" in l or "failed" in l]
        caught = outcome.returncode not in (0, 5)
        results.append({"family": bug.family, "file": bug.file, "what": bug.what, "caught": caught,
                        "seconds": round(time.time() - start, 1), "detail": lines[:3]})
        print(f"[{bug.family}] {bug.what}: {'CAUGHT' if caught else 'NOT CAUGHT'} in {time.time() - start:.0f}s "
              f"{lines[:1]}", flush=True)
    build_module(build, stage)  # leave the clean module behind
    if args.out:
        args.out.write_text(json.dumps(results, indent=1) + "\n")
    missed = [r for r in results if not r["caught"]]
    print(f"{len(results) - len(missed)} of {len(results)} planted bugs caught")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
