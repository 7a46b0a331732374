"""The op pattern every family follows.

Ops are defined with the low-level ``torch.library.Library`` API: a schema, a
CPU and a CUDA implementation (plain Python functions that allocate outputs
with torch and hand raw pointers to ``fastloss._C``), a fake implementation
for tracing, and autograd through ``torch.library.register_autograd``.
``Library.impl`` costs a few microseconds per call, against roughly three
times that for ``torch.library.custom_op`` on a small CPU.

Autograd: ``torch.library.register_autograd``. Measured against the alternative (an
``autograd.Function`` registered as the op's Autograd kernel) on the 2-core CI machine, a tiny
forward + backward cost 250 us against 215-285 us: no difference beyond noise, and
register_autograd keeps ``opcheck``'s autograd-registration test meaningful.
"""

from __future__ import annotations

import contextlib
import os
from typing import Callable, Iterator, Sequence

import torch

from . import _C

LIB = torch.library.Library("fastloss", "DEF")
BUILD_INFO: dict = dict(_C.build_info())
# A FASTLOSS_CUDA=SIMULATE build: the CUDA kernels compiled as host code against a simulated device
# (csrc/sim/). Its _C.<kernel>_cuda entry points take host pointers, so they serve CPU tensors inside
# simulated_cuda(); real CUDA tensors get an error.
SIMULATED_CUDA: bool = bool(BUILD_INFO.get("cuda_simulated", False))
# Whether CUDA tensors can run here (a real CUDA build).
HAS_CUDA_KERNELS: bool = bool(BUILD_INFO["cuda"]) and not SIMULATED_CUDA

# Element-type codes understood by csrc/common/dtype.h.
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}

REBUILD_HINT = (
    "this fastloss build has no CUDA kernels (it was built without nvcc). Rebuild it on a machine with the CUDA "
    "toolkit: FASTLOSS_CUDA=ON pip install --no-build-isolation ."
)
SIMULATED_HINT = (
    "this fastloss build runs its CUDA kernels on a simulated device (FASTLOSS_CUDA=SIMULATE): give it CPU tensors "
    "inside fastloss.simulated_cuda(), or rebuild with FASTLOSS_CUDA=ON for a real GPU"
)

_settings = {
    "poison_outputs": os.environ.get("FASTLOSS_POISON_OUTPUTS", "0") == "1",
    "check_targets_on_cuda": True,
}


def accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 inputs accumulate in float64, the other float types in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def empty(shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An output buffer for a kernel to fill. With poisoning on (tests), it starts as NaN (integer
    buffers: all bits set) so that an element a kernel forgets to write cannot pass for a correct
    value."""
    out = torch.empty(shape, dtype=dtype, device=device)
    if _settings["poison_outputs"]:
        out.fill_(float("nan") if out.is_floating_point() else -1 if dtype.is_signed else torch.iinfo(dtype).max)
    return out


@contextlib.contextmanager
def poison_outputs(enabled: bool = True) -> Iterator[None]:
    """Within the block, kernel outputs are filled with NaN before the kernel runs."""
    previous = _settings["poison_outputs"]
    _settings["poison_outputs"] = enabled
    try:
        yield
    finally:
        _settings["poison_outputs"] = previous


def set_target_checks(enabled: bool) -> None:
    """Turn the eager check of class indices on CUDA on (default) or off.

    The check reads the targets back to the host, which synchronizes the stream once per call. With it
    off, a row whose target is out of range gets a NaN loss and a NaN gradient instead of an error.
    On the CPU the targets are always checked, at no extra cost. Under ``torch.compile`` and CUDA-graph
    capture the check is skipped.
    """
    _settings["check_targets_on_cuda"] = bool(enabled)


# ---------------------------------------------------------------------------- simulated CUDA
# The routing flag is process-global, not thread-local: the simulated device is one process-wide device
# (one schedule, one set of counters), and the functional code that reads the flag (is_cuda below) is
# traced by torch.compile, which guards a plain dict entry but cannot guard a threading.local. Autograd
# runs the backward of a graph of CPU tensors on the thread that calls backward(), so with either kind
# of flag a backward called inside the scope is routed and one called after it is not.
_routing = {"enabled": False}


def _simulating() -> bool:
    return SIMULATED_CUDA and _routing["enabled"]


@contextlib.contextmanager
def simulated_cuda(enabled: bool = True) -> Iterator[None]:
    """Run fastloss ops given CPU tensors through their CUDA implementations on the simulated device.

    Only in a build made with ``FASTLOSS_CUDA=SIMULATE pip install .``: there the CUDA kernels are
    compiled as host code against a simulated GPU (``csrc/sim/``). Within the block, every fastloss
    op given CPU tensors takes the op's CUDA code path: the same workspace sizes, launch plans, dtype
    rules, alignment checks and host-read rules as on a GPU, with device memory being host memory
    (results are ordinary CPU tensors). Outside it, the CPU kernels run as usual. ``simulated_cuda(False)`` turns the routing off within an enclosing block (e.g. for a CPU
    reference); it is allowed in any build. Entering ``simulated_cuda()`` in another build raises.
    The setting is process-wide (all threads), like the simulated device itself.
    """
    enabled = bool(enabled)
    if enabled and not SIMULATED_CUDA:
        raise RuntimeError(
            "fastloss.simulated_cuda: this fastloss build has no simulated CUDA device; build one with "
            "FASTLOSS_CUDA=SIMULATE pip install --no-build-isolation ."
        )
    previous = _routing["enabled"]
    _routing["enabled"] = enabled
    try:
        yield
    finally:
        _routing["enabled"] = previous


def is_cuda(t: torch.Tensor) -> bool:
    """Whether ``t`` takes the CUDA code path: a CUDA tensor, or a CPU tensor inside simulated_cuda()."""
    return t.is_cuda or (t.device.type == "cpu" and _simulating())


def is_cuda_device(device: torch.device | str) -> bool:
    """``is_cuda`` for a device (e.g. the device a self-check or a benchmark runs on)."""
    device = torch.device(device)
    return device.type == "cuda" or (device.type == "cpu" and _simulating())


def device_index(t: torch.Tensor) -> int:
    """The GPU index the CUDA entry points take: ``t``'s, or 0 on the simulated device."""
    if t.device.type == "cpu" and _simulating():
        return 0
    return t.device.index


def may_inspect_values(t: torch.Tensor) -> bool:
    """Whether an eager data-dependent check on ``t`` (a host read) is allowed now. Tensors on the
    simulated device follow the CUDA rules (never captured in a graph)."""
    if torch.compiler.is_compiling():
        return False
    if is_cuda(t):
        if not _settings["check_targets_on_cuda"]:
            return False
        if not t.is_cuda:  # simulated: no stream capture exists there
            return True
        with on_device(t):  # the capture state belongs to t's device, not the current one
            return not torch.cuda.is_current_stream_capturing()
    return True


def on_device(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """Makes ``t``'s GPU current when it is not already. Switching through torch (rather than only in
    the C++ guard) keeps the CUDA runtime from creating a context on GPU 0 when switching back.
    Nothing to switch for CPU tensors (on the simulated device too)."""
    if t.device.index is None or t.device.index == torch.cuda.current_device():
        return contextlib.nullcontext()
    return torch.cuda.device(t.device)


_cpu_threads_set = [0]


def sync_cpu_threads() -> None:
    """CPU kernels use as many threads as torch does (``torch.set_num_threads``; 1 in DataLoader workers)."""
    threads = torch.get_num_threads()
    if threads != _cpu_threads_set[0]:
        _C.set_cpu_thread_limit(threads)
        _cpu_threads_set[0] = threads


def cuda_stream(t: torch.Tensor) -> int:
    """The handle of the current stream of ``t``'s device: kernels never launch on stream 0 (on the
    simulated device, which ignores streams, it is 0)."""
    if t.device.type == "cpu" and _simulating():
        return 0
    return torch.cuda.current_stream(t.device).cuda_stream


def launch(kernel: str, device: str, t: torch.Tensor, *args) -> None:
    """Runs ``_C.<kernel>_cpu(*args)`` with the CPU thread count synced, or
    ``_C.<kernel>_cuda(*args, device index, stream)`` on ``t``'s GPU and current stream."""
    if device == "cpu":
        sync_cpu_threads()
        getattr(_C, f"{kernel}_cpu")(*args)
        return
    with on_device(t):
        getattr(_C, f"{kernel}_cuda")(*args, device_index(t), cuda_stream(t))


def require_cuda_kernels(fn: str, t: torch.Tensor) -> None:
    if t.device.type == "cuda" and not HAS_CUDA_KERNELS:
        raise RuntimeError(f"fastloss.{fn}: got CUDA tensors, but {SIMULATED_HINT if SIMULATED_CUDA else REBUILD_HINT}")


def _missing_cuda_impl(name: str) -> Callable:
    hint = SIMULATED_HINT if SIMULATED_CUDA else REBUILD_HINT

    def impl(*args, **kwargs):
        raise RuntimeError(f"fastloss.{name}: got CUDA tensors, but {hint}")

    return impl


def _routed_cpu_impl(cpu: Callable, cuda: Callable | None) -> Callable:
    """A SIMULATE build's CPU kernel of an op: its CUDA implementation inside simulated_cuda()."""
    if cuda is None:
        return cpu

    def impl(*args, **kwargs):
        return (cuda if _routing["enabled"] else cpu)(*args, **kwargs)

    return impl


def define_op(
    name: str,
    schema: str,
    *,
    cpu: Callable,
    cuda: Callable | None,
    fake: Callable,
    backward: Callable | None = None,
    setup_context: Callable | None = None,
) -> torch._ops.OpOverload:
    """Define ``fastloss::<name>`` and register its kernels; returns ``torch.ops.fastloss.<name>.default``."""
    LIB.define(f"{name}{schema}")
    LIB.impl(name, _routed_cpu_impl(cpu, cuda) if SIMULATED_CUDA else cpu, "CPU")
    LIB.impl(name, cuda if (cuda is not None and HAS_CUDA_KERNELS) else _missing_cuda_impl(name), "CUDA")
    qualname = f"fastloss::{name}"
    torch.library.register_fake(qualname, fake, lib=LIB)
    if backward is not None:
        torch.library.register_autograd(qualname, backward, setup_context=setup_context, lib=LIB)
    return getattr(torch.ops.fastloss, name).default
