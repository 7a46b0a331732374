"""FastOp: a fastloss op as the family code calls it, with a shortcut past torch's dispatcher in plain
eager code.

Calling ``torch.ops.fastloss.<name>.default`` costs about 3 us before the kernel runs, and 15 us when
an autograd formula is registered (``torch.library.register_autograd``), even when no input needs a
gradient (measured on the 2-core CI machine): several times what the kernels take at the sizes most
real calls have (a decode step, a metric loss on a few hundred samples). A FastOp runs

* the kernel itself (the op's CPU or CUDA implementation) when no gradient is needed, or
* an ``autograd.Function`` built from the op's own backward and setup_context when one is,

but only where dispatching could not change the result: no ``torch.compile``/``jit`` tracing, no
dispatch or ``__torch_function__`` mode (FakeTensorMode, FlopCounterMode, ``with torch.device``), no
functorch transform, every tensor a plain ``torch.Tensor`` (or Parameter) and all of them on CPU or
all on CUDA, the device type the dispatcher would pick. Anything else calls the op through the
dispatcher (``.overload``), so every op keeps working under every mode, and ``torch.ops.fastloss``
is untouched for those who call it. ``FASTLOSS_ALWAYS_DISPATCH=1`` or ``always_dispatch()`` turns the
shortcut off.
"""

from __future__ import annotations

import contextlib
import os
from typing import Callable, Iterator, Sequence

import torch

_settings = {"direct_calls": os.environ.get("FASTLOSS_ALWAYS_DISPATCH", "0") != "1"}

_PLAIN_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)

# Every op defined so far, by name (tests enumerate them; a dispatch mode can run an op's kernel).
OPS: dict[str, FastOp] = {}


@contextlib.contextmanager
def always_dispatch(enabled: bool = True) -> Iterator[None]:
    """Within the block, every op call goes through torch's dispatcher (no FastOp shortcut)."""
    previous = _settings["direct_calls"]
    _settings["direct_calls"] = not enabled
    try:
        yield
    finally:
        _settings["direct_calls"] = previous


def direct_call_state(tensors: Sequence[torch.Tensor]) -> tuple[str, bool] | None:
    """(device type, whether autograd must record the call) when a call on ``tensors`` may skip the
    dispatcher, else None. CPU tensors inside simulated_cuda() are "cpu": the CPU kernel of a SIMULATE
    build routes them to the CUDA code."""
    if (
        not _settings["direct_calls"]
        or torch.compiler.is_compiling()
        or torch._C._len_torch_dispatch_stack() > 0
        or torch._C._is_torch_function_mode_enabled()
        or torch._C._functorch.peek_interpreter_stack() is not None
        or torch._C._get_tracing_state() is not None
    ):
        return None
    device_type = None
    grad_enabled = torch.is_grad_enabled()
    needs_grad = False
    for t in tensors:
        if type(t) not in _PLAIN_TENSOR_TYPES:
            return None
        needs_grad = needs_grad or (grad_enabled and t.requires_grad)
        kind = t.device.type
        if kind != device_type:
            if device_type is not None or kind not in ("cpu", "cuda"):
                return None
            device_type = kind
    return device_type or "cpu", needs_grad


def direct_device_type(tensors: Sequence[torch.Tensor]) -> str | None:
    """The device type when a call on ``tensors`` may run the kernel itself (no gradient needed)."""
    state = direct_call_state(tensors)
    return state[0] if state is not None and not state[1] else None


class FastOp:
    """``torch.ops.fastloss.<name>.default`` (``.overload``) with the eager shortcut of this module."""

    __slots__ = ("name", "overload", "_kernels", "_tensor_positions", "_defaults", "_function")

    def __init__(self, name: str, overload: torch._ops.OpOverload, cpu: Callable, cuda: Callable,
                 backward: Callable | None = None, setup_context: Callable | None = None) -> None:  # fmt: skip
        self.name = name
        self.overload = overload
        self._kernels = {"cpu": cpu, "cuda": cuda}
        arguments = overload._schema.arguments
        if any(_is_tensor_list(a.type) for a in arguments):
            raise NotImplementedError(f"fastloss.{name}: FastOp does not handle Tensor[] arguments yet")
        self._tensor_positions = tuple(i for i, a in enumerate(arguments) if _is_tensor(a.type))
        # The autograd formula sees every argument, defaults filled in, as register_autograd gives them.
        self._defaults = tuple(a.default_value if a.has_default_value() else _REQUIRED for a in arguments)
        self._function = None
        if backward is not None:
            self._function = _autograd_function(name, self._kernels, self._tensor_positions, backward, setup_context)

    def __call__(self, *args):
        state = direct_call_state([args[i] for i in self._tensor_positions if i < len(args) and args[i] is not None])
        if state is None:
            return self.overload(*args)
        device_type, needs_grad = state
        if not needs_grad:
            return self._kernels[device_type](*args)
        if self._function is None:  # no formula: the dispatcher says so in its own words
            return self.overload(*args)
        if len(args) < len(self._defaults):
            args = args + self._defaults[len(args):]
            if _REQUIRED in args:
                return self.overload(*args[: args.index(_REQUIRED)])  # the dispatcher's error
        return self._function.apply(*args)

    def kernel(self, device_type: str) -> Callable:
        """The op's implementation for "cpu" or "cuda" tensors (what the dispatcher would call)."""
        return self._kernels[device_type]

    def __repr__(self) -> str:
        return f"FastOp({self.overload})"


_REQUIRED = object()


def _autograd_function(name: str, kernels: dict, tensor_positions: tuple, backward: Callable,
                       setup_context: Callable | None) -> type:  # fmt: skip
    """An autograd.Function running the op's kernel with the op's registered formula."""

    def forward(*args):
        first = next(args[i] for i in tensor_positions if args[i] is not None)
        return kernels["cuda" if first.is_cuda else "cpu"](*args)

    def setup(ctx, inputs, output):
        if setup_context is not None:
            setup_context(ctx, inputs, output)

    def backward_all(ctx, *grads):
        result = backward(ctx, *grads)
        return result if isinstance(result, tuple) else (result,)

    return type(f"{name}_function", (torch.autograd.Function,), {
        "forward": staticmethod(forward),
        "setup_context": staticmethod(setup),
        "backward": staticmethod(backward_all),
    })  # fmt: skip


def _is_tensor(kind) -> bool:
    return isinstance(kind, torch.TensorType) or (
        isinstance(kind, torch.OptionalType) and isinstance(kind.getElementType(), torch.TensorType)
    )


def _is_tensor_list(kind) -> bool:
    return isinstance(kind, torch.ListType) and isinstance(kind.getElementType(), torch.TensorType)
