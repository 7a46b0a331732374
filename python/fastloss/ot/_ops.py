"""Ops of the optimal-transport family (``csrc/ot/``), one per kernel. None is differentiable by
itself: ``fastloss.ot`` composes them into autograd functions (envelope and implicit gradients).

``ot_solve``       the Sinkhorn loop: final potentials f, g, iterations and marginal error per problem.
``ot_softmin``     one half-step, ``out_i = -eps * LSE_j((h_j - C_ij) / eps + log_w_j)`` (times a damping).
``ot_transport``   per-row mass, cost and (points) envelope gradient of the plan, or per column;
                   with ``src_weight`` w, of the plan times diag(w) (matrix-free products P w).
``ot_plan``        the dense plan ``P_ij = exp((f_i + g_j - C_ij) / eps + log a_i + log b_j)``.
``ot_sparse_dual`` row/column sums of the sparsity-constrained quadratic-OT plan of dual variables.

Contract (checked here): the cost is a contiguous (B, n, m) tensor of any float type, or points are
contiguous (B, n, d), (B, m, d) float32/float64 tensors (``p`` 1 or 2; p = 0 means a cost matrix);
potentials and log-weights are contiguous (B, n) / (B, m) tensors of the accumulator type (float64
for float64 inputs, float32 otherwise), all on one device.
"""

from __future__ import annotations

import torch

from .. import _C
from .. import _library as L

_NONE = torch.empty(0)


def geometry(cost: torch.Tensor | None, x: torch.Tensor | None, y: torch.Tensor | None, p: int):
    """The C++ Geometry of a cost matrix (p = 0) or of point clouds (p = 1, 2)."""
    if p == 0:
        batch, n, m = cost.shape
        return _C.OtGeometry(L.DTYPE_CODES[cost.dtype], batch, n, m, 0, 0, cost.data_ptr(), 0, 0)
    batch, n, dim = x.shape
    return _C.OtGeometry(L.DTYPE_CODES[x.dtype], batch, n, y.shape[1], dim, p, 0, x.data_ptr(), y.data_ptr())


def sizes(cost, x, y, p):
    """(batch, n, m, acc dtype, device) of a geometry."""
    if p == 0:
        return cost.shape[0], cost.shape[1], cost.shape[2], L.accumulator_dtype(cost.dtype), cost.device
    return x.shape[0], x.shape[1], y.shape[1], L.accumulator_dtype(x.dtype), x.device


def _check_geometry(fn: str, cost, x, y, p: int) -> None:
    if p == 0:
        if cost is None or cost.dim() != 3 or not cost.is_contiguous() or cost.dtype not in L.DTYPE_CODES:
            raise ValueError(f"fastloss.{fn}: 'cost' must be a contiguous float (B, n, m) tensor")
        return
    if p not in (1, 2):
        raise ValueError(f"fastloss.{fn}: p must be 0 (cost matrix), 1 or 2, got {p}")
    for name, t in (("x", x), ("y", y)):
        if t is None or t.dim() != 3 or not t.is_contiguous() or t.dtype not in (torch.float32, torch.float64):
            raise ValueError(f"fastloss.{fn}: '{name}' must be a contiguous float32/float64 (B, N, d) tensor")
    if x.dtype != y.dtype or x.shape[0] != y.shape[0] or x.shape[2] != y.shape[2] or x.device != y.device:
        raise ValueError(f"fastloss.{fn}: x {tuple(x.shape)} {x.dtype} and y {tuple(y.shape)} {y.dtype} do not match")


def _check_vectors(fn: str, device, acc, pairs) -> None:
    for name, t, shape in pairs:
        if t.dtype != acc or tuple(t.shape) != tuple(shape) or not t.is_contiguous() or t.device != device:
            raise ValueError(f"fastloss.{fn}: '{name}' must be a contiguous {acc} tensor of shape {tuple(shape)} on "
                             f"{device}, got {t.dtype} {tuple(t.shape)} on {t.device}")  # fmt: skip


def _ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None or t.numel() == 0 else t.data_ptr()


# ---- ot_solve ----------------------------------------------------------------------------------


def _solve(cost, x, y, log_a, log_b, f0, g0, p, eps, eps_start, eps_scaling, rho, tol, max_iter, check_every, device):
    fn = "ot.sinkhorn"
    _check_geometry(fn, cost, x, y, p)
    batch, n, m, acc, dev = sizes(cost, x, y, p)
    _check_vectors(fn, dev, acc, [("log_a", log_a, (batch, n)), ("log_b", log_b, (batch, m)), ("f0", f0, (batch, n)),
                                  ("g0", g0, (batch, m))])  # fmt: skip
    geom = geometry(cost, x, y, p)
    f = f0.clone()
    g = g0.clone()
    n_iter = L.empty((batch,), torch.int32, dev)
    error = L.empty((batch,), acc, dev)
    workspace = torch.empty(_C.ot_solve_workspace_bytes(geom), dtype=torch.uint8, device=dev)
    L.launch("ot_solve", device, f, geom, _ptr(log_a), _ptr(log_b), _ptr(f), _ptr(g), eps, eps_start, eps_scaling, rho,
             tol, max_iter, check_every, _ptr(n_iter), _ptr(error), _ptr(workspace))  # fmt: skip
    return f, g, n_iter, error


def _solve_fake(cost, x, y, log_a, log_b, f0, g0, p, eps, eps_start, eps_scaling, rho, tol, max_iter, check_every):
    batch = log_a.shape[0]
    return (torch.empty_like(f0), torch.empty_like(g0), log_a.new_empty((batch,), dtype=torch.int32),
            log_a.new_empty((batch,)))  # fmt: skip


solve = L.define_op(
    "ot_solve",
    "(Tensor? cost, Tensor? x, Tensor? y, Tensor log_a, Tensor log_b, Tensor f0, Tensor g0, int p, float eps, "
    "float eps_start, float eps_scaling, float rho, float tol, int max_iter, int check_every) "
    "-> (Tensor f, Tensor g, Tensor n_iter, Tensor error)",
    cpu=lambda *args: _solve(*args, device="cpu"),
    cuda=lambda *args: _solve(*args, device="cuda"),
    fake=_solve_fake,
)


# ---- ot_softmin --------------------------------------------------------------------------------


def _softmin(cost, x, y, h, log_w, p, eps, damping, transpose, device):
    fn = "ot.softmin"
    _check_geometry(fn, cost, x, y, p)
    batch, n, m, acc, dev = sizes(cost, x, y, p)
    src, dst = (n, m) if transpose else (m, n)
    _check_vectors(fn, dev, acc, [("h", h, (batch, src)), ("log_w", log_w, (batch, src))])
    out = L.empty((batch, dst), acc, dev)
    L.launch("ot_softmin", device, out, geometry(cost, x, y, p), transpose, eps, damping, _ptr(h), _ptr(log_w),
             _ptr(out), 0, 0, 0)  # fmt: skip
    return out


def _softmin_fake(cost, x, y, h, log_w, p, eps, damping, transpose):
    batch = h.shape[0]
    if p == 0:
        dst = cost.shape[2] if transpose else cost.shape[1]
    else:
        dst = y.shape[1] if transpose else x.shape[1]
    return h.new_empty((batch, dst))


softmin = L.define_op(
    "ot_softmin",
    "(Tensor? cost, Tensor? x, Tensor? y, Tensor h, Tensor log_w, int p, float eps, float damping, bool transpose) "
    "-> Tensor",
    cpu=lambda *args: _softmin(*args, device="cpu"),
    cuda=lambda *args: _softmin(*args, device="cuda"),
    fake=_softmin_fake,
)


# ---- ot_transport ------------------------------------------------------------------------------


def _transport(cost, x, y, f, g, log_a, log_b, p, eps, transpose, with_grad, src_weight=None, *, device):
    fn = "ot.transport"
    _check_geometry(fn, cost, x, y, p)
    batch, n, m, acc, dev = sizes(cost, x, y, p)
    vectors = [("f", f, (batch, n)), ("g", g, (batch, m)), ("log_a", log_a, (batch, n)), ("log_b", log_b, (batch, m))]
    if src_weight is not None:
        vectors.append(("src_weight", src_weight, (batch, n if transpose else m)))
    _check_vectors(fn, dev, acc, vectors)
    if with_grad and p == 0:
        raise ValueError(f"fastloss.{fn}: a point gradient needs points, not a cost matrix")
    length = m if transpose else n
    mass = L.empty((batch, length), acc, dev)
    total = L.empty((batch, length), acc, dev)
    grad = L.empty((batch, length, x.shape[2]), acc, dev) if with_grad else f.new_empty((0,))
    L.launch("ot_transport", device, mass, geometry(cost, x, y, p), transpose, eps, _ptr(f), _ptr(g), _ptr(log_a),
             _ptr(log_b), _ptr(mass), _ptr(total), _ptr(grad), _ptr(src_weight))  # fmt: skip
    return mass, total, grad


def _transport_fake(cost, x, y, f, g, log_a, log_b, p, eps, transpose, with_grad, src_weight=None):
    length = g.shape[1] if transpose else f.shape[1]
    grad = f.new_empty((f.shape[0], length, x.shape[2])) if with_grad else f.new_empty((0,))
    return f.new_empty((f.shape[0], length)), f.new_empty((f.shape[0], length)), grad


transport = L.define_op(
    "ot_transport",
    "(Tensor? cost, Tensor? x, Tensor? y, Tensor f, Tensor g, Tensor log_a, Tensor log_b, int p, float eps, "
    "bool transpose, bool with_grad, Tensor? src_weight=None) -> (Tensor mass, Tensor cost, Tensor grad)",
    cpu=lambda *args: _transport(*args, device="cpu"),
    cuda=lambda *args: _transport(*args, device="cuda"),
    fake=_transport_fake,
)


# ---- ot_plan -----------------------------------------------------------------------------------


def _plan(cost, x, y, f, g, log_a, log_b, p, eps, device):
    fn = "ot.plan"
    _check_geometry(fn, cost, x, y, p)
    batch, n, m, acc, dev = sizes(cost, x, y, p)
    _check_vectors(fn, dev, acc, [("f", f, (batch, n)), ("g", g, (batch, m)), ("log_a", log_a, (batch, n)),
                                  ("log_b", log_b, (batch, m))])  # fmt: skip
    plan = L.empty((batch, n, m), acc, dev)
    L.launch("ot_plan", device, plan, geometry(cost, x, y, p), eps, _ptr(f), _ptr(g), _ptr(log_a), _ptr(log_b),
             _ptr(plan))  # fmt: skip
    return plan


plan = L.define_op(
    "ot_plan",
    "(Tensor? cost, Tensor? x, Tensor? y, Tensor f, Tensor g, Tensor log_a, Tensor log_b, int p, float eps) -> Tensor",
    cpu=lambda *args: _plan(*args, device="cpu"),
    cuda=lambda *args: _plan(*args, device="cuda"),
    fake=lambda cost, x, y, f, g, log_a, log_b, p, eps: f.new_empty((f.shape[0], f.shape[1], g.shape[1])),
)


# ---- ot_sparse_dual ----------------------------------------------------------------------------


def _sparse_dual(cost, alpha, beta, gamma, k, device):
    fn = "ot.sparse_ot"
    _check_geometry(fn, cost, None, None, 0)
    batch, n, m, acc, dev = sizes(cost, None, None, 0)
    _check_vectors(fn, dev, acc, [("alpha", alpha, (batch, n)), ("beta", beta, (batch, m))])
    row_sum = L.empty((batch, n), acc, dev)
    col = [L.empty((batch, m), acc, dev) for _ in range(4)]
    L.launch("ot_sparse_dual", device, row_sum, geometry(cost, None, None, 0), gamma, k, _ptr(alpha), _ptr(beta),
             _ptr(row_sum), *[_ptr(t) for t in col])  # fmt: skip
    return (row_sum, *col)


def _sparse_dual_fake(cost, alpha, beta, gamma, k):
    return (alpha.new_empty(alpha.shape), *[beta.new_empty(beta.shape) for _ in range(4)])


sparse_dual = L.define_op(
    "ot_sparse_dual",
    "(Tensor cost, Tensor alpha, Tensor beta, float gamma, int k) "
    "-> (Tensor row_sum, Tensor col_sum, Tensor col_cost, Tensor col_sq, Tensor threshold)",
    cpu=lambda *args: _sparse_dual(*args, device="cpu"),
    cuda=lambda *args: _sparse_dual(*args, device="cuda"),
    fake=_sparse_dual_fake,
)
