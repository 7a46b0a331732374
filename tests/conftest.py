"""Shared test fixtures: the devices to run on, the GPU target, and output poisoning for every test.

The GPU target of a session (``GPU_TARGET``):

* ``"cuda"``: a real GPU and a CUDA build of fastloss. GPU tensors are CUDA tensors.
* ``"sim"``: a ``FASTLOSS_CUDA=SIMULATE`` build (the CUDA kernels compiled as host code against the
  simulated device of ``csrc/sim/``). GPU tensors are CPU tensors, and fastloss ops given CPU tensors
  run their CUDA implementations while ``fastloss.simulated_cuda()`` is on: the same Python CUDA
  branches (workspaces, launch plans, dtype rules, alignment checks, host reads) as on a GPU.
* ``None``: neither; GPU tests are skipped.

Two ways a test runs on the target:

* The ``device`` fixture (``DEVICES``: "cpu" and the target) for tests written once for every device.
  On "sim" the *whole test* runs with the routing on, and the device string is ``SIM_DEVICE`` (a
  ``str`` equal to "cpu", so ``torch.zeros(..., device=device)`` and ``t.to(device)`` work, that
  ``is_gpu(device)`` recognizes). A fastloss call in such a test that computes a CPU *reference* (the
  expected value) must be wrapped in ``with cpu_reference():``, or the simulated kernels would be
  compared with themselves. Pure torch references need nothing: only fastloss ops are routed.
* The ``gpu`` fixture (a ``GpuTarget``) for GPU-only tests: ``gpu.device`` is where to allocate,
  ``gpu(t)`` moves a tensor (always a copy on "sim", as ``t.cuda()`` is from the CPU), and
  ``with gpu.kernels():`` runs the fastloss calls of the block on the GPU (routing on for "sim", no-op
  on a real GPU); everything outside the block is plain CPU.

On "sim" a GPU test (either kind) fails if it launched no simulated kernel at all (its GPU calls never
reached the simulator: a routing mistake), unless it is marked ``sim_no_launch``.

Both kinds are marked ``gpu`` (``pytest -m gpu`` runs exactly the tests that run CUDA kernels, e.g. in
the simulated CI job). Tests about a real GPU itself (CUDA graphs, streams, the caching allocator's
memory statistics and alignment) are marked ``real_gpu``: also ``gpu``, skipped unless the target is
"cuda".

Scheduling (sim only): the simulator runs a block's threads as fibers that switch only at barriers
and warp collectives, in an order chosen by its schedule ("forward", "reverse", "warp-major", or
"random" with a seed), and runs the blocks of a grid in that order too. A race (a missing
__syncthreads, a read of shared memory another warp has not written yet, an order-dependent
reduction) shows up only under some orders, so every GPU test runs under one schedule chosen from
its test id: random half of the time (its seed the crc32 of the id), else warp-major, reverse or
forward. The choice is deterministic (a failure reproduces with the same command), different tests
cover different orders, and the whole suite covers all of them. ``FASTLOSS_SIM_SCHEDULE=<name>``
(and ``FASTLOSS_SIM_SEED=<n>`` for "random") forces one for every test; the schedule of a failing
test is printed in its captured output. The previous schedule is restored after each test.
"""

from __future__ import annotations

import contextlib
import os
import zlib

import pytest
import torch

import fastloss
from fastloss import _C

SIMULATED = bool(getattr(fastloss, "SIMULATED_CUDA", False))
CUDA_READY = torch.cuda.is_available() and fastloss.HAS_CUDA_KERNELS
GPU_TARGET = "cuda" if CUDA_READY else "sim" if SIMULATED else None


class SimDevice(str):
    """The device string of the simulated GPU: "cpu" for torch (the tensors' home), recognized by is_gpu()."""

    def __repr__(self) -> str:
        return "SIM_DEVICE"


SIM_DEVICE = SimDevice("cpu")
GPU_DEVICE = "cuda" if GPU_TARGET == "cuda" else SIM_DEVICE if GPU_TARGET == "sim" else None
DEVICES = ["cpu"] + ([GPU_DEVICE] if GPU_TARGET else [])
DEVICE_IDS = ["cpu"] + ([GPU_TARGET] if GPU_TARGET else [])

requires_gpu = pytest.mark.skipif(GPU_TARGET is None, reason="needs a GPU target: a CUDA GPU with a CUDA build of "
                                  "fastloss, or a FASTLOSS_CUDA=SIMULATE build")  # fmt: skip
requires_cuda = requires_gpu  # (the former name)


def is_gpu(device) -> bool:
    """Whether a ``device`` fixture value is the GPU target (so the CUDA rules apply: dtypes, head dims)."""
    return isinstance(device, SimDevice) or str(device).startswith("cuda")


def is_sim(where) -> bool:
    """Whether a ``device`` value or a ``GpuTarget`` is the simulated GPU."""
    return isinstance(where, SimDevice) or bool(getattr(where, "simulated", False))


def sized(where, real, sim):
    """``sim`` on the simulated GPU, ``real`` elsewhere: the simulator runs every GPU thread as a fiber on
    one CPU core, orders of magnitude slower per element than a GPU, so a GPU test there uses shapes that
    still cross every tile, chunk and split boundary of the kernel but are not GPU-sized."""
    return sim if is_sim(where) else real


def gpu_sized(real, sim):
    """``sized`` for parametrizations of GPU-only tests (chosen at collection, from GPU_TARGET)."""
    return sim if GPU_TARGET == "sim" else real


def cpu_reference() -> contextlib.AbstractContextManager:
    """Within the block fastloss runs its CPU kernels, also inside a simulated-GPU test: for fastloss
    results used as the expected value. A no-op outside the simulator."""
    return fastloss.simulated_cuda(False) if SIMULATED else contextlib.nullcontext()


def routed() -> contextlib.AbstractContextManager:
    """fastloss ops on CPU tensors run on the simulated GPU within the block (a no-op unless "sim")."""
    return fastloss.simulated_cuda(True) if GPU_TARGET == "sim" else contextlib.nullcontext()


class GpuTarget:
    """What a GPU test needs: ``name`` ("cuda" or "sim"), ``device`` (where to allocate GPU tensors),
    ``gpu(t)`` / ``gpu.to(t)`` (a tensor, module or QuantizedWeight on the GPU; None passes through) and
    ``gpu.kernels()`` (run the block's fastloss calls on the GPU)."""

    def __init__(self, name: str):
        self.name = name
        self.simulated = name == "sim"
        self.device = torch.device("cuda" if name == "cuda" else "cpu")

    def __call__(self, obj):
        if obj is None:
            return None
        if self.simulated and isinstance(obj, torch.Tensor):
            return obj.to(self.device, copy=True)  # a separate copy, as a CPU -> GPU copy is
        return obj.to(self.device)

    to = __call__

    def kernels(self) -> contextlib.AbstractContextManager:
        return routed()

    def __repr__(self) -> str:
        return f"GpuTarget({self.name!r})"


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: runs fastloss CUDA kernels (on a real GPU or the simulated device)")
    config.addinivalue_line("markers", "real_gpu(reason): about a real GPU itself (CUDA graphs, streams, allocator); "
                            "skipped on the simulated device")  # fmt: skip
    config.addinivalue_line("markers", "sim_no_launch: a gpu test that may legitimately launch no kernel")


def pytest_collection_modifyitems(config, items):
    for item in items:
        params = getattr(item, "callspec", None)
        on_gpu_device = params is not None and "device" in params.params and is_gpu(params.params["device"])
        real = item.get_closest_marker("real_gpu")
        if on_gpu_device or "gpu" in item.fixturenames or real is not None:
            item.add_marker(pytest.mark.gpu)
        if real is not None and GPU_TARGET != "cuda":
            why = real.kwargs.get("reason") or (real.args[0] if real.args else "a real GPU")
            item.add_marker(pytest.mark.skip(reason=f"needs a real CUDA GPU: {why}"))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.when == "call":
        item._call_report = report  # (read by the launch check of _on_simulated_gpu)
    return report


# ---------------------------------------------------------------------------- scheduling (sim)
SIM_SCHEDULES = ("random", "warp-major", "random", "reverse", "random", "forward")


def sim_schedule_for(test_id: str) -> tuple[str, int]:
    """The (schedule, seed) a test runs under on the simulated device (see the module docstring)."""
    digest = zlib.crc32(test_id.encode())
    seed = int(os.environ.get("FASTLOSS_SIM_SEED", "0"), 0) or digest
    forced = os.environ.get("FASTLOSS_SIM_SCHEDULE")
    if forced:
        return forced, seed
    return SIM_SCHEDULES[digest % len(SIM_SCHEDULES)], seed


@contextlib.contextmanager
def _on_simulated_gpu(request):
    """The test's schedule, restored after it; and, unless the test is marked ``sim_no_launch``, a check
    that it launched at least one simulated kernel (else its GPU calls never reached the simulator)."""
    name, seed = sim_schedule_for(request.node.nodeid)
    previous = _C.sim_schedule()
    _C.sim_set_schedule(name, seed)
    print(f"simulated device: schedule {name!r}, seed {seed} (FASTLOSS_SIM_SCHEDULE={name} FASTLOSS_SIM_SEED={seed})")
    launches = _C.sim_stats()["launches"]
    try:
        yield
    finally:
        _C.sim_set_schedule(previous, 0)
    call = getattr(request.node, "_call_report", None)
    if request.node.get_closest_marker("sim_no_launch") is None and call is not None and call.passed:
        assert _C.sim_stats()["launches"] > launches, (
            "this GPU test launched no simulated kernel: its fastloss calls did not reach the simulated GPU "
            "(run them inside gpu.kernels(), or mark the test sim_no_launch if it launches nothing on purpose)")


# ---------------------------------------------------------------------------- fixtures
@pytest.fixture(autouse=True)
def _poison_kernel_outputs():
    """Every kernel output starts as NaN, so an element a kernel does not write fails the comparison."""
    with fastloss.poison_outputs(True):
        yield


@pytest.fixture(params=DEVICES, ids=DEVICE_IDS)
def device(request) -> str:
    """"cpu", or the GPU target: "cuda", or SIM_DEVICE with the whole test routed to the simulated GPU."""
    if not isinstance(request.param, SimDevice):
        yield request.param
        return
    with _on_simulated_gpu(request), routed():
        yield request.param


@pytest.fixture
def gpu(request) -> GpuTarget:
    if GPU_TARGET is None:
        pytest.skip("needs a GPU target: a CUDA GPU with a CUDA build of fastloss, or a FASTLOSS_CUDA=SIMULATE build")
    target = GpuTarget(GPU_TARGET)
    with _on_simulated_gpu(request) if target.simulated else contextlib.nullcontext():
        yield target


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
