"""The instruction budget of the quant GEMV (csrc/quant/gemv_cuda.cu), checked without a GPU.

Compiles the kernel for sm_90a, disassembles it (cuobjdump -sass; the nvidia-cuda-cuobjdump and
nvidia-cuda-nvdisasm wheels provide it when the toolkit has none) and counts the SASS
instructions per weight of its main loop:

- The main loop of a kernel is the loop (a backward branch and the addresses it spans) that holds
  the most HFMA2 instructions. One turn of it is two K-words of the thread's row slots (the loop
  is not unrolled further: `#pragma unroll 1`); its weights are read off the path itself: one
  HFMA2 (or HMUL2) per pair of weights and row of x.
- The loop body branches (2-bit or 4-bit K-word, group start, group end, end of the chunk), so
  the script enumerates every path from the loop head to the backward branch and counts the
  instructions on it (predicated-off instructions count: they are issued). A path's bit widths
  are read from its dequantization masks (0x30003 << p for 2-bit planes, 0xf000f << p for 4-bit
  nibbles; 64 of them per K-word at 2 rows a thread); its group starts from its zero-point
  conversions (one I2F per row slot); a steady-state turn loads the next two K-words (one
  128-bit load per slot and K-word, twice that with 4-bit side words).
- Reported per kernel (dtype, rows of x it is compiled for) and bit width (turns of pure 2-bit or
  pure 4-bit K-words): "mid_group", the dearest turn with no group start (g >=
  256); "g128", the dearest turn with at most one group start (g = 128 starts and ends one group
  a turn); "g64", the dearest turn (g = 64: a group starts and ends at every K-word).

Usage: python scripts/sass_budget.py [--json out.json] [--max 2.0] [--max-g128 2.0]
Exit status 1 when pure 2-bit at one row of x (fp16 or bf16) exceeds --max instructions per
weight mid-group or --max-g128 at g = 128: the issue's budget is 2 per 2-bit weight.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "csrc/quant/gemv_cuda.cu"
LINE = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
TWO_BIT_MASKS = {f"0x{(0x00030003 << p):x}" for p in (0, 2, 4, 6, 8)}
FOUR_BIT_MASKS = {f"0x{(0x000F000F << p):x}" for p in (0, 4)}


def find_tool(name: str) -> str:
    """`name` from PATH, CUDA_HOME, or the nvidia-cuda-* wheels (installed on demand)."""
    found = shutil.which(name)
    if found:
        return found
    for base in filter(None, [os.environ.get("CUDA_HOME"), "/usr/local/cuda"]):
        candidate = Path(base) / "bin" / name
        if candidate.exists():
            return str(candidate)
    target = Path(tempfile.gettempdir()) / f"fastloss-{name}-wheel"
    # The CUDA 13 tools, as nvcc 13 writes the cubin (a newer major may drop sm_90a support one day).
    wheel = {"cuobjdump": "nvidia-cuda-cuobjdump>=13,<14", "nvdisasm": "nvidia-cuda-nvdisasm>=13,<14"}[name]
    hits = list(target.glob(f"**/bin/{name}"))
    if not hits:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--target", str(target), wheel], check=True)
        hits = list(target.glob(f"**/bin/{name}"))
    if not hits:
        raise SystemExit(f"sass_budget: no {name} (install the {wheel} wheel or the CUDA toolkit)")
    os.chmod(hits[0], 0o755)
    return str(hits[0])


def disassemble(nvcc: str, workdir: Path) -> str:
    cubin = workdir / "gemv.cubin"
    subprocess.run([nvcc, "-std=c++17", "-O3", "--expt-relaxed-constexpr", "-arch=sm_90a", "-cubin",
                    f"-I{ROOT / 'csrc'}", "-o", str(cubin), str(SOURCE)], check=True)  # fmt: skip
    cuobjdump, nvdisasm = find_tool("cuobjdump"), find_tool("nvdisasm")
    env = dict(os.environ, PATH=str(Path(nvdisasm).parent) + os.pathsep + os.environ.get("PATH", ""))
    return subprocess.run([cuobjdump, "-sass", str(cubin)], check=True, capture_output=True, text=True, env=env).stdout


def kernels(sass: str) -> dict[str, list[tuple[int, str]]]:
    """Mangled name -> [(address, instruction)]."""
    out: dict[str, list[tuple[int, str]]] = {}
    current = None
    for line in sass.splitlines():
        if "Function :" in line:
            current = line.split("Function :")[1].strip()
            out[current] = []
        elif current is not None:
            match = LINE.match(line)
            if match:
                out[current].append((int(match.group(1), 16), match.group(2)))
    return out


def branch_target(text: str) -> int | None:
    match = re.search(r"\bBRA\b(?:\.\w+)*\s+(?:!?U?P\d,\s*)?(0x[0-9a-f]+)", text)
    return int(match.group(1), 16) if match else None


def is_conditional(text: str) -> bool:
    return text.startswith("@") or bool(re.search(r"\bBRA\b\s+!?U?P\d,", text))


def main_loop(code: list[tuple[int, str]]) -> tuple[int, int]:
    """(head index, backward-branch index) of the loop holding the most HFMA2s."""
    index = {address: i for i, (address, _) in enumerate(code)}
    best = None
    for i, (address, text) in enumerate(code):
        target = branch_target(text)
        if target is not None and target <= address and target in index:
            head = index[target]
            count = sum("HFMA2" in t or "HMUL2" in t for _, t in code[head : i + 1])
            if best is None or count > best[0]:
                best = (count, head, i)
    if best is None:
        raise SystemExit("sass_budget: no loop with HFMA2 found")
    return best[1], best[2]


def paths(code, head: int, back: int):
    """Every path head -> back (the backward branch taken): per path, the instruction count, the
    2-bit and 4-bit dequantization masks, the zero-point conversions (group starts), the HFMA2s
    and the 128-bit loads it holds."""
    index = {address: i for i, (address, _) in enumerate(code)}
    results = []

    def walk(i, count, two, four, scales, fmas, loads, depth):
        while True:
            if depth > 400:
                raise SystemExit("sass_budget: the loop body is not a DAG")
            text = code[i][1]
            count += 1
            two += any(m in text for m in TWO_BIT_MASKS) and "LOP3" in text
            four += any(m in text for m in FOUR_BIT_MASKS) and "LOP3" in text
            scales += text.split()[0].startswith("I2F") or (text.startswith("@") and text.split()[1].startswith("I2F"))
            fmas += ("HFMA2" in text or "HMUL2" in text) and "-RZ, RZ," not in text  # (not a MOV)
            loads += "LDG.E.128" in text
            if i == back:
                results.append((count, two, four, scales, fmas, loads))
                return
            if "EXIT" in text and not text.startswith("@"):
                return
            target = branch_target(text)
            if target is not None:
                t = index.get(target)
                if t is not None and head <= t <= back and t > i:
                    walk(t, count, two, four, scales, fmas, loads, depth + 1)
                if not is_conditional(text):
                    return
            i += 1
            if i > back:
                return

    walk(head, 0, 0, 0, 0, 0, 0, 0)
    return results


def budget(code, rows_of_x: int) -> dict:
    head, back = main_loop(code)
    all_paths = paths(code, head, back)
    report = {"loop_instructions_static": back - head + 1}
    full = max(p[4] for p in all_paths)  # the turns that run both K-words
    slots = full * 2 // rows_of_x // 128  # row slots a thread holds (whole 128-weight row turns:
    weights = slots * 128  # ptxas may emit an fp16 add as an HFMA2)
    for name in ("2bit", "4bit"):
        # a steady-state turn on one bit width: every dequantization mask of the turn is of that
        # width, both K-words run, and the next turn's words are loaded (one 128-bit load per slot
        # and K-word, twice that for 4-bit K-words with their side words)
        chosen = [(c, s // slots) for c, two, four, s, f, loads in all_paths
                  if f == full and (four == 0 if name == "2bit" else two == 0)
                  and loads == (2 if name == "2bit" else 4) * slots]  # fmt: skip
        if not chosen:
            raise SystemExit(f"sass_budget: no {name} path through the main loop")
        # group starts in the turn: one zero-point conversion (I2F) per row slot each
        report[name] = {
            "mid_group": round(max(c for c, starts in chosen if starts == 0) / weights, 3),  # no group start in the turn
            "g128": round(max(c for c, starts in chosen if starts <= 1) / weights, 3),  # one group start a turn
            "g64": round(max(c for c, _ in chosen) / weights, 3),  # a group at every K-word
            "weights_per_turn": weights,
        }
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="write the figures here")
    parser.add_argument("--max", type=float, default=2.0, help="budget for pure 2-bit at one row of x, mid-group")
    parser.add_argument("--max-g128", type=float, default=2.0, help="... at g = 128 (group boundaries included)")
    parser.add_argument("--nvcc", default=shutil.which("nvcc") or "nvcc")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        sass = disassemble(args.nvcc, Path(tmp))
    figures = {}
    for name, code in kernels(sass).items():
        match = re.search(r"quant_gemv_kernelI(6__half|13__nv_bfloat16)Li(\d)E", name)
        if match:
            dtype = "float16" if "half" in match.group(1) else "bfloat16"
            figures[f"{dtype}/M<={match.group(2)}"] = budget(code, int(match.group(2)))
    if not figures:
        raise SystemExit("sass_budget: no quant_gemv_kernel in the disassembly")
    result = {"method": "SASS instructions per weight on the main loop's paths (scripts/sass_budget.py)",
              "budget_2bit_per_weight": {"mid_group": args.max, "g128": args.max_g128},
              "kernels": dict(sorted(figures.items()))}  # fmt: skip
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    over = [k for k, v in figures.items() if k.endswith("M<=1") and
            (v["2bit"]["mid_group"] > args.max or v["2bit"]["g128"] > args.max_g128)]  # fmt: skip
    if over:
        print(f"sass_budget: pure 2-bit at one row of x over the budget ({args.max} mid-group, {args.max_g128} "
              f"at g = 128) in {over}", file=sys.stderr)  # fmt: skip
        return 1
    print("sass_budget: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
