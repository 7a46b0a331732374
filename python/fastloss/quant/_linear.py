"""``QuantLinear`` (an ``nn.Linear`` whose weight is a ``QuantizedWeight``) and ``quantize_model``."""

from __future__ import annotations

import fnmatch
import sys
import warnings
from typing import Callable, Iterable, Mapping, Sequence, Union

import torch

from ._format import _ARRAYS, FORMAT_VERSION, QuantizedWeight

META_KEY = "quant_meta"  # int64 [format version, out_features, in_features, group_size]
# progress(done, total, name) after each layer; True prints a line per layer to stderr.
ProgressCallback = Callable[[int, int, str], None]
SkipPatterns = Union[str, Sequence[str], Callable[[str], bool], None]


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
        for name in _ARRAYS:
            self.register_buffer(name, getattr(qweight, name))
        # The format metadata (version, N, K, group size) travels in the state dict, so a checkpoint
        # rebuilds the layer with no quantization run (QuantLinear.from_state_dict, quantize_model(from_state_dict=)).
        self.register_buffer(META_KEY, qweight.state_dict()["meta"].to(qweight.device))
        if bias is not None:
            if bias.shape != (self.out_features,):
                raise ValueError(f"fastloss.quant.QuantLinear: 'bias' must have shape ({self.out_features},), got {tuple(bias.shape)}")
            bias = torch.nn.Parameter(bias.detach().to(qweight.dtype).clone(), requires_grad=bias.requires_grad)
        self.bias = bias
        # A loaded state must be a valid packed weight too (its ranks index the side array).
        self.register_load_state_dict_post_hook(_check_loaded_state)
        self._register_load_state_dict_pre_hook(_fill_missing_meta, with_module=True)

    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, torch.Tensor], prefix: str = "") -> "QuantLinear":
        """A QuantLinear built from the saved tensors of one (``state_dict[prefix + "main"]``, ...,
        ``prefix + "quant_meta"``, and ``prefix + "bias"`` when it has one): no quantization runs, the
        packed arrays are used as saved. Raises ValueError naming the missing key or the format mismatch."""
        fn = "fastloss.quant.QuantLinear.from_state_dict"
        missing = [prefix + name for name in (*_ARRAYS, META_KEY) if prefix + name not in state_dict]
        if missing:
            raise ValueError(f"{fn}: argument 'state_dict' has no {', '.join(repr(k) for k in missing)}; it must hold a "
                             f"QuantLinear's state (module.state_dict() after quantize_model / QuantLinear.from_linear)")  # fmt: skip
        state = {name: state_dict[prefix + name] for name in _ARRAYS}
        state["meta"] = state_dict[prefix + META_KEY].cpu()
        try:
            qweight = QuantizedWeight.from_state_dict(state)
        except (ValueError, TypeError) as error:
            raise type(error)(f"{fn}: {error}") from error
        return cls(qweight, state_dict.get(prefix + "bias"))

    @classmethod
    def from_linear(
        cls,
        linear: torch.nn.Linear,
        *,
        bits: int = 2,
        group_size: int = 128,
        frac_4bit: float = 0.1,
        select: str = "range",
        hessian: torch.Tensor | None = None,
        clip: str = "minmax",
        scale_dtype: torch.dtype | None = None,
        double_quant: bool = False,
    ) -> "QuantLinear":
        """Quantize ``linear.weight`` with ``fastloss.quant.quantize`` (the arguments are its own); the
        bias is kept in the scales' dtype."""
        from . import quantize

        if not isinstance(linear, torch.nn.Linear):
            raise TypeError(f"fastloss.quant.QuantLinear.from_linear: expected an nn.Linear, got {type(linear).__name__}")
        qweight = quantize(linear.weight.detach(), bits=bits, group_size=group_size, frac_4bit=frac_4bit, select=select,
                           hessian=hessian, clip=clip, scale_dtype=scale_dtype, double_quant=double_quant)  # fmt: skip
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

    @property
    def weight(self) -> torch.Tensor:
        """The dense (out_features, in_features) weight, **dequantized on every access** (a new tensor in the
        scales' dtype, O(out x in) time and memory; not a Parameter, not trained, writes to it are lost).
        For code that reads ``linear.weight`` (its shape, dtype, device, or values for tying/inspection);
        keep the result if you need it more than once. Same values as ``qweight.dequantize(scales dtype)``."""
        return self.qweight.dequantize(self.scales.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ W.T + bias`` for x (..., in_features) from the packed weight (float16/bfloat16 of the scales'
        dtype on CUDA; also float32 on the CPU); differentiable in x and the bias."""
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
    # One host read per load (a one-time construction, like quantize): loading is never on a step's path.
    meta = [int(value) for value in getattr(module, META_KEY).cpu()]
    expected = [FORMAT_VERSION, module.out_features, module.in_features, module.group_size]
    if meta != expected:
        raise ValueError(f"fastloss.quant.QuantLinear: the loaded '{META_KEY}' {meta} (format version, out, in, "
                         f"group size) does not match this layer's {expected}; rebuild the layer from the checkpoint "
                         f"with QuantLinear.from_state_dict or quantize_model(model, from_state_dict=...)")  # fmt: skip


def _fill_missing_meta(module: QuantLinear, state_dict, prefix, *_args) -> None:
    """Checkpoints saved before the metadata buffer existed load as before (their arrays are still checked)."""
    if prefix + "main" in state_dict and prefix + META_KEY not in state_dict:
        state_dict[prefix + META_KEY] = getattr(module, META_KEY).clone()


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


def _warn_unmatched_skip(skip: SkipPatterns, linear_names: list[str]) -> None:
    """A skip pattern that matches no Linear is almost always a typo (and the layer it meant to keep dense,
    often ``lm_head``, gets quantized): say so, with names it could have meant."""
    if skip is None or callable(skip):
        return
    patterns = [skip] if isinstance(skip, str) else list(skip)
    for pattern in patterns:
        if not any(fnmatch.fnmatchcase(name, pattern) for name in linear_names):
            shown = ", ".join(repr(n) for n in linear_names[:6]) + (", ..." if len(linear_names) > 6 else "")
            warnings.warn(f"fastloss.quant.quantize_model: the skip pattern {pattern!r} matches no nn.Linear, so it "
                          f"keeps nothing dense; patterns are fnmatch patterns on qualified module names, e.g. "
                          f"{shown or '(the model has no nn.Linear)'}", stacklevel=3)  # fmt: skip


def _progress_reporter(progress: bool | ProgressCallback | None) -> ProgressCallback | None:
    if progress is None or progress is False:
        return None
    if progress is True:
        def report(done: int, total: int, name: str) -> None:
            print(f"fastloss.quant.quantize_model: {done}/{total} {name}", file=sys.stderr, flush=True)

        return report
    if not callable(progress):
        raise TypeError(f"fastloss.quant.quantize_model: argument 'progress' must be a bool or a callable "
                        f"progress(done, total, name), got {type(progress).__name__}")  # fmt: skip
    return progress


def _load_quantized(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], skip: SkipPatterns,
                    report: ProgressCallback | None) -> dict[str, dict]:  # fmt: skip
    """quantize_model(from_state_dict=...): every module with a saved QuantLinear state becomes one."""
    fn = "fastloss.quant.quantize_model"
    suffix = "." + META_KEY
    names = sorted(key[: -len(suffix)] if key != META_KEY else "" for key in state_dict
                   if key == META_KEY or key.endswith(suffix))  # fmt: skip
    if not names:
        raise ValueError(f"{fn}: argument 'from_state_dict' holds no quantized layer (no '*.{META_KEY}' key): it must be "
                         f"the state_dict of a model after quantize_model (checkpoints saved before fastloss stored "
                         f"'{META_KEY}' cannot be rebuilt without quantizing)")  # fmt: skip
    if skip is not None:
        raise ValueError(f"{fn}: 'skip' does not apply with 'from_state_dict': the checkpoint says which layers are quantized")
    modules = dict(model.named_modules())
    built: list[tuple[torch.nn.Module, str, QuantLinear]] = []
    out: dict[str, dict] = {}
    for done, name in enumerate(names, 1):
        module = modules.get(name)
        if module is None:
            raise ValueError(f"{fn}: the checkpoint has a quantized layer '{name}' that the model lacks")
        prefix = name + "." if name else ""
        try:
            quantized = QuantLinear.from_state_dict(state_dict, prefix)
        except (ValueError, TypeError) as error:
            raise type(error)(f"{fn}: layer '{name}': {error}") from error
        if isinstance(module, torch.nn.Linear):
            expected = (module.out_features, module.in_features)
            if (quantized.out_features, quantized.in_features) != expected or (module.bias is None) != (quantized.bias is None):
                raise ValueError(f"{fn}: layer '{name}' is an nn.Linear {expected} with{'out' if module.bias is None else ''} "
                                 f"bias, the checkpoint's is {(quantized.out_features, quantized.in_features)} "
                                 f"with{'out' if quantized.bias is None else ''} bias")  # fmt: skip
            device = module.weight.device
        elif isinstance(module, QuantLinear):
            device = module.main.device
        else:
            raise ValueError(f"{fn}: the checkpoint's quantized layer '{name}' is a {type(module).__name__} in the model, "
                             f"not an nn.Linear")  # fmt: skip
        quantized = quantized.to(device)
        parent_name, _, attr = name.rpartition(".")
        built.append((model.get_submodule(parent_name) if parent_name else model, attr, quantized))
        out[name] = {"bits_per_weight": quantized.qweight.bits_per_weight, "relative_output_error": None,
                     "shape": (quantized.out_features, quantized.in_features)}  # fmt: skip
        if report is not None:
            report(done, len(names), name)
    for parent, attr, quantized in built:
        setattr(parent, attr, quantized)
    return out


def quantize_model(
    model: torch.nn.Module,
    *,
    skip: SkipPatterns = None,
    calibration: torch.Tensor | tuple | list | Callable[[torch.nn.Module], object] | None = None,
    progress: bool | ProgressCallback | None = None,
    from_state_dict: Mapping[str, torch.Tensor] | None = None,
    bits: int = 2,
    group_size: int = 128,
    frac_4bit: float = 0.1,
    select: str = "range",
    hessian: torch.Tensor | None = None,
    clip: str = "minmax",
    scale_dtype: torch.dtype | None = None,
    double_quant: bool = False,
) -> dict[str, dict]:
    """Replace every ``nn.Linear`` of ``model`` (in place) by a ``QuantLinear``.

    Args:
        skip: names (fnmatch patterns, e.g. ``"lm_head"`` or ``"*.gate"``) or a predicate on the
            module's qualified name: those Linears stay dense. A pattern that matches no Linear warns
            (a typo would otherwise quantize the layer it meant to keep).
        calibration: optional inputs for the model (a tensor, a tuple of tensors, or a callable
            ``calibration(model)``). Each Linear's inputs then give its Hessian diagonal (for
            ``select="hessian"``) and the measured output error of the report.
        progress: off by default (a library call should not print). ``True`` prints
            "quantize_model: i/n name" to stderr after each layer; a callable is called as
            ``progress(done, total, name)`` after each layer (e.g. to drive a tqdm bar).
        from_state_dict: the ``state_dict()`` of a model after ``quantize_model``: every layer it holds a
            quantized state for (its ``quant_meta`` key) becomes a ``QuantLinear`` built from the saved
            packed arrays, with no quantization run; shapes and bias must match the model's Linears. Then
            ``model.load_state_dict(state_dict)`` loads the rest. The quantization arguments are ignored.
        bits, group_size, frac_4bit, select, hessian, clip, scale_dtype, double_quant: as
            ``fastloss.quant.quantize``, for every layer.

    Returns a report ``{name: {"bits_per_weight", "relative_output_error", "shape"}}``: the relative
    Frobenius error of the layer's output on its calibration inputs, or on 64 standard-normal
    rows (seeded) without calibration (None when loaded from a state dict). Modules other than
    ``nn.Linear`` are untouched. An error leaves the model as it was.
    """
    from . import quantize

    report_progress = _progress_reporter(progress)
    if from_state_dict is not None:
        return _load_quantized(model, from_state_dict, skip, report_progress)
    quant_args = dict(bits=bits, group_size=group_size, frac_4bit=frac_4bit, select=select, clip=clip,
                      scale_dtype=scale_dtype, double_quant=double_quant)  # fmt: skip
    if hessian is not None:
        quant_args["hessian"] = hessian
    _warn_unmatched_skip(skip, [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)])
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
        if report_progress is not None:
            report_progress(len(replacements), len(names), name)
    for parent, attr, quantized in replacements:
        setattr(parent, attr, quantized)
    return report
