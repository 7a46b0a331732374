"""Benchmarks of the 2-bit weight family: y = x W^T with W quantized, against the dense GEMM.

Contenders (all on the same x; CUDA timings replay a CUDA graph of one call, and the runner
flushes L2 before every sample, so the weights stream from HBM every time):
  fastloss 2-bit       fastloss.quant.matmul, pure 2-bit g128 (2.19 bits/weight); on CUDA up to 8
                       rows of x run the CUDA-core GEMV (csrc/quant/gemv_cuda.cu).
  fastloss 2-bit mma   the same on the tensor-core kernel (FASTLOSS_QUANT_KERNEL=mma), for those
                       batches: where the two cross is a GPU measurement.
  fastloss mixed25     the same with 25% of the K-blocks in 4 bits (2.69 bits/weight).
  dequant+GEMM         fastloss.quant.dequantize, then the dense GEMM: what a user without a
                       fused kernel does (on CPU, the issue's baseline).
  cuBLAS fp16 / torch dense    torch.nn.functional.linear on the dense weight.
  tinygemm int4        torch's _weight_int4pack_mm (torchao's int4 weight-only kernel), bf16,
                       where this torch can pack for it.
gemlite and torchao are not installed on the offline GPU machine (no network); torch's own
tinygemm kernel is torchao's int4 weight-only path.
bytes_floor is the fastloss 2-bit contender's bytes (packed weight, x, y), so 1 / x_floor is its
achieved fraction of the measured copy bandwidth (copy_bandwidth_gbps in the JSON).
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

import torch
import torch.nn.functional as F

from .. import quant as Q
from . import BenchCase, Contender, Problem, register

CUDA_SHAPES = [(28672, 8192), (8192, 8192), (4096, 4096)]  # (N, K): Llama-2-70B MLP up-projection first
CUDA_ROWS = (1, 4, 16, 64)
CPU_SHAPES = [(4096, 4096)]
CPU_ROWS = (1, 4)
QUICK_SHAPES = [(256, 512)]


def _graphed(fn):
    """One call captured in a CUDA graph; the contender replays it (no launch or Python overhead)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


@contextlib.contextmanager
def _kernel(name: str):
    """FASTLOSS_QUANT_KERNEL=name for the block (read by the C++ plan at each call, so also at capture)."""
    previous = os.environ.get("FASTLOSS_QUANT_KERNEL")
    os.environ["FASTLOSS_QUANT_KERNEL"] = name
    try:
        yield
    finally:
        if previous is None:
            del os.environ["FASTLOSS_QUANT_KERNEL"]
        else:
            os.environ["FASTLOSS_QUANT_KERNEL"] = previous


def _on_mma(fn):
    def call():
        with _kernel("mma"):
            return fn()

    return call


def _tinygemm(weight: torch.Tensor, x: torch.Tensor):
    """torch's int4 weight-only kernel (tinygemm, torchao's int4wo path), g128, or None."""
    if x.device.type != "cuda" or not hasattr(torch, "_weight_int4pack_mm"):
        return None
    try:
        n, k = weight.shape
        group = 128
        w = weight.float().reshape(n, k // group, group)
        lo, hi = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
        scale = ((hi - lo) / 15).clamp_min(1e-6)
        q = ((w - lo) / scale).round().clamp(0, 15).to(torch.int32).reshape(n, k)
        zero = lo + 8 * scale  # tinygemm: w = (q - 8) * scale + zero
        packed = torch._convert_weight_to_int4pack((q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8), 8)
        scales_zeros = torch.stack([scale.reshape(n, -1), zero.reshape(n, -1)], -1).transpose(0, 1).contiguous()
        xb = x.to(torch.bfloat16)
        scales_zeros = scales_zeros.to(torch.bfloat16)
        torch._weight_int4pack_mm(xb, packed, group, scales_zeros)
        return lambda: torch._weight_int4pack_mm(xb, packed, group, scales_zeros)
    except Exception:  # noqa: BLE001 - the packing API differs across torch versions
        return None


def _problems(device: torch.device, quick: bool, compile_peer: bool = True) -> Iterator[Problem]:
    cuda = device.type == "cuda"
    shapes = QUICK_SHAPES if quick else (CUDA_SHAPES if cuda else CPU_SHAPES)
    rows_list = (1,) if quick else (CUDA_ROWS if cuda else CPU_ROWS)
    dtype = torch.float16 if cuda else torch.float32
    generator = torch.Generator().manual_seed(0)
    for n, k in shapes:
        weight = (torch.randn(n, k, generator=generator) * 0.02).to(device, torch.float16)
        two = Q.quantize(weight, frac_4bit=0.0)
        mixed = Q.quantize(weight, frac_4bit=0.25)
        dense = two.dequantize(dtype)
        for m in rows_list:
            x = torch.randn(m, k, generator=generator).to(device, dtype)
            calls = {
                "fastloss 2-bit": lambda x=x: Q.matmul(x, two),
                "fastloss mixed25": lambda x=x: Q.matmul(x, mixed),
                "dequant+GEMM": lambda x=x: F.linear(x, two.dequantize(dtype)),
                ("cuBLAS fp16" if cuda else "torch dense"): lambda x=x: F.linear(x, dense),
            }
            if cuda and m <= 8:
                calls["fastloss 2-bit mma"] = _on_mma(lambda x=x: Q.matmul(x, two))
            tiny = _tinygemm(dense, x)
            if tiny is not None:
                calls["tinygemm int4"] = tiny
            contenders = [Contender(name, _graphed(fn) if cuda else fn) for name, fn in calls.items()]

            def check(x=x):
                expected = x.float() @ dense.float().t()
                return float((Q.matmul(x, two).float() - expected).norm() / expected.norm())

            bytes_floor = two.nbytes + x.numel() * x.element_size() + m * n * x.element_size()
            yield Problem(label=f"N={n} K={k} M={m}", dtype=dtype, contenders=contenders, bytes_floor=bytes_floor,
                          check=check)  # fmt: skip


register(BenchCase(family="quant", name="quant matmul", make=_problems))
