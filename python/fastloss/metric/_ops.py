"""Ops of the metric family (``csrc/metric/``).

``metric_forward``   per-row loss terms (n, 2), counts (n, 2) and statistics (n, 4) of one of the
                     pair losses, and for symmetric InfoNCE the column terms (m) and statistics (m).
                     With ``with_grad`` (single-term losses) also the gradients of sum_i terms[i, 0]
                     from the same pass, used by the backward when its upstream gradient is uniform.
``metric_backward``  dx, dy and d(scale) from the upstream gradients of the row and column terms.

The row and column terms are differentiable (``register_autograd``); the reductions PML applies
(mean, mean of the nonzero terms) are done in torch by ``fastloss.metric`` from terms and counts.
Inputs are computed in float32 on the CPU when they are 16-bit, in float64 when float64. On CUDA,
float32, float16 and bfloat16 inputs are read as they are (16-bit ones by the tensor cores) and every
output is float32; float64 is refused there. The CUDA kernels take a workspace (the chunk of rows of S
they work on), allocated here from the caching allocator.
"""

from __future__ import annotations

import torch

from .. import _C
from .. import _library as L

KINDS = {"info_nce": 0, "nt_xent": 1, "supcon": 2, "multi_similarity": 3, "circle": 4, "contrastive": 5,
         "triplet": 6, "auc": 7, "decoupled_softmax": 8}  # fmt: skip
ROW_TERMS, ROW_STATS = 2, 4
SCHEMA = ("(Tensor x, Tensor y, Tensor? labels_x, Tensor? labels_y, Tensor? targets, Tensor? pos_ptr, "
          "Tensor? pos_idx, Tensor scale, int self_offset, int kind, float p1, float p2, float p3, int option, "
          "bool symmetric, bool with_grad=False)")  # fmt: skip


def _ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None or t.numel() == 0 else t.data_ptr()


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _kernel_inputs(x: torch.Tensor, y: torch.Tensor, device: str):
    """x and y as the kernels read them: the CPU computes in the accumulator type; CUDA reads the
    storage type (its kernels refuse float64 with a clear error)."""
    if device == "cuda":
        return x.contiguous(), y.contiguous()
    acc = _compute_dtype(x)
    return x.to(acc).contiguous(), y.to(acc).contiguous()


def _workspace(problem, device: str, gradient: bool, like: torch.Tensor) -> tuple[int, int, torch.Tensor | None]:
    """(pointer, bytes, tensor keeping it alive) of the CUDA kernels' workspace; none on the CPU."""
    if device != "cuda":
        return 0, 0, None
    nbytes = _C.metric_cuda_workspace_bytes(problem, gradient)
    buffer = torch.empty(nbytes, dtype=torch.uint8, device=like.device)
    return (buffer.data_ptr() if nbytes else 0), nbytes, buffer


def _check_index_values(x, y, targets, pos_ptr, pos_idx) -> None:
    """Index contents on CUDA, read on the host when asked (fastloss.set_target_checks(True)); the CPU
    kernels check them themselves. Otherwise the CUDA forward checks them on the device and reports
    a bad one as a device error (raised by the next call or fastloss.check_device_errors()); the
    kernels make a row with a target outside [0, m) NaN and skip a positive outside it."""
    if not L.is_cuda(x) or not L.may_inspect_values(x):
        return
    m = y.shape[0]
    for name, t in (("targets", targets), ("pos_idx", pos_idx)):
        if t is not None and t.numel() and bool(((t < 0) | (t >= m)).any()):
            raise ValueError(f"fastloss.metric: '{name}' holds an index outside [0, {m})")
    if pos_ptr is not None and pos_ptr.numel() and (bool((pos_ptr.diff() < 0).any()) or int(pos_ptr[0]) != 0
                                                    or int(pos_ptr[-1]) > (0 if pos_idx is None else pos_idx.numel())):
        raise ValueError("fastloss.metric: 'pos_ptr' must start at 0, not decrease and end within pos_idx")


def _describe_bad_index(which: int, position: int, value: int) -> str:
    name = ("targets (the 'labels' of info_nce / auc_loss: each query's positive key)", "pos_idx (the 'positives' "
            "of decoupled_softmax)", "pos_ptr")[which] if 0 <= which < 3 else f"index vector {which}"  # fmt: skip
    rule = "must start at 0, not decrease and end within pos_idx" if which == 2 else "must be in [0, number of keys)"
    return (f"{name} holds {value} at position {position}, but {rule} (a bad target makes its row NaN, a bad "
            "positive is skipped)")


# What the CUDA forward reports for a bad index value (csrc/metric/metric_cuda.cu check_indices_kernel).
_BAD_INDEX_CODE = L.register_device_error("metric", None, _describe_bad_index)


def _problem(x, y, labels_x, labels_y, targets, pos_ptr, pos_idx, scale, self_offset, kind, p1, p2, p3, option,
             symmetric, with_grad=False):  # fmt: skip
    p0 = L.host_scalar_value(scale)  # a CPU scalar by default; a CUDA logit_scale is read (a sync)
    return _C.PairProblem(L.DTYPE_CODES[x.dtype], x.shape[0], y.shape[0], x.shape[1], x.data_ptr(), y.data_ptr(),
                          _ptr(labels_x), _ptr(labels_y), _ptr(targets), _ptr(pos_ptr), _ptr(pos_idx), self_offset,
                          kind, p0, p1, p2, p3, option, symmetric)  # fmt: skip


def _contiguous(*tensors):
    return [None if t is None else t.contiguous() for t in tensors]


def _check_indices(x, y, labels_x, labels_y, targets, pos_ptr, pos_idx) -> None:
    """The op-level contract (fastloss.metric's functions check with their own words first)."""
    n, m = x.shape[0], y.shape[0]
    for name, t, length in (("labels_x", labels_x, n), ("labels_y", labels_y, m), ("targets", targets, n),
                            ("pos_ptr", pos_ptr, n + 1)):  # fmt: skip
        if t is not None and (t.dtype != torch.int64 or t.dim() != 1 or t.shape[0] != length):
            raise ValueError(f"fastloss.metric: '{name}' must be an int64 vector of length {length}, got {t.dtype} "
                             f"{tuple(t.shape)}")  # fmt: skip
    if pos_idx is not None and (pos_idx.dtype != torch.int64 or pos_idx.dim() != 1):
        raise ValueError("fastloss.metric: 'pos_idx' must be an int64 vector")
    if x.dim() != 2 or y.dim() != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"fastloss.metric: x {tuple(x.shape)} and y {tuple(y.shape)} must be (n, d) and (m, d)")


class _Call:
    """One kernel call's view of the op's arguments: x and y as the kernels read them, the contiguous
    index vectors (kept alive here while the kernels hold their pointers), the problem and the
    workspace."""

    def __init__(self, x, y, labels_x, labels_y, targets, pos_ptr, pos_idx, scale, self_offset, kind, p1, p2, p3,
                 option, symmetric, *, device, gradient):  # fmt: skip
        self.x, self.y = _kernel_inputs(x, y, device)
        self.indices = _contiguous(labels_x, labels_y, targets, pos_ptr, pos_idx)
        self.problem = _problem(self.x, self.y, *self.indices, scale, self_offset, kind, p1, p2, p3, option, symmetric)
        self.workspace, self.workspace_bytes, self._buffer = _workspace(self.problem, device, gradient, self.x)


def _forward(x, y, labels_x, labels_y, targets, pos_ptr, pos_idx, scale, self_offset, kind, p1, p2, p3, option,
             symmetric, with_grad=False, *, device):  # fmt: skip
    _check_indices(x, y, labels_x, labels_y, targets, pos_ptr, pos_idx)
    _check_index_values(x, y, targets, pos_ptr, pos_idx)
    acc = _compute_dtype(x)
    call = _Call(x, y, labels_x, labels_y, targets, pos_ptr, pos_idx, scale, self_offset, kind, p1, p2, p3, option,
                 symmetric, device=device, gradient=with_grad)  # fmt: skip
    xc, yc, problem = call.x, call.y, call.problem
    if device == "cuda":  # index values are checked on the device (raises what an earlier call reported)
        problem.set_error_slot(*L.device_error_slot(xc, _BAD_INDEX_CODE), 0 if pos_idx is None else pos_idx.numel())
    n, m = xc.shape[0], yc.shape[0]
    terms = L.empty((n, ROW_TERMS), acc, xc.device)
    counts = L.empty((n, ROW_TERMS), acc, xc.device)
    stats = L.empty((n, ROW_STATS), acc, xc.device)
    col_terms = L.empty((m if symmetric else 0,), acc, xc.device)
    col_stats = L.empty((m if symmetric else 0,), acc, xc.device)
    unit_x = L.empty(xc.shape if with_grad else (0,), acc, xc.device)
    unit_y = L.empty(yc.shape if with_grad else (0,), acc, xc.device)
    unit_scale = L.empty((1,) if with_grad else (0,), acc, xc.device)
    active = L.empty((n if with_grad else 0,), acc, xc.device)
    L.launch("metric_forward", device, terms, problem, _ptr(terms), _ptr(counts), _ptr(stats), _ptr(col_terms),
             _ptr(col_stats), _ptr(unit_x), _ptr(unit_y), _ptr(unit_scale), _ptr(active), call.workspace,
             call.workspace_bytes)  # fmt: skip
    return terms, counts, stats, col_terms, col_stats, unit_x, unit_y, unit_scale, active


def _forward_fake(x, y, labels_x, labels_y, targets, pos_ptr, pos_idx, scale, self_offset, kind, p1, p2, p3, option,
                  symmetric, with_grad=False):  # fmt: skip
    acc = _compute_dtype(x)
    n, m = x.shape[0], y.shape[0]
    return (x.new_empty((n, ROW_TERMS), dtype=acc), x.new_empty((n, ROW_TERMS), dtype=acc),
            x.new_empty((n, ROW_STATS), dtype=acc), x.new_empty((m if symmetric else 0,), dtype=acc),
            x.new_empty((m if symmetric else 0,), dtype=acc), x.new_empty(x.shape if with_grad else (0,), dtype=acc),
            x.new_empty(y.shape if with_grad else (0,), dtype=acc), x.new_empty((1,) if with_grad else (0,), dtype=acc),
            x.new_empty((n if with_grad else 0,), dtype=acc))  # fmt: skip


def _backward(grad_row, grad_col, row_stats, col_stats, x, y, labels_x, labels_y, targets, pos_ptr, pos_idx, scale,
              self_offset, kind, p1, p2, p3, option, symmetric, with_grad=False, *, device):  # fmt: skip
    acc = _compute_dtype(x)
    call = _Call(x, y, labels_x, labels_y, targets, pos_ptr, pos_idx, scale, self_offset, kind, p1, p2, p3, option,
                 symmetric, device=device, gradient=True)  # fmt: skip
    xc, yc, problem = call.x, call.y, call.problem
    grad_x = L.empty(xc.shape, acc, xc.device)
    grad_y = L.empty(yc.shape, acc, xc.device)
    grad_scale = L.empty((), acc, xc.device)
    grad_row = grad_row.to(acc).contiguous()
    grad_col = grad_col.to(acc).contiguous()
    row_stats, col_stats = row_stats.contiguous(), col_stats.contiguous()  # (alive while the kernels read them)
    L.launch("metric_backward", device, grad_x, problem, _ptr(row_stats), _ptr(col_stats),
             _ptr(grad_row), _ptr(grad_col), _ptr(grad_x), _ptr(grad_y), grad_scale.data_ptr(), call.workspace,
             call.workspace_bytes)  # fmt: skip
    # d(scale) on the scale's device and dtype (a CPU scalar with CUDA embeddings), as the fake impl says.
    return grad_x.to(x.dtype), grad_y.to(y.dtype), grad_scale.to(device=scale.device, dtype=scale.dtype)


def _backward_fake(grad_row, grad_col, row_stats, col_stats, x, y, *rest):
    scale = rest[5]
    return torch.empty_like(x), torch.empty_like(y), torch.empty_like(scale)


backward = L.define_op(
    "metric_backward",
    "(Tensor grad_row, Tensor grad_col, Tensor row_stats, Tensor col_stats, " + SCHEMA[1:]
    + " -> (Tensor grad_x, Tensor grad_y, Tensor grad_scale)",
    cpu=lambda *args: _backward(*args, device="cpu"),
    cuda=lambda *args: _backward(*args, device="cuda"),
    fake=_backward_fake,
)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:8], output[2], output[4], *output[5:])
    ctx.options = list(inputs[8:15]) + [False]
    ctx.mark_non_differentiable(*output[1:3], *output[4:])


def _fused_gradient(grad_terms, grad_col_terms, unit_x, unit_y, unit_scale, active):
    """The gradients computed in the forward (unit upstream on every row's first term), scaled,
    when the upstream gradient is that up to one factor c: the same c on every row whose gradient
    row is not zero, nothing on the second terms and the columns. None otherwise (the backward op).

    On the CPU this is checked on the host (free). On CUDA a check would read back (a sync per
    backward), and the functional API asks for the fused gradient (``with_grad``) only under a mean or
    sum of the rows' first terms, whose upstream gradient is uniform: so c is taken from the first active
    row on the device, and a gradient that is not uniform after all (the op called directly with other
    upstream gradients) is reported as a device error instead of being used silently."""
    if unit_x.numel() == 0 and unit_y.numel() == 0 and unit_scale.numel() == 0:
        return None
    if type(grad_terms) is not torch.Tensor:  # traced (fake / functional tensors): no data-dependent check
        return None
    if L.is_cuda(unit_x):
        return _fused_gradient_on_device(grad_terms, grad_col_terms, unit_x, unit_y, unit_scale, active)
    if grad_col_terms is not None and bool((grad_col_terms != 0).any()):
        return None
    if grad_terms is None or bool((grad_terms[:, 1] != 0).any()):
        return None
    values = grad_terms[:, 0][active > 0]
    if values.numel() and not bool((values == values[0]).all()):
        return None
    c = values[0] if values.numel() else grad_terms.new_zeros(())
    return c * unit_x, c * unit_y, c * unit_scale.reshape(())


def _describe_non_uniform(row: int, _b: int, _c: int) -> str:
    return (f"the fused backward of metric_forward(with_grad=True) got an upstream gradient that differs at row "
            f"{row} from the first active row's (or is nonzero on the second terms or the columns); it needs a "
            "mean or sum of the rows' first terms. Call the op with with_grad=False for other uses (the "
            "gradients of this backward are wrong)")  # fmt: skip


_NON_UNIFORM_CODE = L.register_device_error("metric_forward", None, _describe_non_uniform, RuntimeError)


def _fused_gradient_on_device(grad_terms, grad_col_terms, unit_x, unit_y, unit_scale, active):
    if grad_terms is None:
        return None  # no upstream on the rows at all: the backward op (zeros) is exact and reads nothing
    is_active = active > 0
    first = grad_terms[:, 0]
    index = is_active.to(torch.uint8).argmax().reshape(1)  # the first active row (0 when none: unit grads are 0)
    c = first.gather(0, index).reshape(())
    same = (first == c) | (first.isnan() & c.isnan())  # a NaN upstream gives NaN gradients, not an error
    bad_row = is_active & ~same
    bad = bad_row.any() | (grad_terms[:, 1] != 0).any()
    if grad_col_terms is not None:
        bad = bad | (grad_col_terms != 0).any()
    details = torch.stack([bad_row.to(torch.uint8).argmax(), torch.zeros_like(index[0]), torch.zeros_like(index[0])])
    L.report_device_error_if(unit_x, _NON_UNIFORM_CODE, bad, details)
    return c * unit_x, c * unit_y, c * unit_scale.reshape(())


def _autograd_backward(ctx, grad_terms, grad_counts, grad_stats, grad_col_terms, grad_col_stats, *unused):
    (x, y, labels_x, labels_y, targets, pos_ptr, pos_idx, scale, row_stats, col_stats, unit_x, unit_y, unit_scale,
     active) = ctx.saved_tensors  # fmt: skip
    fused = _fused_gradient(grad_terms, grad_col_terms, unit_x, unit_y, unit_scale, active)
    if fused is not None:
        grad_x, grad_y, grad_scale = fused
        return (grad_x.to(x.dtype), grad_y.to(y.dtype), None, None, None, None, None,
                grad_scale.to(device=scale.device, dtype=scale.dtype)) + \
            (None,) * 8
    if grad_terms is None:
        grad_terms = torch.zeros(row_stats.shape[0], ROW_TERMS, dtype=row_stats.dtype, device=row_stats.device)
    if grad_col_terms is None:
        grad_col_terms = torch.zeros(col_stats.shape, dtype=col_stats.dtype, device=col_stats.device)
    grad_x, grad_y, grad_scale = backward(grad_terms, grad_col_terms, row_stats, col_stats, x, y, labels_x, labels_y,
                                          targets, pos_ptr, pos_idx, scale, *ctx.options)  # fmt: skip
    return (grad_x, grad_y, None, None, None, None, None, grad_scale) + (None,) * 8


forward = L.define_op(
    "metric_forward",
    SCHEMA + " -> (Tensor row_terms, Tensor row_counts, Tensor row_stats, Tensor col_terms, Tensor col_stats, "
    "Tensor unit_grad_x, Tensor unit_grad_y, Tensor unit_grad_scale, Tensor row_active)",
    cpu=lambda *args: _forward(*args, device="cpu"),
    cuda=lambda *args: _forward(*args, device="cuda"),
    fake=_forward_fake,
    backward=_autograd_backward,
    setup_context=_setup_context,
)
