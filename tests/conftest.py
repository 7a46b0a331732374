"""Shared test fixtures: the devices to run on, and output poisoning for every test."""

import pytest
import torch

import fastloss

CUDA_READY = torch.cuda.is_available() and fastloss.HAS_CUDA_KERNELS
DEVICES = ["cpu"] + (["cuda"] if CUDA_READY else [])

requires_cuda = pytest.mark.skipif(not CUDA_READY, reason="needs a CUDA GPU and a fastloss build with CUDA kernels")


@pytest.fixture(autouse=True)
def _poison_kernel_outputs():
    """Every kernel output starts as NaN, so an element a kernel does not write fails the comparison."""
    with fastloss.poison_outputs(True):
        yield


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    return request.param


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float, what: str = "", atol: float = 0.0) -> None:
    """Relative error in the 2-norm, and no NaN where the reference has none. ``atol`` (per element, RMS)
    is only for results that are exactly zero in exact arithmetic but come out of cancelling terms."""
    actual = actual.detach().double().cpu()
    expected = expected.detach().double().cpu()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.equal(torch.isnan(actual), torch.isnan(expected)), f"{what}: NaN pattern differs"
    a, e = torch.nan_to_num(actual), torch.nan_to_num(expected)
    difference = float((a - e).norm())
    allowed = rtol * float(e.norm()) + atol * max(e.numel(), 1) ** 0.5
    error = difference / (float(e.norm()) or 1.0)
    assert difference <= allowed or (difference == 0.0), f"{what}: relative error {error:.3e} > {rtol:.1e} (atol {atol:.0e})"
