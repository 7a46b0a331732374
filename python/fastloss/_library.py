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

``define_op`` returns a ``FastOp`` (``_fast_op.py``): what family code calls. In plain eager code it
runs the kernel (or, when a gradient is needed, an ``autograd.Function`` of the same formula) without
the dispatcher's per-call cost; everywhere else it calls ``torch.ops.fastloss.<name>``.
"""

from __future__ import annotations

import contextlib
import os
from typing import Callable, Iterator, Sequence

import torch

from . import _C
from ._fast_op import OPS, FastOp, always_dispatch, direct_device_type  # noqa: F401  (re-exported)

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
    # Eager host reads that validate values on CUDA (class indices, index lists, weights): off by default,
    # where the kernels report bad indices on the device instead (see "errors found on the device").
    "check_targets_on_cuda": False,
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
    """Turn the eager host checks of input values on CUDA on or off (default: off).

    Off, no fastloss op reads its inputs back to the host: an out-of-range class index (spherical
    losses, ``SphericalOutputLayer``) gets a NaN loss and gradient for its row and is reported by the
    kernel on the device; the error is raised, naming the function and the argument, by the next
    fastloss call on that device or by ``fastloss.check_device_errors()``. On, each call also reads
    the indices (and the other values checked on the host: metric index lists, OT weights and costs,
    attention ``cu_seqlens``) back before launching and raises at once, which synchronizes the stream
    once per call. On the CPU the values are always checked, at no extra cost. Under ``torch.compile``
    and CUDA-graph capture the host checks are skipped either way.
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


def direct_path(tensors: Sequence[torch.Tensor]) -> str | None:
    """For a family's own shortcut past its op (e.g. reusing checked state): the code path, "cpu" or
    "cuda" (simulated CUDA included), when the call may skip the dispatcher and needs no gradient (see
    ``_fast_op``), else None."""
    device_type = direct_device_type(tensors)
    if device_type == "cuda":
        return "cuda" if HAS_CUDA_KERNELS else None  # the dispatcher raises the rebuild hint
    if device_type == "cpu":
        return "cuda" if _simulating() else "cpu"
    return None


def define_op(
    name: str,
    schema: str,
    *,
    cpu: Callable,
    cuda: Callable | None,
    fake: Callable,
    backward: Callable | None = None,
    setup_context: Callable | None = None,
) -> FastOp:
    """Define ``fastloss::<name>`` and register its kernels; returns a :class:`FastOp` calling
    ``torch.ops.fastloss.<name>.default`` (its ``.overload``)."""
    LIB.define(f"{name}{schema}")
    cpu_kernel = _routed_cpu_impl(cpu, cuda) if SIMULATED_CUDA else cpu
    cuda_kernel = cuda if (cuda is not None and HAS_CUDA_KERNELS) else _missing_cuda_impl(name)
    LIB.impl(name, cpu_kernel, "CPU")
    LIB.impl(name, cuda_kernel, "CUDA")
    qualname = f"fastloss::{name}"
    torch.library.register_fake(qualname, fake, lib=LIB)
    if backward is not None:
        torch.library.register_autograd(qualname, backward, setup_context=setup_context, lib=LIB)
    op = FastOp(name, getattr(torch.ops.fastloss, name).default, cpu_kernel, cuda_kernel, backward, setup_context)
    OPS[name] = op
    return op


def host_scalar_value(t: torch.Tensor) -> float:
    """The value of a one-element tensor. A CPU tensor (a hyper-parameter the functional API wraps, e.g.
    metric's scale) is read from host memory directly, not through the dispatcher: as on a real GPU,
    where reading it waits for nothing, the host-read counter of tests/test_sync_free.py does not count
    it on the simulated device either. A CUDA tensor is read with float() (a synchronization)."""
    if t.is_cuda:
        return float(t)
    return float(t.detach().reshape(()).numpy())


# ---------------------------------------------------------------------------- errors found on the device
# A bad input that a CUDA kernel meets (an out-of-range class index) or that torch ops compute on the
# device (the factored layer's guard) is reported without a host read: the kernel writes a code and
# three details into a slot of pinned host memory (csrc/common/device_error.h), and the host raises it,
# without waiting for the GPU, at the start of the next fastloss call that takes the slot, or at
# fastloss.check_device_errors(), which waits for the current stream first. As torch's device-side
# asserts, the error surfaces later than the call that caused it, so the message says so; unlike them,
# the CUDA context stays usable. One slot per device; the first error wins until it is raised.

# code -> (function, argument or None, describe(a, b, c) -> str, exception type)
_device_errors: dict[int, tuple[str, str | None, Callable[[int, int, int], str], type]] = {}
# (device type, index) -> (claim: device int64[1], words: pinned host int64[4])
_error_slots: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = {}


def register_device_error(fn: str, argument: str | None, describe: Callable[[int, int, int], str],
                          kind: type = ValueError) -> int:  # fmt: skip
    """A code for a kernel (or ``report_device_error_if``) to report; ``describe`` turns its three details
    into the rest of the message, after "fastloss.<fn> ...: argument '<argument>' "."""
    code = len(_device_errors) + 1
    _device_errors[code] = (fn, argument, describe, kind)
    return code


def _slot_key(t: torch.Tensor) -> tuple[str, int]:
    return ("cuda", t.device.index) if t.is_cuda else ("sim", 0)


def _error_slot(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    key = _slot_key(t)
    slot = _error_slots.get(key)
    if slot is None:
        if t.is_cuda:
            with on_device(t):
                if torch.cuda.is_current_stream_capturing():
                    return None  # the claim's zero fill would only run at replay: allocate it outside a graph
                claim = torch.zeros(1, dtype=torch.int64, device=t.device)
            words = torch.zeros(_C.device_error_words, dtype=torch.int64, pin_memory=True)
        else:  # the simulated device: host memory for both
            claim = torch.zeros(1, dtype=torch.int64)
            words = torch.zeros(_C.device_error_words, dtype=torch.int64)
        slot = _error_slots[key] = (claim, words)
    return slot


def device_error_slot(t: torch.Tensor, code: int, raise_pending: bool = True) -> tuple[int, int, int]:
    """(claim, words, code) pointers for a CUDA entry point that reports under ``code`` on ``t``'s device.
    Raises an error an earlier call left there first (no host sync: a volatile read of pinned memory)."""
    slot = _error_slot(t)
    if slot is None:
        return 0, 0, 0
    claim, words = slot
    if raise_pending and _C.device_error_peek(words.data_ptr()):
        _raise_from(claim, words)
    return claim.data_ptr(), words.data_ptr(), code


def report_device_error_if(t: torch.Tensor, code: int, flag: torch.Tensor, details: torch.Tensor) -> None:
    """Reports ``code`` with ``details`` (int64[3] on the device) when ``flag`` (one integer or bool on the
    device) is nonzero, in stream order, without a host read; an earlier error in the slot is kept."""
    claim, words, code = device_error_slot(t, code, raise_pending=False)  # (mid-step: raised at the next call)
    if claim == 0:
        return
    flag = flag.to(torch.int64).reshape(1).contiguous()
    details = details.to(torch.int64).reshape(3).contiguous()
    with on_device(t):
        _C.device_error_report_if_cuda(claim, words, code, flag.data_ptr(), details.data_ptr(), device_index(t),
                                       cuda_stream(t))  # fmt: skip


def _raise_from(claim: torch.Tensor, words: torch.Tensor) -> None:
    code, a, b, c = _C.device_error_take(words.data_ptr())
    if code == 0:
        return
    claim.zero_()  # in stream order, after the kernel that took it
    fn, argument, describe, kind = _device_errors.get(
        code, ("(unknown)", None, lambda *_: f"device error code {code}", RuntimeError))
    where = f"argument '{argument}' " if argument else ""
    raise kind(f"fastloss.{fn} (an earlier call, found on the device): {where}{describe(a, b, c)}")


def raise_pending_device_errors(t: torch.Tensor | None = None) -> None:
    """Raises an error a kernel reported on ``t``'s device (every device when None), without waiting
    for the GPU: errors of kernels still running are not seen yet."""
    keys = list(_error_slots) if t is None else [_slot_key(t)]
    for key in keys:
        slot = _error_slots.get(key)
        if slot is not None and _C.device_error_peek(slot[1].data_ptr()):
            _raise_from(*slot)


def check_device_errors(device: torch.device | str | int | None = None) -> None:
    """Waits for the current stream of ``device`` (every device that ran a fastloss CUDA kernel when
    None) and raises the first error a fastloss kernel found there since the last check: an
    out-of-range class index, or an update of ``SphericalOutputLayer`` that its guard skipped. Without
    it, such an error is raised by the next fastloss call on that device that takes the error slot. A
    synchronization: not inside a CUDA graph capture."""
    keys = list(_error_slots)
    if device is not None:
        device = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
        if device.type == "cuda":
            keys = [("cuda", torch.cuda.current_device() if device.index is None else device.index)]
        else:
            keys = [("sim", 0)]
    for key in keys:
        slot = _error_slots.get(key)
        if slot is None:
            continue
        if key[0] == "cuda":
            torch.cuda.current_stream(key[1]).synchronize()
        _raise_from(*slot)


def graph_capturing(t: torch.Tensor) -> bool:
    """Whether ``t``'s device is capturing a CUDA graph now (never on the simulated device)."""
    if not t.is_cuda:
        return False
    with on_device(t):
        return torch.cuda.is_current_stream_capturing()


def may_validate_once(t: torch.Tensor) -> bool:
    """Whether a one-time validation (at construction, e.g. a QuantizedWeight) may read ``t``'s values
    back: always in eager code, whatever fastloss.set_target_checks says; never under torch.compile or
    CUDA-graph capture. Per-call checks use may_inspect_values."""
    if torch.compiler.is_compiling():
        return False
    return not graph_capturing(t)
