"""The CUDA-core GEMV of the 2-bit weight family (csrc/quant/gemv_cuda.cu): 1 to 8 rows of x,
checked against float64 references on shapes that are multiples of no tile, with 2-bit and 4-bit
K-blocks mixed, split-K on and off, against the tensor-core kernel's plan for M = 9."""

from __future__ import annotations

import pytest
import torch

import fastloss.quant as Q
from fastloss.reference import quant as R
from test_quant import TOLERANCE, _random_qw

# (N, K, group_size): N not a multiple of 8, 64 or 256 (the CTA's rows); K not a multiple of 8,
# 64 or the group; several groups per 64-column K-word pair, and a group longer than one chunk.
SHAPES = [(75, 333, 64), (300, 1000, 128), (9, 130, 128), (520, 2200, 512)]


def _check(qw, original, m, dtype, seed, with_bias=True, x=None):
    generator = torch.Generator().manual_seed(seed)
    if x is None:
        x = torch.randn(m, qw.in_features, generator=generator).to(dtype)
    bias = torch.randn(qw.out_features, generator=generator).to(dtype) if with_bias else None
    actual = Q.matmul(x, qw, bias)
    codes, scales, zeros = original
    exact = R.matmul(x.cpu(), codes, scales, zeros, qw.group_size, bias.cpu() if with_bias else None)
    assert actual.dtype == dtype and actual.shape == (m, qw.out_features)
    assert not torch.isnan(actual).any(), "an output the kernel did not write (poisoned NaN)"
    error = float((actual.cpu().double() - exact).norm() / exact.norm().clamp_min(1e-30))
    assert error <= TOLERANCE[dtype], f"relative error {error:.2e} against float64 at M={m}"
    return actual


@pytest.mark.parametrize("m", range(1, 10))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gemv_every_batch_size(gpu, monkeypatch, m, dtype):
    """M = 1..8 on the GEMV (forced, and the default plan), M = 9 on the tensor-core kernel."""
    n, k, g = SHAPES[m % 2]
    qw, *original = _random_qw(n, k, g, "mixed", "cpu", dtype, seed=m)
    assert 0 < int((qw.side_index >= 0).sum()) < qw.side_index.numel(), "want 2-bit and 4-bit K-blocks"
    on_gpu = gpu(qw)
    monkeypatch.setenv("FASTLOSS_QUANT_KERNEL", "gemv")
    with gpu.kernels():
        _check(on_gpu, original, m, dtype, seed=m, with_bias=m % 2 == 0)


@pytest.mark.parametrize("splits", ["1", "3", None])
@pytest.mark.parametrize("n,k,g", SHAPES)
@pytest.mark.parametrize("mode", ["2bit", "4bit", "mixed"])
def test_gemv_awkward_shapes_and_splits(gpu, monkeypatch, splits, n, k, g, mode):
    """Split-K on and off (FASTLOSS_QUANT_SPLITS) gives the same float64-checked result; 3 splits
    cut groups where the chunk is shorter than a group."""
    qw, *original = _random_qw(n, k, g, mode, "cpu", torch.float16, seed=n + k)
    on_gpu = gpu(qw)
    if splits is not None:
        monkeypatch.setenv("FASTLOSS_QUANT_SPLITS", splits)
    with gpu.kernels():
        for m in (1, 3):
            _check(on_gpu, original, m, torch.float16, seed=m + n)


def test_gemv_split_k_is_deterministic(gpu, monkeypatch):
    qw, *original = _random_qw(300, 2200, 64, "mixed", "cpu", torch.bfloat16, seed=5)
    on_gpu = gpu(qw)
    monkeypatch.setenv("FASTLOSS_QUANT_SPLITS", "4")
    with gpu.kernels():
        first = _check(on_gpu, original, 2, torch.bfloat16, seed=1)
        again = _check(on_gpu, original, 2, torch.bfloat16, seed=1)
    assert torch.equal(first, again)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gemv_large_and_tiny_x_stay_accurate(gpu, dtype):
    """x is staged in fp16 scaled by a power of two per row: rows of very different magnitudes
    (beyond fp16's range for bf16) keep their accuracy, and a zero row gives the bias."""
    qw, *original = _random_qw(75, 333, 64, "mixed", "cpu", dtype, seed=3)
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(4, 333, generator=generator)
    x[0] *= 2e3 if dtype == torch.float16 else 1e30
    x[1] *= 1e-3
    x[2] = 0
    on_gpu = gpu(qw)
    with gpu.kernels():
        y = _check(on_gpu, original, 4, dtype, seed=0, with_bias=False, x=x.to(dtype))
    assert torch.equal(y[2].cpu(), torch.zeros_like(y[2].cpu()))
    for row in (0, 1):
        exact = R.matmul(x[row : row + 1].to(dtype), *original, 64, None)
        error = float((y[row].cpu().double() - exact[0]).norm() / exact.norm())
        assert error <= TOLERANCE[dtype], f"row {row}: relative error {error:.2e}"


def test_gemv_plan_matches_the_tensor_core_kernel(gpu, monkeypatch):
    """The same product from both kernels (the tensor-core one forced with FASTLOSS_QUANT_KERNEL=mma)."""
    qw, *original = _random_qw(200, 512, 128, "mixed", "cpu", torch.float16, seed=7)
    on_gpu = gpu(qw)
    x = torch.randn(5, 512, generator=torch.Generator().manual_seed(4)).to(torch.float16)
    with gpu.kernels():
        gemv = _check(on_gpu, original, 5, torch.float16, seed=0, x=x)
        monkeypatch.setenv("FASTLOSS_QUANT_KERNEL", "mma")
        mma = _check(on_gpu, original, 5, torch.float16, seed=0, x=x)
    assert float((gemv.double() - mma.double()).norm() / mma.double().norm()) <= 2e-3
