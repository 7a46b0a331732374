"""The multiplier of InfoNCE's logits from the ways users give it: ``temperature`` (its inverse),
``scale`` (the multiplier), ``log_scale`` (its log: open_clip's ``model.logit_scale`` parameter) or
``logit_scale`` (the multiplier under the name of open_clip's ``ClipLoss`` argument).

A number becomes a float64 CPU scalar that the kernels read on the host (free). A tensor stays on the
device and is folded into the queries (``scale * q``) by the caller: reading its value for the kernel
would be a host synchronization on CUDA every step. A non-positive or infinite tensor value is refused
with a ValueError where the values may be inspected (the CPU), else it makes the loss NaN and is
reported as a device error (raised by the next fastloss call or ``fastloss.check_device_errors()``);
a NaN scale (a diverged run) gives a NaN loss everywhere, as NaN embeddings do.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch

from .. import _library as L
from .. import _validate as V

DEFAULT_TEMPERATURE = 0.07  # open_clip's initial temperature (logit_scale = log(1 / 0.07))
_NAMES = ("scale", "log_scale", "logit_scale")


def _describe_bad_scale(_a: int, _b: int, _c: int) -> str:
    return ("(the multiplier of the logits: scale, exp(log_scale) or logit_scale) must be finite and > 0; the "
            "loss of that call is NaN")  # fmt: skip


_BAD_SCALE_CODE = L.register_device_error("info_nce", "scale", _describe_bad_scale)


@dataclass
class LogitScale:
    """``value``: a Python float for the kernels (``tensor`` is None), or 1.0 with ``tensor`` the 0-dim
    multiplier on the embeddings' device, to be folded into the queries."""

    value: float
    tensor: torch.Tensor | None = None
    bad: torch.Tensor | None = None  # on CUDA: whether the tensor was refused (made NaN), for report()

    def report(self) -> None:
        """Reports a refused tensor as a device error; called after the loss's kernels, so that the
        error is raised by the next fastloss call (or check_device_errors()), not by this one's launch."""
        if self.bad is not None:
            L.report_device_error_if(self.bad, _BAD_SCALE_CODE, self.bad,
                                     torch.zeros(3, dtype=torch.int64, device=self.bad.device))  # fmt: skip


def resolve(fn: str, device: torch.device, *, temperature: float | None, scale: torch.Tensor | float | None,
            log_scale: torch.Tensor | float | None, logit_scale: torch.Tensor | float | None,
            max_scale: float | None) -> LogitScale:  # fmt: skip
    given = {name: value for name, value in zip(_NAMES, (scale, log_scale, logit_scale)) if value is not None}
    if len(given) > 1:
        raise ValueError(f"fastloss.{fn}: give one of 'scale' (the multiplier of the logits), 'log_scale' (its log) "
                         f"and 'logit_scale' (the multiplier, open_clip ClipLoss's name), got {' and '.join(given)}")
    cap = None if max_scale is None else V.real_number(fn, "max_scale", max_scale, positive=True)
    if not given:
        t = DEFAULT_TEMPERATURE if temperature is None else V.real_number(fn, "temperature", temperature, positive=True)
        return LogitScale(1.0 / t if cap is None else min(1.0 / t, cap))
    name, value = next(iter(given.items()))
    # stacklevel 3: the user's line, above the public function that called this helper.
    if temperature is not None:
        warnings.warn(f"fastloss.{fn}: 'temperature' is ignored because '{name}' is given (the logits are "
                      f"multiplied by the scale, not divided by the temperature); pass only one of them",
                      stacklevel=3)  # fmt: skip
    if name == "logit_scale" and isinstance(value, torch.nn.Parameter):
        warnings.warn(f"fastloss.{fn}: 'logit_scale' is the multiplier itself (open_clip's ClipLoss argument, "
                      "model.logit_scale.exp()), but a Parameter was given, which in open_clip holds its log: pass "
                      "log_scale=model.logit_scale, or scale= if the parameter holds the multiplier", stacklevel=3)
    if not isinstance(value, torch.Tensor):
        number = V.real_number(fn, name, value)
        multiplier = (math.exp(number) if number < 700 else math.inf) if name == "log_scale" else number
        if not (math.isfinite(multiplier) and multiplier > 0):
            raise ValueError(f"fastloss.{fn}: argument '{name}' must give a finite multiplier > 0, got {value!r}")
        return LogitScale(multiplier if cap is None else min(multiplier, cap))
    if value.numel() != 1 or not value.is_floating_point():
        raise ValueError(f"fastloss.{fn}: argument '{name}' must be one floating-point value, got {value.dtype} of "
                         f"shape {tuple(value.shape)}")  # fmt: skip
    if value.device != device:
        raise ValueError(f"fastloss.{fn}: argument '{name}' is on {value.device}, the embeddings on {device}")
    tensor = value.reshape(())
    if name == "log_scale":
        tensor = tensor.exp()
    if cap is not None:
        tensor = tensor.clamp(max=cap)
    # A non-positive or infinite multiplier: refused at once where the values may be read (the CPU),
    # else made NaN (a NaN one stays NaN: its loss is NaN) and, on CUDA, reported as a device error.
    bad = (tensor <= 0) | tensor.isinf()
    if L.may_inspect_values(tensor):
        if bool(bad):
            raise ValueError(f"fastloss.{fn}: argument '{name}' must give a finite multiplier > 0, got "
                             f"{float(tensor.detach())}")  # fmt: skip
        return LogitScale(1.0, tensor)
    checked = torch.where(bad, torch.full_like(tensor, math.nan), tensor)
    reported = L.is_cuda(tensor) and not torch.compiler.is_compiling()
    return LogitScale(1.0, checked, bad if reported else None)
