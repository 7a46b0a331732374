"""Entropic OT with the log-domain Sinkhorn kernels: ``sinkhorn`` (cost matrices) and
``sinkhorn_points`` (costs computed on the fly from point clouds), with envelope gradients by
default and implicit differentiation as an option."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .. import _validate as V
from . import _implicit, _ops
from ._inputs import Problem, cost_problem, initial_potential, points_problem, positive_eps

GRAD_MODES = ("envelope", "implicit")


@dataclass
class SinkhornResult:
    """What a Sinkhorn solve returns (shapes without the batch axis when the input had none).

    cost: the entropic OT value ``OT_eps(a, b) = min_P <P, C> + eps * KL(P | a x b)`` computed
    from the dual, ``<a, f> + <b, g> - eps * (sum(P) - sum(a) sum(b))`` (the last term vanishes at
    convergence; with ``rho`` the unbalanced dual of Sejourne et al.). This is the differentiable
    loss: its gradient is the envelope gradient (dC = P, dx = sum_j P_ij grad_x c(x_i, y_j),
    da = f, db = g at convergence) or, with ``grad="implicit"``, the exact one.
    transport_cost: ``<P, C>``, the linear part alone (no envelope gradient; differentiable with
    ``grad="implicit"``, for points when ``return_plan`` materializes the plan).
    f, g: the dual potentials (detached unless ``grad="implicit"``), defined up to f + c, g - c.
    plan: ``P_ij = a_i b_j exp((f_i + g_j - C_ij) / eps)`` when asked for, else None.
    n_iter: iterations run per problem (int32). marginal_error: ``sum_i |a_i - sum_j P_ij|`` of the
    returned potentials (the columns are exact after the last update); for unbalanced problems the
    same measure of the damped update, which goes to 0 at the fixed point.
    """

    cost: torch.Tensor
    transport_cost: torch.Tensor
    f: torch.Tensor
    g: torch.Tensor
    plan: torch.Tensor | None
    n_iter: torch.Tensor
    marginal_error: torch.Tensor


@dataclass
class SolveOptions:
    eps: float
    max_iter: int
    tol: float
    check_every: int
    eps_start: float
    eps_scaling: float
    rho: float  # 0: balanced


def _options(fn, eps, max_iter, tol, check_every, eps_scaling, eps_start, rho, problem: Problem) -> SolveOptions:
    eps = positive_eps(fn, eps)
    max_iter = V.integer(fn, "max_iter", max_iter)
    check_every = V.integer(fn, "check_every", check_every)
    if not 0 <= max_iter < 2**31:
        raise ValueError(f"fastloss.{fn}: max_iter must be in [0, 2^31), got {max_iter}")
    if check_every < 0:
        raise ValueError(f"fastloss.{fn}: check_every must be >= 0 (0: never check), got {check_every}")
    tol = V.real_number(fn, "tol", tol, non_negative=True)
    rho = 0.0 if rho is None else V.real_number(fn, "rho", rho, positive=True)
    scaling, start = 0.0, eps
    if eps_start is not None:
        if eps_scaling is None:
            raise ValueError(f"fastloss.{fn}: eps_start only applies with eps_scaling (the annealing it starts)")
        eps_start = V.real_number(fn, "eps_start", eps_start, positive=True)
        if not math.isfinite(eps_start):
            raise ValueError(f"fastloss.{fn}: eps_start must be finite, got {eps_start}")
    if eps_scaling is not None:
        scaling = V.real_number(fn, "eps_scaling", eps_scaling, positive=True)
        if not scaling < 1:
            raise ValueError(f"fastloss.{fn}: eps_scaling must be in (0, 1), got {eps_scaling}")
        start = _default_eps_start(problem) if eps_start is None else eps_start
        start = max(start, eps)
    return SolveOptions(eps, max_iter, tol, check_every, start, scaling, rho)


def _default_eps_start(problem: Problem) -> float:
    """The largest cost, as GeomLoss starts from the diameter: one host read."""
    if problem.p == 0:
        finite = problem.cost[torch.isfinite(problem.cost)].to(problem.acc)  # a float16 range can overflow
        return max(float((finite.max() - finite.min()).item()), 1e-12) if finite.numel() else 1.0
    lo = torch.minimum(problem.x.amin((0, 1)), problem.y.amin((0, 1)))
    hi = torch.maximum(problem.x.amax((0, 1)), problem.y.amax((0, 1)))
    diameter = float((hi - lo).norm().item())
    return max(0.5 * diameter**2 if problem.p == 2 else diameter, 1e-12)


def _solve(problem: Problem, opts: SolveOptions, f0, g0):
    return _ops.solve(*problem.geometry, problem.log_a, problem.log_b, f0, g0, problem.p, opts.eps,
                      opts.eps_start, opts.eps_scaling, opts.rho, opts.tol, opts.max_iter, opts.check_every)  # fmt: skip


def _dual_value(problem: Problem, eps: float, rho: float, f, g, plan_mass, a, b):
    """The (un)balanced dual objective at (f, g); differentiable in a and b (and f, g)."""
    if rho > 0:
        fa = rho * (1 - torch.exp(-f / rho))
        gb = rho * (1 - torch.exp(-g / rho))
    else:
        fa, gb = f, g
    # 0 * f where a_i = 0 must not turn into NaN should f_i be infinite there.
    lin = torch.where(a > 0, a * fa, 0).sum(-1) + torch.where(b > 0, b * gb, 0).sum(-1)
    return lin - eps * (plan_mass - a.sum(-1) * b.sum(-1))


class _EnvelopeValue(torch.autograd.Function):
    """OT_eps as a function of the cost (matrix or points) and the histograms, with the envelope
    gradient: the potentials are held fixed, which is exact at convergence and never unrolls."""

    @staticmethod
    def forward(ctx, cost, x, y, a, b, f, g, problem: Problem, eps: float, rho: float, value):
        ctx.problem, ctx.eps, ctx.rho = problem, eps, rho
        # The geometry goes through save_for_backward too: an in-place change of C (or x, y) before the
        # backward then raises instead of silently changing the gradient.
        ctx.save_for_backward(f, g, a, b, cost, x, y)
        return value

    @staticmethod
    def backward(ctx, grad_value):
        problem, eps, rho = ctx.problem, ctx.eps, ctx.rho
        f, g, a, b, cost, x, y = ctx.saved_tensors
        need = ctx.needs_input_grad
        scale = grad_value.to(f.dtype)
        grads = [None] * 11
        args = tuple(None if t is None else t.detach() for t in (cost, x, y))
        if need[0]:
            plan = _ops.plan(*args, f, g, problem.log_a, problem.log_b, problem.p, eps)
            grads[0] = (plan * scale[:, None, None]).to(problem.cost.dtype)
        if need[1]:
            _, _, gx = _ops.transport(*args, f, g, problem.log_a, problem.log_b, problem.p, eps, False, True)
            grads[1] = gx * scale[:, None, None]
        if need[2]:
            _, _, gy = _ops.transport(*args, f, g, problem.log_a, problem.log_b, problem.p, eps, True, True)
            grads[2] = gy * scale[:, None, None]
        # d/da_i of the dual: phi(f_i) - eps (sum_j b_j e^((f_i + g_j - C_ij)/eps) - sum b), where the sum is
        # exp((f_i - softmin_i(g)) / eps); likewise for b.
        for index, (pot, other, log_w_other, w_other, transpose) in (
            (3, (f, g, problem.log_b, b, False)),
            (4, (g, f, problem.log_a, a, True)),
        ):
            if not need[index]:
                continue
            smin = _ops.softmin(*args, other, log_w_other, problem.p, eps, 1.0, transpose)
            ratio = torch.exp((pot - smin) / eps)
            phi = rho * (1 - torch.exp(-pot / rho)) if rho > 0 else pot
            grads[index] = (phi - eps * (ratio - w_other.sum(-1, keepdim=True))) * scale[:, None]
        return tuple(grads)


def _plan_times_cost(plan, cost):
    """<P, C> where an infinite cost (a forbidden pair, P = 0) contributes 0, not 0 * inf."""
    return (plan * torch.where(plan > 0, cost.to(plan.dtype), 0)).sum((-2, -1))


def _finish(problem: Problem, opts: SolveOptions, f, g, n_iter, error, return_plan: bool, grad: str) -> SinkhornResult:
    args = problem.geometry
    with torch.no_grad():
        mass, row_cost, _ = _ops.transport(*args, f, g, problem.log_a, problem.log_b, problem.p, opts.eps, False, False)
    plan_mass = mass.sum(-1)
    plan = None
    if grad == "implicit" and problem.p == 0:
        f, g = _implicit.potentials(problem, opts.eps, f, g)
        plan = _implicit.plan(problem, opts.eps, f, g)
        value = _dual_value(problem, opts.eps, opts.rho, f, g, plan.sum((-2, -1)), problem.a, problem.b)
        transport_cost = _plan_times_cost(plan, problem.cost)
    else:
        with torch.no_grad():
            value = _dual_value(problem, opts.eps, opts.rho, f, g, plan_mass, problem.a.detach(), problem.b.detach())
        value = _EnvelopeValue.apply(problem.cost, problem.x, problem.y, problem.a, problem.b, f, g, problem, opts.eps,
                                     opts.rho, value)  # fmt: skip
        transport_cost = row_cost.sum(-1)
        if grad == "implicit":  # points: the value keeps its (exact at convergence) envelope gradient
            f, g = _implicit.potentials(problem, opts.eps, f, g)
            if return_plan:  # asked for: the n x m plan, differentiable
                plan, cost = _implicit.points_plan(problem, opts.eps, f, g)
                transport_cost = _plan_times_cost(plan, cost)
        elif return_plan:
            plan = _ops.plan(*args, f, g, problem.log_a, problem.log_b, problem.p, opts.eps)
    if not return_plan:
        plan = None
    u = problem.unbatch
    return SinkhornResult(u(value), u(transport_cost), u(f), u(g), None if plan is None else u(plan), u(n_iter),
                          u(error))  # fmt: skip


def _run(fn, problem, eps, max_iter, tol, check_every, f0, g0, return_plan, eps_scaling, eps_start, rho, grad):
    """Checks the solver arguments, solves, and builds the result (shared by both entry points)."""
    opts = _options(fn, eps, max_iter, tol, check_every, eps_scaling, eps_start, rho, problem)
    f_init = initial_potential(fn, "f0", f0, problem.log_a, problem.batched)
    g_init = initial_potential(fn, "g0", g0, problem.log_b, problem.batched)
    if f0 is not None and g0 is None:
        # An iteration starts from g (f <- softmin(g)): a warm f alone is carried into g by one half-step.
        first_eps = opts.eps_start if opts.eps_scaling else opts.eps
        damping = 1.0 if opts.rho == 0 else opts.rho / (opts.rho + first_eps)
        g_init = _ops.softmin(*problem.geometry, f_init, problem.log_a, problem.p, first_eps, damping, True)
    f, g, n_iter, error = _solve(problem, opts, f_init, g_init)
    return _finish(problem, opts, f, g, n_iter, error, return_plan, grad)


def _grad_mode(fn: str, grad: str, rho) -> str:
    if grad not in GRAD_MODES:
        raise ValueError(f"fastloss.{fn}: grad must be one of {GRAD_MODES}, got {grad!r}")
    if grad == "implicit" and rho is not None:
        raise ValueError(f"fastloss.{fn}: grad='implicit' is for balanced OT (its optimality conditions are the "
                         f"marginal constraints); use the envelope gradient with rho")  # fmt: skip
    return grad


def sinkhorn(
    C: torch.Tensor,
    a: torch.Tensor | None = None,
    b: torch.Tensor | None = None,
    *,
    eps: float,
    max_iter: int = 1000,
    tol: float = 1e-6,
    check_every: int = 10,
    f0: torch.Tensor | None = None,
    g0: torch.Tensor | None = None,
    return_plan: bool = False,
    eps_scaling: float | None = None,
    eps_start: float | None = None,
    rho: float | None = None,
    grad: str = "envelope",
) -> SinkhornResult:
    """Entropic optimal transport between histograms a and b for a cost matrix C, by Sinkhorn
    iterations in the log domain (stable at any eps; no exponential of -C/eps is ever formed).

    Args:
        C: (n, m) or a batch (B, n, m) of cost matrices; float32, float64, float16 or bfloat16
            (potentials and log-sum-exps are float32, float64 for float64 costs).
        a, b: histograms (n,), (m,) or batched (B, n), (B, m); uniform when None. Non-negative,
            each summing to 1 unless ``rho`` is given; zero entries are allowed.
        eps: entropic regularization (> 0), in the units of C.
        max_iter: iteration cap (one iteration updates f then g). tol: stop a problem once its L1
            marginal error is <= tol, measured every ``check_every`` iterations on the device
            (0: never measure, always run max_iter; no host read at all). Each problem of a batch
            stops on its own.
        f0, g0: warm-start potentials (e.g. the ``f``, ``g`` of a previous solve).
        eps_scaling: anneal eps from ``eps_start`` (default: the cost range) down to eps, multiplying
            by eps_scaling (in (0, 1)) each iteration, then iterate at eps; the last iteration always
            runs at eps. (GeomLoss's ``scaling`` acts on blur = eps^(1/p): its eps_scaling is scaling^p.)
        rho: KL marginal penalty (unbalanced OT); None = balanced.
        grad: "envelope" (default; gradients of ``cost`` only, potentials held fixed, memory independent
            of the iteration count) or "implicit" (balanced only: gradients through f, g, plan and
            transport_cost by implicit differentiation of the optimality conditions, a conjugate
            gradient in the backward).

    Returns a :class:`SinkhornResult`. On CUDA the loop reads the convergence state back
    asynchronously and waits for the last check once before returning.
    """
    fn = "ot.sinkhorn"
    grad = _grad_mode(fn, grad, rho)
    problem = cost_problem(fn, C, a, b, normalized=rho is None)
    return _run(fn, problem, eps, max_iter, tol, check_every, f0, g0, return_plan, eps_scaling, eps_start, rho, grad)


def sinkhorn_points(
    x: torch.Tensor,
    y: torch.Tensor,
    a: torch.Tensor | None = None,
    b: torch.Tensor | None = None,
    *,
    eps: float,
    p: int = 2,
    max_iter: int = 1000,
    tol: float = 1e-6,
    check_every: int = 10,
    f0: torch.Tensor | None = None,
    g0: torch.Tensor | None = None,
    return_plan: bool = False,
    eps_scaling: float | None = None,
    eps_start: float | None = None,
    rho: float | None = None,
    grad: str = "envelope",
) -> SinkhornResult:
    """Entropic OT between point clouds x (n, d) and y (m, d) (or batches (B, n, d), (B, m, d)),
    the cost ``|x_i - y_j|^2 / 2`` (p=2, GeomLoss's convention) or ``|x_i - y_j|`` (p=1) computed
    on the fly in tiles: memory O((n + m) d), the n x m cost is never stored (unless
    ``return_plan``). Points of any float type are centred and handled in float32 (float64 for
    float64 input); the gradient of ``cost`` wrt x and y is the envelope gradient, one fused
    plan-times-points pass each. ``grad="implicit"`` also makes f and g differentiable in x, y, a, b,
    still without an n x m matrix: the backward's conjugate gradient multiplies by the plan with
    transport passes (``cost`` keeps its envelope gradient, exact at convergence; ``plan`` and
    ``transport_cost`` are differentiable when ``return_plan`` materializes the plan). Other
    arguments as :func:`sinkhorn`.
    """
    fn = "ot.sinkhorn_points"
    grad = _grad_mode(fn, grad, rho)
    problem = points_problem(fn, x, y, a, b, p, normalized=rho is None)
    return _run(fn, problem, eps, max_iter, tol, check_every, f0, g0, return_plan, eps_scaling, eps_start, rho, grad)
