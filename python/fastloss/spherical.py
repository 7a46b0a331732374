"""Spherical-family losses on dense logits: the Z-loss, the log-spherical softmax and the log-Taylor softmax.

Each loss depends on a row of logits ``o`` (length D) only through the target logit ``o_c`` and the row's
moments, so forward is one pass over the logits and backward one more pass that writes the gradient.
The kernels live in ``csrc/spherical/``; the heads (loss and gradient per row) are shared by the CPU and
CUDA code and, later, by the factored output layer.

Ops (``torch.ops.fastloss.*``), all with CPU and CUDA kernels, fake kernels and autograd:

* ``zloss(logits, target, a, b, eps, ignore_index) -> (loss, coef)``
* ``spherical_softmax_loss(logits, target, eps, ignore_index) -> (loss, coef)``
* ``taylor_softmax_loss(logits, target, ignore_index) -> (loss, coef)``
* ``spherical_loss_backward(grad_loss, logits, target, coef, ignore_index) -> grad_logits``

``logits`` is (N, D) with unit stride along a row, ``target`` (N,) int64. ``loss`` is the per-row loss
(0 for ignored rows) and ``coef`` (N, 4) the gradient coefficients saved for backward, both float32
(float64 for float64 logits). The functional API below adds shapes (..., D), reductions and checks.
"""

from __future__ import annotations

import torch

from . import _C
from . import _library as L
from . import _validate as V

__all__ = ["zloss", "spherical_softmax_loss", "taylor_softmax_loss"]

# Loss codes of csrc/spherical/spherical_heads.h (LossKind).
_ZLOSS, _SPHERICAL_SOFTMAX, _TAYLOR_SOFTMAX = 0, 1, 2
_COEFFICIENTS_PER_ROW = 4
_TARGET_DTYPES = (torch.int64, torch.int32)


# ---------------------------------------------------------------------------- kernels
def _check_op_inputs(name: str, logits: torch.Tensor, target: torch.Tensor, **others: torch.Tensor) -> None:
    """The op-level contract (the functional API has already reshaped to it); ``others`` are the op's
    remaining tensor arguments, which must share the device."""
    V.dtype_in(name, "logits", logits, V.FLOAT_DTYPES)
    V.dtype_in(name, "target", target, (torch.int64,))
    if logits.dim() != 2 or logits.shape[1] < 1 or not _has_row_layout(logits):
        raise ValueError(
            f"fastloss.{name}: argument 'logits' must be 2-D (N, D) with D >= 1, unit stride along D and rows that "
            f"do not overlap, got shape {tuple(logits.shape)} and strides {logits.stride()}"
        )
    if target.dim() != 1 or target.shape[0] != logits.shape[0] or not target.is_contiguous():
        raise ValueError(
            f"fastloss.{name}: argument 'target' must be a contiguous 1-D tensor of length N = {logits.shape[0]}, "
            f"got shape {tuple(target.shape)}"
        )
    V.same_device(name, logits=logits, target=target, **others)


def _has_row_layout(logits: torch.Tensor) -> bool:
    """Rows the kernels can read in place: unit stride along D (any stride when D == 1) and, with
    several rows, a row stride of at least D (broadcast rows, stride 0, are not)."""
    rows, cols = logits.shape
    unit_inner = cols == 1 or logits.stride(1) == 1
    return unit_inner and (rows <= 1 or logits.stride(0) >= cols)


def _problem(logits: torch.Tensor, target: torch.Tensor) -> tuple:
    rows, cols = logits.shape
    row_stride = logits.stride(0) if rows > 1 else cols
    return (L.DTYPE_CODES[logits.dtype], logits.data_ptr(), rows, cols, row_stride, target.data_ptr())


def _forward(device: str, name: str, kind: int, logits, target, ignore_index: int, a: float, b: float, eps: float):
    _check_op_inputs(name, logits, target)
    rows = logits.shape[0]
    acc = L.accumulator_dtype(logits.dtype)
    loss = L.empty((rows,), acc, logits.device)
    coef = L.empty((rows, _COEFFICIENTS_PER_ROW), acc, logits.device)
    args = (*_problem(logits, target), ignore_index, kind, a, b, eps, loss.data_ptr(), coef.data_ptr())
    if device == "cpu":
        L.sync_cpu_threads()
        _C.spherical_dense_forward_cpu(*args, f"fastloss.{name}")
        return loss, coef
    index = L.device_index(logits)
    ws_bytes = _C.spherical_dense_forward_cuda_workspace_bytes(rows, logits.shape[1], index)
    # Freed right after the launch: the caching allocator reuses it only in stream order.
    workspace = torch.empty((ws_bytes,), dtype=torch.uint8, device=logits.device) if ws_bytes else None
    error = L.device_error_slot(logits, _BAD_TARGET_CODES[name])  # raises what an earlier call reported
    with L.on_device(logits):
        _C.spherical_dense_forward_cuda(
            *args, workspace.data_ptr() if ws_bytes else 0, ws_bytes, *error, index, L.cuda_stream(logits)
        )
    return loss, coef


def _describe_bad_target(position: int, value: int, cols: int) -> str:
    return (f"has out-of-range class index {value} at flat position {position}; expected 0 <= target < {cols} "
            f"or target == ignore_index (that row's loss and gradient are NaN)")  # fmt: skip


# What the CUDA forward kernel reports for a bad target, per op (csrc/common/device_error.h).
_BAD_TARGET_CODES = {
    name: L.register_device_error(name, "target", _describe_bad_target)
    for name in ("zloss", "spherical_softmax_loss", "taylor_softmax_loss")
}


def _backward(device: str, grad_loss, logits, target, coef, ignore_index: int):
    name = "spherical_loss_backward"
    _check_op_inputs(name, logits, target, grad_loss=grad_loss, coef=coef)
    acc = L.accumulator_dtype(logits.dtype)
    rows = logits.shape[0]
    if grad_loss.dim() != 1 or grad_loss.shape[0] != rows:
        raise ValueError(f"fastloss.{name}: argument 'grad_loss' must have shape ({rows},), got {tuple(grad_loss.shape)}")
    if coef.shape != (rows, _COEFFICIENTS_PER_ROW) or coef.dtype != acc or not coef.is_contiguous():
        raise ValueError(
            f"fastloss.{name}: argument 'coef' must be a contiguous {acc} tensor of shape ({rows}, 4), "
            f"got {coef.dtype} {tuple(coef.shape)}"
        )
    grad_loss = grad_loss.to(acc)
    if grad_loss.stride(0) not in (0, 1):  # an expanded scalar (from mean/sum) stays stride 0: no copy
        grad_loss = grad_loss.contiguous()
    grad = L.empty(tuple(logits.shape), logits.dtype, logits.device)
    args = (
        *_problem(logits, target),
        ignore_index,
        grad_loss.data_ptr(),
        grad_loss.stride(0) if rows > 1 else 0,
        coef.data_ptr(),
        grad.data_ptr(),
    )
    if device == "cpu":
        L.sync_cpu_threads()
        _C.spherical_dense_backward_cpu(*args)
    else:
        with L.on_device(logits):
            _C.spherical_dense_backward_cuda(*args, L.device_index(logits), L.cuda_stream(logits))
    return grad


def _fake_forward(logits, target, *params):
    acc = L.accumulator_dtype(logits.dtype)
    rows = logits.shape[0]
    return logits.new_empty((rows,), dtype=acc), logits.new_empty((rows, _COEFFICIENTS_PER_ROW), dtype=acc)


def _fake_backward(grad_loss, logits, target, coef, ignore_index):
    return logits.new_empty(logits.shape)


_loss_backward_op = L.define_op(
    "spherical_loss_backward",
    "(Tensor grad_loss, Tensor logits, Tensor target, Tensor coef, int ignore_index) -> Tensor",
    cpu=lambda g, x, t, c, ii: _backward("cpu", g, x, t, c, ii),
    cuda=lambda g, x, t, c, ii: _backward("cuda", g, x, t, c, ii),
    fake=_fake_backward,
)


def _setup_context(ctx, inputs, output) -> None:
    logits, target = inputs[0], inputs[1]
    _, coef = output
    ctx.save_for_backward(logits, target, coef)
    ctx.ignore_index = inputs[-1]
    ctx.extra_inputs = len(inputs) - 1
    ctx.mark_non_differentiable(coef)


def _autograd_backward(ctx, grad_loss, _grad_coef):
    logits, target, coef = ctx.saved_tensors
    grad_logits = None
    if ctx.needs_input_grad[0]:
        grad_logits = _loss_backward_op(grad_loss, logits, target, coef, ctx.ignore_index)
    return (grad_logits,) + (None,) * ctx.extra_inputs


def _define_forward(name: str, schema: str, kind: int, to_params):
    """One forward op: ``to_params`` maps the op's trailing arguments to (ignore_index, a, b, eps)."""

    def impl(device):
        return lambda logits, target, *rest: _forward(device, name, kind, logits, target, *to_params(*rest))

    return L.define_op(
        name,
        schema,
        cpu=impl("cpu"),
        cuda=impl("cuda"),
        fake=_fake_forward,
        backward=_autograd_backward,
        setup_context=_setup_context,
    )


_zloss_op = _define_forward(
    "zloss",
    "(Tensor logits, Tensor target, float a, float b, float eps, int ignore_index) -> (Tensor, Tensor)",
    _ZLOSS,
    lambda a, b, eps, ignore_index: (ignore_index, a, b, eps),
)
_spherical_softmax_op = _define_forward(
    "spherical_softmax_loss",
    "(Tensor logits, Tensor target, float eps, int ignore_index) -> (Tensor, Tensor)",
    _SPHERICAL_SOFTMAX,
    lambda eps, ignore_index: (ignore_index, 0.0, 0.0, eps),
)
_taylor_softmax_op = _define_forward(
    "taylor_softmax_loss",
    "(Tensor logits, Tensor target, int ignore_index) -> (Tensor, Tensor)",
    _TAYLOR_SOFTMAX,
    lambda ignore_index: (ignore_index, 0.0, 0.0, 0.0),
)


# ---------------------------------------------------------------------------- functional API
def _prepare(fn: str, logits, target, ignore_index) -> tuple[torch.Tensor, torch.Tensor, torch.Size, int]:
    """Checks the public arguments and brings them to the op contract: (N, D) logits, (N,) int64 target."""
    logits = V.tensor(fn, "logits", logits)
    target = V.tensor(fn, "target", target)
    ignore_index = V.integer(fn, "ignore_index", ignore_index)
    V.dtype_in(fn, "logits", logits, V.FLOAT_DTYPES)
    V.dtype_in(fn, "target", target, _TARGET_DTYPES)
    V.ndim_at_least(fn, "logits", logits, 1, "of shape (..., D) with the classes last")
    if logits.shape[-1] < 1:
        raise ValueError(f"fastloss.{fn}: argument 'logits' must have at least one class (D >= 1), got shape {tuple(logits.shape)}")
    if target.shape != logits.shape[:-1]:
        raise ValueError(
            f"fastloss.{fn}: argument 'target' must have shape {tuple(logits.shape[:-1])} (logits' shape without "
            f"the class dimension), got {tuple(target.shape)}"
        )
    V.same_device(fn, logits=logits, target=target)
    L.require_cuda_kernels(fn, logits)
    classes = logits.shape[-1]
    rows2d = logits if logits.dim() == 2 else logits.reshape(-1, classes)
    if not _has_row_layout(rows2d):  # e.g. a strided column view or expanded (broadcast) rows
        rows2d = rows2d.contiguous()
    target1d = target if target.dim() == 1 else target.reshape(-1)
    if target1d.dtype != torch.int64 or not target1d.is_contiguous():  # (each skipped call saves a torch op)
        target1d = target1d.to(torch.int64).contiguous()
    # The CPU kernel checks targets itself, before writing anything. On CUDA the kernel reports a bad one
    # on the device (raised by the next call or fastloss.check_device_errors()); the eager host check
    # here is the opt-in fastloss.set_target_checks(True).
    if L.is_cuda(target1d) and target1d.numel() and L.may_inspect_values(target1d):
        bad = ((target1d < 0) | (target1d >= classes)) & (target1d != ignore_index)
        if bool(bad.any()):
            index = int(bad.nonzero()[0, 0])
            raise ValueError(
                f"fastloss.{fn}: argument 'target' has out-of-range class index {int(target1d[index])} at flat "
                f"position {index}; expected 0 <= target < {classes} or target == ignore_index ({ignore_index})"
            )
    return rows2d, target1d, target.shape, ignore_index


def _reduce(fn: str, loss: torch.Tensor, target: torch.Tensor, shape: torch.Size, reduction: str, ignore_index: int):
    if reduction == "none":
        return loss if loss.shape == shape else loss.reshape(shape)
    if reduction == "sum":
        return loss.sum()
    # Like torch.nn.functional.cross_entropy: the mean over rows that are not ignored (NaN when all are).
    return loss.sum() / (target != ignore_index).sum()


def zloss(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    a: float = 1.0,
    b: float = 0.0,
    eps: float = 1e-12,
    reduction: str = "mean",
    ignore_index: int = -100,
) -> torch.Tensor:
    """The Z-loss of de Brébisson & Vincent (2016), "The Z-loss: a shift and scale invariant classification loss".

    For each row of logits ``o`` (D classes) and its target class ``c``::

        mu = mean(o),  sigma = sqrt(var(o) + eps),  z_c = (o_c - mu) / sigma,
        loss = softplus(a * (b - z_c)) / a

    The loss is invariant to ``o -> alpha * o + beta`` for ``alpha > 0`` (up to ``eps``). This is **not**
    PaLM's "z-loss" (the auxiliary ``lambda * log(Z)^2`` term on the softmax normaliser).

    Args:
        logits: (..., D) float32, float16, bfloat16 or float64; the classes are the last dimension.
        target: (...) int64 or int32 class indices in [0, D), or ``ignore_index``.
        a: sharpness, > 0. b: the target z-score offset. eps: added to the variance, >= 0.
        reduction: "mean" (over rows that are not ignored), "sum" or "none" (shape of ``target``).
        ignore_index: rows with this target contribute 0 to the loss and get a zero gradient.

    The row statistics accumulate in float32 (float64 for float64 logits) without cancellation, so huge
    D and a large common offset are fine. The loss is float32 for 16-bit logits; the gradient has the
    logits' dtype.
    """
    fn = "zloss"
    rows2d, target1d, shape, ignore_index = _prepare(fn, logits, target, ignore_index)
    a = V.real_number(fn, "a", a, positive=True)
    b = V.real_number(fn, "b", b)
    eps = V.real_number(fn, "eps", eps, non_negative=True)
    reduction = V.reduction(fn, reduction)
    loss, _ = _zloss_op(rows2d, target1d, a, b, eps, ignore_index)
    return _reduce(fn, loss, target1d, shape, reduction, ignore_index)


def spherical_softmax_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    eps: float = 1e-6,
    reduction: str = "mean",
    ignore_index: int = -100,
) -> torch.Tensor:
    """Negative log of the spherical softmax: ``-log((o_c^2 + eps) / sum_k (o_k^2 + eps))``.

    Vincent et al. (2015) / de Brébisson & Vincent (2016). Arguments as in :func:`zloss`; ``eps`` > 0.
    """
    fn = "spherical_softmax_loss"
    rows2d, target1d, shape, ignore_index = _prepare(fn, logits, target, ignore_index)
    eps = V.real_number(fn, "eps", eps, positive=True)
    reduction = V.reduction(fn, reduction)
    loss, _ = _spherical_softmax_op(rows2d, target1d, eps, ignore_index)
    return _reduce(fn, loss, target1d, shape, reduction, ignore_index)


def taylor_softmax_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    reduction: str = "mean",
    ignore_index: int = -100,
) -> torch.Tensor:
    """Negative log of the second-order Taylor softmax: ``-log(t(o_c) / sum_k t(o_k))``, ``t(o) = 1 + o + o^2/2``.

    de Brébisson & Vincent (2016). Arguments as in :func:`zloss`.
    """
    fn = "taylor_softmax_loss"
    rows2d, target1d, shape, ignore_index = _prepare(fn, logits, target, ignore_index)
    reduction = V.reduction(fn, reduction)
    loss, _ = _taylor_softmax_op(rows2d, target1d, ignore_index)
    return _reduce(fn, loss, target1d, shape, reduction, ignore_index)
