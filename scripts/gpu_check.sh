#!/usr/bin/env bash
# The GPU check, in one call on a CUDA machine (no package registry needed):
#   scripts/gpu_check.sh OUTDIR
# builds fastloss from source with --no-build-isolation for the visible GPU, runs the whole
# test suite on CUDA, runs compute-sanitizer memcheck on the CUDA tests, runs both benchmarks,
# and writes six files to OUTDIR: build.log, pytest.log, sanitizer.log, bench_python.json,
# bench_cpp.json and summary.txt (the last lines of each step and its exit code).
# GPU_CHECK_STAGES (default "build,test,sanitizer,bench") runs a subset, so that the check can be
# split over two calls of a time-limited GPU machine (the build persists while the machine is warm).
# GPU_CHECK_FAMILY (e.g. "quant") limits the tests, the sanitizer run and both benchmarks to one
# family's files and cases, for the check of an issue that touches only that family.
set -uo pipefail
STAGES=",${GPU_CHECK_STAGES:-build,test,sanitizer,bench},"
want() { [[ "$STAGES" == *",$1,"* ]]; }
FAMILY=${GPU_CHECK_FAMILY:-}
OUT=${1:?usage: scripts/gpu_check.sh OUTDIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
SUMMARY="$OUT/summary.txt"
touch "$SUMMARY"
export PYTHONUNBUFFERED=1
record() { echo "$1: exit $2" | tee -a "$SUMMARY"; }

{
  date -u +"date: %Y-%m-%dT%H:%M:%SZ"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | sed 's/^/gpu: /'
  "$PY" -c "import torch, sys; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'python', sys.version.split()[0])"
  nvcc --version | tail -n 1
} | tee -a "$SUMMARY"

if want build; then
  # The module for the visible GPU (FASTLOSS_CUDA_ARCHS empty -> native) and the C++ benchmark.
  FASTLOSS_CUDA=ON "$PY" -m pip install --no-build-isolation --no-deps -v . >"$OUT/build.log" 2>&1
  record "build (pip install --no-build-isolation)" $?
  {
    cmake -S . -B build/gpu-bench -G Ninja -DFASTLOSS_BUILD_BENCH=ON -DFASTLOSS_BUILD_PYTHON=OFF -DFASTLOSS_CUDA=ON &&
      cmake --build build/gpu-bench
  } >>"$OUT/build.log" 2>&1
  record "build (fastloss_bench)" $?
fi

# Run from outside the source tree so that the installed package is the one imported.
TESTS=$(pwd)/tests
if want test; then
  # One pytest process a test file, so that a crash in one file cannot hide the results of the others.
  : >"$OUT/pytest.log"
  for file in "$TESTS"/test_${FAMILY}*.py; do
    (cd "$OUT" && "$PY" -m pytest -q -p no:cacheprovider "$file" >>"$OUT/pytest.log" 2>&1)
    record "pytest $(basename "$file") (CUDA included)" $?
    tail -n 1 "$OUT/pytest.log" >>"$SUMMARY"
  done
fi

if want sanitizer; then
  (cd "$OUT" && compute-sanitizer --tool memcheck --error-exitcode 1 --print-limit 20 \
    "$PY" -m pytest -q -p no:cacheprovider -x -k "cuda and not compile" "$TESTS"/test_${FAMILY}*.py >"$OUT/sanitizer.log" 2>&1)
  record "compute-sanitizer memcheck (CUDA tests)" $?
  grep -E "ERROR SUMMARY|passed|failed" "$OUT/sanitizer.log" | tail -n 3 >>"$SUMMARY"
fi

if want bench; then
  (cd "$OUT" && "$PY" -m fastloss.bench --filter "$FAMILY" --json "$OUT/bench_python.json" >>"$SUMMARY" 2>&1)
  record "python benchmark" $?
  ./build/gpu-bench/fastloss_bench --filter "$FAMILY" --json "$OUT/bench_cpp.json" >>"$SUMMARY" 2>&1
  record "C++ benchmark" $?
fi
cat "$SUMMARY"
