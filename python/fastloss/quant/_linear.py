"""``QuantLinear`` (an ``nn.Linear`` whose weight is a ``QuantizedWeight``) and ``quantize_model``."""

from __future__ import annotations

import fnmatch
from typing import Callable, Iterable

import torch


from ._format import QuantizedWeight


class QuantLinear(torch.nn.Module):
    """``y = x W^T + b`` with W stored in the mixed 2/4-bit format.

    The packed arrays are buffers: ``state_dict``, ``.to(device)`` and ``.cuda()`` carry them.
    ``.half()`` / ``.bfloat16()`` (or ``.to(dtype)``) convert the scales, as the CUDA kernel takes
    activations of the scales' dtype; converting fp16 scales to bfloat16 rounds them (the weight
    changes slightly, and converting back does not restore it). A conversion to any other dtype
    (``.float()``) leaves the scales as they are, since the format stores them in 16 bits. The bias is a Parameter.
    Build one with ``QuantLinear.from_linear``.
    """

    def __init__(self, qweight: QuantizedWeight, bias: torch.Tensor | None = None):
        super().__init__()
        if not isinstance(qweight, QuantizedWeight):
            raise TypeError(f"fastloss.quant.QuantLinear: 'qweight' must be a QuantizedWeight, got {type(qweight).__name__}")
        self.out_features, self.in_features = qweight.shape
        self.group_size = qweight.group_size
        for name in ("main", "side", "side_index", "scales", "zeros"):
            self.register_buffer(name, getattr(qweight, name))
        if bias is not None:
            if bias.shape != (self.out_features,):
                raise ValueError(f"fastloss.quant.QuantLinear: 'bias' must have shape ({self.out_features},), got {tuple(bias.shape)}")
            bias = torch.nn.Parameter(bias.detach().to(qweight.dtype).clone(), requires_grad=bias.requires_grad)
        self.bias = bias
        # A loaded state must be a valid packed weight too (its ranks index the side array).
        self.register_load_state_dict_post_hook(_check_loaded_state)

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear, **quant_args) -> "QuantLinear":
        """Quantize ``linear.weight`` with ``fastloss.quant.quantize(**quant_args)``; the bias is
        kept in the scales' dtype."""
        from . import quantize

        if not isinstance(linear, torch.nn.Linear):
            raise TypeError(f"fastloss.quant.QuantLinear.from_linear: expected an nn.Linear, got {type(linear).__name__}")
        qweight = quantize(linear.weight.detach(), **quant_args)
        return cls(qweight, linear.bias)

    def _apply(self, fn, recurse=True):
        scale_dtype = self.scales.dtype
        super()._apply(fn, recurse)
        if self.scales.dtype not in (torch.float16, torch.bfloat16):
            self.scales = self.scales.to(scale_dtype)
        return self

    @property
    def qweight(self) -> QuantizedWeight:
        return QuantizedWeight(main=self.main, side=self.side, side_index=self.side_index, scales=self.scales,
                               zeros=self.zeros, shape=(self.out_features, self.in_features),
                               group_size=self.group_size)  # fmt: skip

    def convert_scales(self, dtype: torch.dtype) -> "QuantLinear":
        """Store the scales (and the bias) in ``dtype`` (float16 or bfloat16): the CUDA kernel
        takes activations of the scales' dtype."""
        converted = self.qweight.to(dtype=dtype)
        self.scales = converted.scales
        if self.bias is not None:
            self.bias.data = self.bias.data.to(dtype)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from . import packed_linear

        bias = self.bias
        if bias is not None and bias.dtype != x.dtype:
            bias = bias.to(x.dtype)  # kept in the scales' dtype; float32 activations on the CPU
        return packed_linear(x, self.main, self.side, self.side_index, self.scales, self.zeros, bias,
                             (self.out_features, self.in_features), self.group_size, cache_owner=self)  # fmt: skip

    def extra_repr(self) -> str:
        qw = self.qweight
        return (f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}, "
                f"bits_per_weight={qw.bits_per_weight:.3f}, bias={self.bias is not None}")  # fmt: skip


def _check_loaded_state(module: QuantLinear, _incompatible_keys) -> None:
    module.qweight  # noqa: B018  (building the QuantizedWeight validates the arrays and their values)


def _skipped(name: str, skip) -> bool:
    if skip is None:
        return False
    if callable(skip):
        return bool(skip(name))
    if isinstance(skip, str):
        skip = [skip]
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in skip)


def _collect_inputs(model: torch.nn.Module, names: Iterable[str], calibration) -> dict[str, torch.Tensor]:
    """The inputs each named Linear sees when ``calibration`` runs: a callable ``calibration(model)``,
    or a tensor / tuple of tensors passed as ``model(*calibration)``."""
    modules = dict(model.named_modules())
    seen: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    def record(name):
        def hook(_module, args, kwargs):
            x = args[0] if args else kwargs["input"]
            seen[name].append(x.detach().reshape(-1, x.shape[-1]))

        return hook

    hooks = [modules[name].register_forward_pre_hook(record(name), with_kwargs=True) for name in names]
    try:
        with torch.no_grad():
            if callable(calibration):
                calibration(model)
            else:
                model(*(calibration if isinstance(calibration, (tuple, list)) else (calibration,)))
    finally:
        for hook in hooks:
            hook.remove()
    return {name: torch.cat(chunks) for name, chunks in seen.items() if chunks}


def quantize_model(model: torch.nn.Module, *, skip=None, calibration=None, **quant_args) -> dict[str, dict]:
    """Replace every ``nn.Linear`` of ``model`` (in place) by a ``QuantLinear``.

    Args:
        skip: names (fnmatch patterns, e.g. ``"lm_head"`` or ``"*.gate"``) or a predicate on the
            module's qualified name: those Linears stay dense.
        calibration: optional inputs for the model (a tensor, a tuple of tensors, or a callable
            ``calibration(model)``). Each Linear's inputs then give its Hessian diagonal (for
            ``select="hessian"``) and the measured output error of the report.
        quant_args: passed to ``fastloss.quant.quantize`` (``bits``, ``group_size``, ``frac_4bit``, ...).

    Returns a report ``{name: {"bits_per_weight", "relative_output_error", "shape"}}``: the relative
    Frobenius error of the layer's output on its calibration inputs, or on 64 standard-normal
    rows (seeded) without calibration. Modules other than ``nn.Linear`` are untouched.
    """
    from . import quantize

    names = [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear) and not _skipped(name, skip)]
    inputs = _collect_inputs(model, names, calibration) if calibration is not None else {}
    # Quantize every layer first and swap them in only when all have succeeded, so that an error
    # (named after its layer) leaves the model as it was.
    replacements: list[tuple[torch.nn.Module, str, QuantLinear]] = []
    report: dict[str, dict] = {}
    for name in names:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        linear = getattr(parent, attr)
        args = dict(quant_args)
        if args.get("select") == "hessian" and "hessian" not in args:
            if name not in inputs:
                raise ValueError(f"fastloss.quant.quantize_model: layer '{name}': select='hessian' needs its inputs, "
                                 f"but the calibration run never called it")  # fmt: skip
            args["hessian"] = inputs[name]
        try:
            quantized = QuantLinear.from_linear(linear, **args)
        except (ValueError, TypeError) as error:
            raise type(error)(f"fastloss.quant.quantize_model: layer '{name}': {error}") from error
        weight = linear.weight.detach()
        if name in inputs:
            x = inputs[name].to(weight.dtype)
        else:
            generator = torch.Generator(device="cpu").manual_seed(0)
            x = torch.randn(64, weight.shape[1], generator=generator).to(weight.device, weight.dtype)
        dense = x.float() @ weight.float().t()
        approx = x.float() @ quantized.qweight.dequantize(torch.float32).t()
        error = float(torch.linalg.norm(dense - approx) / torch.linalg.norm(dense).clamp_min(1e-30))
        replacements.append((parent, attr, quantized))
        report[name] = {"bits_per_weight": quantized.qweight.bits_per_weight, "relative_output_error": error,
                        "shape": tuple(weight.shape)}  # fmt: skip
    for parent, attr, quantized in replacements:
        setattr(parent, attr, quantized)
    return report
