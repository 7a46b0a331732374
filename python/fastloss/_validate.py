"""Argument checks shared by every op. Each raises before any kernel runs, with
a message that names the function, the argument, what was expected and what was given."""

from __future__ import annotations

import math
from typing import Iterable

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
REDUCTIONS = ("mean", "sum", "none")


def _describe(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)} on {value.device}"
    return f"{type(value).__name__} {value!r}"


def tensor(fn: str, name: str, value: object) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"fastloss.{fn}: argument '{name}' must be a torch.Tensor, got {_describe(value)}")
    return value


def dtype_in(fn: str, name: str, value: torch.Tensor, allowed: Iterable[torch.dtype]) -> None:
    allowed = tuple(allowed)
    if value.dtype not in allowed:
        names = ", ".join(str(d).replace("torch.", "") for d in allowed)
        raise TypeError(f"fastloss.{fn}: argument '{name}' must have dtype in ({names}), got {value.dtype}")


def ndim_at_least(fn: str, name: str, value: torch.Tensor, ndim: int, what: str) -> None:
    if value.dim() < ndim:
        raise ValueError(f"fastloss.{fn}: argument '{name}' must be {what}, got shape {tuple(value.shape)}")


def same_device(fn: str, **tensors: torch.Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        listed = ", ".join(f"'{n}' on {d}" for n, d in devices.items())
        raise ValueError(f"fastloss.{fn}: all tensors must be on one device, got {listed}")


def reduction(fn: str, value: object) -> str:
    if value not in REDUCTIONS:
        raise ValueError(f"fastloss.{fn}: argument 'reduction' must be one of {REDUCTIONS}, got {value!r}")
    return value  # type: ignore[return-value]


def real_number(fn: str, name: str, value: object, *, positive: bool = False, non_negative: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"fastloss.{fn}: argument '{name}' must be a real number, got {_describe(value)}")
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"fastloss.{fn}: argument '{name}' must be finite, got {value!r}")
    if positive and number <= 0:
        raise ValueError(f"fastloss.{fn}: argument '{name}' must be > 0, got {value!r}")
    if non_negative and number < 0:
        raise ValueError(f"fastloss.{fn}: argument '{name}' must be >= 0, got {value!r}")
    return number


def integer(fn: str, name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"fastloss.{fn}: argument '{name}' must be an int, got {_describe(value)}")
    return value
