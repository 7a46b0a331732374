"""Ops of the exact factored output layer (``fastloss.nn.SphericalOutputLayer``).

The layer's step (``nn/spherical_output.py``) is GEMMs on the small d x d state, done with torch,
and four kernels of ``csrc/spherical/factored_layer_*``, registered here as ops:

``spherical_factored_head``     target outputs A = V[C] . U h + omega . h, per-sample loss and
                                partials (dL/dA, dL/ds, dL/dq) from the shared loss heads.
``spherical_factored_prepare``  the partials times grad_loss, V^T ydot and the packed ``ytilde``
                                rows (dL/dh = ytilde S), the omega / wbar update coefficients.
``spherical_factored_gram``     M = G^T G (m x m), the gradient Gram matrix of the Q update.
``spherical_factored_scatter_`` V[C] -= lr * ydot R^T in place (repeated classes add).
``spherical_factored_group``    the rows of ydot h grouped by class (for the m x m-free Q update).

Row layouts are documented in ``csrc/spherical/factored_head.h``. The ops take the state-typed
arrays (float32 or float64) and V (float32 or float64) as they are; the layer does the conversions.
"""

from __future__ import annotations

import torch

from . import _C
from . import _library as L

# Loss-kind codes of csrc/spherical/spherical_heads.h.
LOSS_KINDS = {"zloss": 0, "spherical_softmax": 1, "taylor_softmax": 2, "mse": 3}
STATE_DTYPES = (torch.float32, torch.float64)


def packed_width(features: int) -> int:
    """Width of an ``sh`` / ``ytilde`` row and height of the packed state S = [U; omega; wbar; Q]."""
    return 2 * features + 2


def _check(fn: str, h, sh, weight_rows, target, target_weight=None) -> None:
    """The op contract: contiguous 2-D arrays of matching sizes on one device."""
    if h.dtype not in STATE_DTYPES or sh.dtype != h.dtype:
        raise TypeError(f"fastloss.{fn}: 'h' and 'sh' must both be float32 or float64, got {h.dtype} and {sh.dtype}")
    if weight_rows.dtype not in STATE_DTYPES:
        raise TypeError(f"fastloss.{fn}: 'V' must be float32 or float64, got {weight_rows.dtype}")
    if target.dtype != torch.int64:
        raise TypeError(f"fastloss.{fn}: 'target' must be int64, got {target.dtype}")
    if h.dim() != 2 or weight_rows.dim() != 2 or target.dim() != 2:
        raise ValueError(f"fastloss.{fn}: 'h', 'V' and 'target' must be 2-D")
    m, d = h.shape
    if sh.shape != (m, packed_width(d)) or weight_rows.shape[1] != d or target.shape[0] != m:
        raise ValueError(
            f"fastloss.{fn}: sizes do not match: h {tuple(h.shape)}, sh {tuple(sh.shape)}, V {tuple(weight_rows.shape)}, "
            f"target {tuple(target.shape)}"
        )
    tensors = [h, sh, weight_rows, target] + ([target_weight] if target_weight is not None else [])
    if target_weight is not None and (target_weight.shape != target.shape or target_weight.dtype != h.dtype):
        raise ValueError(f"fastloss.{fn}: 'target_weight' must match 'target' in shape and 'h' in dtype")
    if any(not t.is_contiguous() for t in tensors):
        raise ValueError(f"fastloss.{fn}: every tensor argument must be contiguous")
    if len({t.device for t in tensors}) != 1:
        raise ValueError(f"fastloss.{fn}: all tensors must be on one device")


def _check_matrix(fn: str, name: str, t: torch.Tensor, shape: tuple, like: torch.Tensor) -> None:
    """A kernel argument must be contiguous, of ``shape`` and of ``like``'s dtype and device."""
    if tuple(t.shape) != tuple(shape) or t.dtype != like.dtype or t.device != like.device or not t.is_contiguous():
        raise ValueError(f"fastloss.{fn}: '{name}' must be a contiguous {like.dtype} tensor of shape {tuple(shape)} on {like.device}")


def _define(name: str, schema: str, impl_for, fake):
    """``fastloss::spherical_factored_<name>`` with CPU and CUDA kernels from ``impl_for(device)``."""
    return L.define_op(f"spherical_factored_{name}", schema, cpu=impl_for("cpu"), cuda=impl_for("cuda"), fake=fake)


def _problem(h, sh, weight_rows, target, target_weight=None, ignore_index=-100, kind=0, a=1.0, b=0.0, eps=0.0):
    m, d = h.shape
    return _C.FactoredProblem(
        L.DTYPE_CODES[h.dtype], L.DTYPE_CODES[weight_rows.dtype], m, target.shape[1], d, weight_rows.shape[0],
        h.data_ptr(), sh.data_ptr(), weight_rows.data_ptr(), target.data_ptr(),
        target_weight.data_ptr() if target_weight is not None else 0, ignore_index, kind, a, b, eps,
    )  # fmt: skip


def _launch(device: str, name: str, t: torch.Tensor, *args) -> None:
    """Runs ``_C.spherical_factored_<name>_<device>`` with the stream arguments CUDA needs."""
    L.launch(f"spherical_factored_{name}", device, t, *args)


# ---------------------------------------------------------------------------- head
def _head(device):
    def impl(h, sh, weight_rows, target, target_weight, kind, a, b, eps, ignore_index):
        _check("spherical_factored_head", h, sh, weight_rows, target, target_weight)
        m, k = target.shape
        loss = L.empty((m,), h.dtype, h.device)
        partials = L.empty((m, k + 2), h.dtype, h.device)
        problem = _problem(h, sh, weight_rows, target, target_weight, ignore_index, kind, a, b, eps)
        if device == "cuda":  # a bad class index is reported on the device (raises what an earlier call left)
            problem.set_error_slot(*L.device_error_slot(h, BAD_TARGET_CODE))
        _launch(device, "head", h, problem, loss.data_ptr(), partials.data_ptr())
        return loss, partials

    return impl


BAD_TARGET_CODE = L.register_device_error(
    "SphericalOutputLayer", "target",
    lambda position, value, classes: (f"has out-of-range class index {value} at flat position {position}; expected "
                                      f"0 <= target < {classes} or target == ignore_index (the step's update was "
                                      "skipped: the layer's state is unchanged)"),
)  # fmt: skip


def _head_fake(h, sh, weight_rows, target, target_weight, kind, a, b, eps, ignore_index):
    m, k = target.shape
    return h.new_empty((m,)), h.new_empty((m, k + 2))


head = _define(
    "head",
    "(Tensor h, Tensor sh, Tensor V, Tensor target, Tensor? target_weight, int kind, float a, float b, float eps, "
    "int ignore_index) -> (Tensor, Tensor)",
    _head,
    _head_fake,
)


# ---------------------------------------------------------------------------- prepare
def _prepare(device):
    def impl(h, sh, weight_rows, target, partials, grad_loss):
        fn = "spherical_factored_prepare"
        _check(fn, h, sh, weight_rows, target)
        m, k = target.shape
        _check_matrix(fn, "partials", partials, (m, k + 2), h)
        _check_matrix(fn, "grad_loss", grad_loss, (m,), h)
        ytilde = L.empty((m, packed_width(h.shape[1])), h.dtype, h.device)
        scaled = L.empty((m, k + 2), h.dtype, h.device)
        coef = L.empty((m, 2), h.dtype, h.device)
        problem = _problem(h, sh, weight_rows, target)
        _launch(device, "prepare", h, problem, partials.data_ptr(), grad_loss.data_ptr(), grad_loss.stride(0) if m else 0,
                ytilde.data_ptr(), scaled.data_ptr(), coef.data_ptr())  # fmt: skip
        return ytilde, scaled, coef

    return impl


def _prepare_fake(h, sh, weight_rows, target, partials, grad_loss):
    m, k = target.shape
    return h.new_empty((m, packed_width(h.shape[1]))), h.new_empty((m, k + 2)), h.new_empty((m, 2))


prepare = _define(
    "prepare",
    "(Tensor h, Tensor sh, Tensor V, Tensor target, Tensor partials, Tensor grad_loss) -> (Tensor, Tensor, Tensor)",
    _prepare,
    _prepare_fake,
)


# ---------------------------------------------------------------------------- gram
def _gram(device):
    def impl(h, sh, weight_rows, target, scaled, hg, mh):
        fn = "spherical_factored_gram"
        _check(fn, h, sh, weight_rows, target)
        m, k = target.shape
        for name, t in (("scaled", scaled), ("hg", hg), ("mh", mh)):
            _check_matrix(fn, name, t, (m, k + 2) if name == "scaled" else (m, m), h)
        gram = L.empty((m, m), h.dtype, h.device)
        _launch(device, "gram", h, _problem(h, sh, weight_rows, target), scaled.data_ptr(), hg.data_ptr(), mh.data_ptr(),
                gram.data_ptr())  # fmt: skip
        return gram

    return impl


def _gram_fake(h, sh, weight_rows, target, scaled, hg, mh):
    return h.new_empty((target.shape[0], target.shape[0]))


gram = _define(
    "gram",
    "(Tensor h, Tensor sh, Tensor V, Tensor target, Tensor scaled, Tensor hg, Tensor mh) -> Tensor",
    _gram,
    _gram_fake,
)


# ---------------------------------------------------------------------------- scatter
def _scatter(device):
    def impl(weight_rows, h, sh, target, scaled, r, lr, order):
        fn = "spherical_factored_scatter_"
        _check(fn, h, sh, weight_rows, target)
        m, k = target.shape
        _check_matrix(fn, "scaled", scaled, (m, k + 2), h)
        _check_matrix(fn, "r", r, tuple(h.shape), h)
        problem = _problem(h, sh, weight_rows, target)
        if device == "cpu":  # always deterministic: threads split the columns
            _launch(device, "scatter", h, problem, weight_rows.data_ptr(), scaled.data_ptr(), r.data_ptr(), lr)
            return
        if order is not None and (order.shape != (m * k,) or order.dtype != torch.int64 or not order.is_contiguous()):
            raise ValueError(f"fastloss.{fn}: 'order' must be a contiguous int64 tensor of shape ({m * k},)")
        _launch(device, "scatter", h, problem, weight_rows.data_ptr(), scaled.data_ptr(), r.data_ptr(), lr,
                order.data_ptr() if order is not None else 0)  # fmt: skip

    return impl


def _scatter_fake(weight_rows, h, sh, target, scaled, r, lr, order):
    return None


scatter_ = _define(
    "scatter_",
    "(Tensor(a!) V, Tensor h, Tensor sh, Tensor target, Tensor scaled, Tensor r, float lr, Tensor? order) -> ()",
    _scatter,
    _scatter_fake,
)


# ---------------------------------------------------------------------------- group
def _group(device):
    def impl(h, sh, weight_rows, target, scaled, order):
        fn = "spherical_factored_group"
        _check(fn, h, sh, weight_rows, target)
        m, k = target.shape
        _check_matrix(fn, "scaled", scaled, (m, k + 2), h)
        if order.shape != (m * k,) or order.dtype != torch.int64 or not order.is_contiguous() or order.device != h.device:
            raise ValueError(f"fastloss.{fn}: 'order' must be a contiguous int64 tensor of shape ({m * k},) on {h.device}")
        grouped = L.empty((m * k, h.shape[1]), h.dtype, h.device)
        _launch(device, "group", h, _problem(h, sh, weight_rows, target), scaled.data_ptr(), order.data_ptr(),
                grouped.data_ptr())  # fmt: skip
        return grouped

    return impl


def _group_fake(h, sh, weight_rows, target, scaled, order):
    return h.new_empty((target.numel(), h.shape[1]))


group = _define(
    "group",
    "(Tensor h, Tensor sh, Tensor V, Tensor target, Tensor scaled, Tensor order) -> Tensor",
    _group,
    _group_fake,
)
