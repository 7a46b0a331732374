"""Checks and preparation of the public arguments of fastloss.ot: batching, histograms as
log-weights, centred points in the accumulator type. Every check runs before any kernel."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .. import _library as L
from .. import _validate as V


@dataclass
class Problem:
    """A batch of OT problems in the op contract (see _ops.py)."""

    cost: torch.Tensor | None  # (B, n, m)
    x: torch.Tensor | None  # (B, n, d), centred, accumulator type
    y: torch.Tensor | None
    p: int
    a: torch.Tensor  # (B, n) histograms (differentiable when the user's are)
    b: torch.Tensor
    log_a: torch.Tensor  # detached, accumulator type, -inf where the mass is 0
    log_b: torch.Tensor
    batched: bool  # whether the user's input had a batch axis

    @property
    def batch(self) -> int:
        return self.a.shape[0]

    @property
    def acc(self) -> torch.dtype:
        return self.log_a.dtype

    @property
    def geometry(self) -> tuple:
        """(cost, x, y) detached, as the kernels take them (the ops have no autograd of their own)."""
        detach = lambda t: None if t is None else t.detach()  # noqa: E731
        return detach(self.cost), detach(self.x), detach(self.y)

    def unbatch(self, t: torch.Tensor) -> torch.Tensor:
        return t if self.batched else t[0]


def positive_eps(fn: str, eps: object) -> float:
    eps = V.real_number(fn, "eps", eps, positive=True)
    if not math.isfinite(eps):
        raise ValueError(f"fastloss.{fn}: eps must be finite, got {eps}")
    return eps


def point_exponent(fn: str, p: object) -> int:
    if isinstance(p, bool) or not isinstance(p, int) or p not in (1, 2):
        raise ValueError(f"fastloss.{fn}: p must be 1 (|x - y|) or 2 (|x - y|^2 / 2), got {p!r}")
    return p


def histogram(fn: str, name: str, w, batch: int, size: int, batched: bool, acc, device, *, normalized: bool):
    """(B, size) weights (uniform when None) and their logs; checks shape, sign and, for balanced
    problems, that each histogram sums to 1 (a host read, skipped where values may not be read)."""
    if w is None:
        w = torch.full((batch, size), 1.0 / size, dtype=acc, device=device)
    else:
        V.tensor(fn, name, w)
        V.dtype_in(fn, name, w, V.FLOAT_DTYPES)
        expected = (batch, size) if batched else (size,)
        if tuple(w.shape) != expected and not (batched and tuple(w.shape) == (size,)):
            raise ValueError(f"fastloss.{fn}: '{name}' must have shape {expected}, got {tuple(w.shape)}")
        if w.device != device:
            raise ValueError(f"fastloss.{fn}: '{name}' is on {w.device}, the cost on {device}")
        w = w.to(acc).expand(batch, size)
        if L.may_inspect_values(w):
            detached = w.detach()
            if not bool(torch.isfinite(detached).all()) or bool((detached < 0).any()):
                raise ValueError(f"fastloss.{fn}: '{name}' must be finite and non-negative")
            totals = detached.sum(-1)
            if bool((totals <= 0).any()):
                raise ValueError(f"fastloss.{fn}: '{name}' has no mass (it sums to 0)")
            if normalized and bool(((totals - 1).abs() > 1e-4).any()):
                raise ValueError(f"fastloss.{fn}: '{name}' must sum to 1 (balanced OT), got sums "
                                 f"{totals.flatten()[:4].tolist()}; normalize it or pass rho for unbalanced OT")  # fmt: skip
        if normalized:
            # Rounding (a bfloat16 histogram sums to 1 +- 1e-4) would put a floor under the marginal error
            # that tol can never pass; renormalizing also keeps the mass direction out of the gradient.
            w = w / w.sum(-1, keepdim=True)
    log_w = w.detach().log().contiguous()  # log 0 = -inf: zero mass
    return w, log_w


def cost_problem(fn: str, cost, a, b, *, normalized: bool) -> Problem:
    V.tensor(fn, "C", cost)
    V.dtype_in(fn, "C", cost, V.FLOAT_DTYPES)
    if cost.dim() not in (2, 3):
        raise ValueError(f"fastloss.{fn}: C must be (n, m) or (B, n, m), got shape {tuple(cost.shape)}")
    batched = cost.dim() == 3
    c3 = cost if batched else cost.unsqueeze(0)
    batch, n, m = c3.shape
    if n == 0 or m == 0:
        raise ValueError(f"fastloss.{fn}: C must have n >= 1 rows and m >= 1 columns, got {tuple(cost.shape)}")
    if L.may_inspect_values(cost):
        bad = torch.isnan(cost) | (cost == float("-inf"))
        if bool(bad.any()):
            raise ValueError(f"fastloss.{fn}: C has NaN or -inf entries (+inf is allowed: a forbidden pair)")
    acc = L.accumulator_dtype(cost.dtype)
    wa, la = histogram(fn, "a", a, batch, n, batched, acc, cost.device, normalized=normalized)
    wb, lb = histogram(fn, "b", b, batch, m, batched, acc, cost.device, normalized=normalized)
    return Problem(c3.contiguous(), None, None, 0, wa, wb, la, lb, batched)


def points_problem(fn: str, x, y, a, b, p, *, normalized: bool) -> Problem:
    V.tensor(fn, "x", x)
    V.tensor(fn, "y", y)
    V.dtype_in(fn, "x", x, V.FLOAT_DTYPES)
    V.dtype_in(fn, "y", y, V.FLOAT_DTYPES)
    p = point_exponent(fn, p)
    if x.dim() not in (2, 3) or y.dim() != x.dim():
        raise ValueError(f"fastloss.{fn}: x and y must both be (N, d) or both (B, N, d), got {tuple(x.shape)} and "
                         f"{tuple(y.shape)}")  # fmt: skip
    batched = x.dim() == 3
    x3, y3 = (x, y) if batched else (x.unsqueeze(0), y.unsqueeze(0))
    if x3.shape[0] != y3.shape[0] or x3.shape[2] != y3.shape[2]:
        raise ValueError(f"fastloss.{fn}: x {tuple(x.shape)} and y {tuple(y.shape)} differ in batch or dimension")
    if x3.shape[1] == 0 or y3.shape[1] == 0 or x3.shape[2] == 0:
        raise ValueError(f"fastloss.{fn}: x and y need at least one point of dimension >= 1")
    V.same_device(fn, x=x, y=y)
    if x.dtype != y.dtype:
        raise ValueError(f"fastloss.{fn}: x is {x.dtype} but y is {y.dtype}")
    for name, t in (("x", x), ("y", y)):
        if L.may_inspect_values(t) and not bool(torch.isfinite(t).all()):
            raise ValueError(f"fastloss.{fn}: '{name}' has NaN or infinite coordinates")
    acc = L.accumulator_dtype(x.dtype)
    batch, n, _ = x3.shape
    m = y3.shape[1]
    wa, la = histogram(fn, "a", a, batch, n, batched, acc, x.device, normalized=normalized)
    wb, lb = histogram(fn, "b", b, batch, m, batched, acc, x.device, normalized=normalized)
    # The kernels expand |x - y|^2 = |x|^2 + |y|^2 - 2 x.y in the accumulator type: centring both
    # clouds on one point (the cost only depends on x - y) keeps the norms, and the cancellation, small.
    xa, ya = x3.to(acc), y3.to(acc)
    centre = (0.5 * (xa.mean(1, keepdim=True) + ya.mean(1, keepdim=True))).detach()
    return Problem(None, (xa - centre).contiguous(), (ya - centre).contiguous(), p, wa, wb, la, lb, batched)


def initial_potential(fn: str, name: str, value, like: torch.Tensor, batched: bool) -> torch.Tensor:
    if value is None:
        return torch.zeros_like(like)
    V.tensor(fn, name, value)
    expected = tuple(like.shape) if batched else tuple(like.shape[1:])
    if tuple(value.shape) != expected:
        raise ValueError(f"fastloss.{fn}: '{name}' must have shape {expected}, got {tuple(value.shape)}")
    return value.detach().to(device=like.device, dtype=like.dtype).reshape(like.shape).contiguous()
