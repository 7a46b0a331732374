"""fastloss.ot with non-finite inputs: the rule of csrc/ot/ot_math.h, on every kernel path.

* A pair with a +inf cost, or a zero-mass side, carries no mass whatever the potentials (its term
  e^((f + g - C) / eps) is 0), so +inf costs never create NaN: a feasible problem with +inf costs (a
  masked assignment) matches a plain float64 log-domain Sinkhorn with a masked log-sum-exp, and an
  infeasible one (a row or column with positive mass and only +inf costs) gets +inf potentials there
  and an entropic cost of +inf.
* NaN anywhere in the inputs (a cost, a point coordinate, a weight, a warm start) gives NaN out: no
  block of a reduction may drop it (the column-block path reduces 64-row blocks of 256 columns, the row
  path 256-source chunks: the shapes below are not multiples of either, and the +inf / NaN patterns
  fill whole blocks, the case where a block's maximum is -inf).

Every test takes the ``device`` fixture (conftest.py): the CPU and the GPU target, real or simulated
(the CUDA kernels share the rule through ot_math.h); the references are plain torch on the CPU.
"""

from __future__ import annotations

import math

import pytest
import torch

import fastloss.ot as fot
from fastloss.ot import _ops

F64 = torch.float64
INF = math.inf
NAN = math.nan

# The CPU kernels' block sizes (csrc/ot/cpu_geometry.h kChunk, sinkhorn_cpu.cpp kColRows): the shapes
# below are chosen against them.
CHUNK, COL_ROWS = 256, 64
B, N, M = 3, 150, 300  # 150 = 2 * 64 + 22 rows, 300 = 256 + 44 columns; 150 rows = 37 * 4 + 2 (row tiles)


# ---- float64 references, plain torch ----------------------------------------------------------------


def scaled(h: torch.Tensor, log_w: torch.Tensor, eps: float) -> torch.Tensor:
    """h / eps + log w, -inf where the mass is 0 (whatever h is there)."""
    return torch.where(log_w == -INF, -INF, h / eps + log_w)


def terms(hb_src: torch.Tensor, cost: torch.Tensor, eps: float) -> torch.Tensor:
    """(B, dst, src) exponents hb_j - C_ij / eps, -inf where C = +inf or the source has no mass."""
    skip = (cost == INF) | (hb_src == -INF)[:, None, :]
    return torch.where(skip, -INF, hb_src[:, None, :] - cost / eps)


def ref_softmin(cost, h, log_w, eps, transpose=False):
    """-eps LSE_j(hb_j - C_ij / eps) over the sources (the columns of cost, its rows when transpose)."""
    c = cost.transpose(1, 2) if transpose else cost
    return -eps * torch.logsumexp(terms(scaled(h, log_w, eps), c, eps), dim=2)


def ref_sinkhorn(cost, log_a, log_b, eps, iterations, f=None, g=None):
    """The fastloss iteration (f <- softmin_j(g), then g <- softmin_i(f)) for a fixed count."""
    f = torch.zeros_like(log_a) if f is None else f
    g = torch.zeros_like(log_b) if g is None else g
    for _ in range(iterations):
        f = ref_softmin(cost, g, log_b, eps)
        g = ref_softmin(cost, f, log_a, eps, transpose=True)
    return f, g


def ref_plan(cost, f, g, log_a, log_b, eps):
    fa, gb = scaled(f, log_a, eps), scaled(g, log_b, eps)
    skip = (cost == INF) | (fa == -INF)[:, :, None] | (gb == -INF)[:, None, :]
    return torch.where(skip, 0.0, torch.exp(fa[:, :, None] + gb[:, None, :] - cost / eps))


def ref_marginal_error(cost, f, g, log_a, log_b, eps):
    """sum_i a_i |1 - sum_j P_ij / a_i| of the plan of (f, softmin(g)): a row with no admissible
    source has error a_i."""
    f_new = ref_softmin(cost, g, log_b, eps)
    ratio = torch.where(f_new == INF, 0.0, torch.exp((f - f_new) / eps))
    return torch.where(log_a == -INF, 0.0, log_a.exp() * (1 - ratio).abs()).sum(-1)


def ref_value(cost, f, g, a, b, log_a, log_b, eps):
    """The balanced dual <a, f> + <b, g> - eps (sum P - 1), 0 * f where a = 0."""
    mass = ref_plan(cost, f, g, log_a, log_b, eps).sum((-2, -1))
    lin = torch.where(a > 0, a * f, 0).sum(-1) + torch.where(b > 0, b * g, 0).sum(-1)
    return lin - eps * (mass - a.sum(-1) * b.sum(-1))


def point_cost(x, y, p):
    d2 = ((x[:, :, None, :] - y[:, None, :, :]) ** 2).sum(-1)
    return 0.5 * d2 if p == 2 else d2.sqrt()


def histograms(generator, batch, size, zeros=()):
    w = torch.rand(batch, size, generator=generator, dtype=F64) + 0.1
    for index in zeros:
        w[:, index] = 0
    return w / w.sum(-1, keepdim=True)


def masked_cost(generator, dtype=F64):
    """(B, N, M) costs with about 30% +inf pairs, every row and column keeping a finite one, and +inf
    over whole CPU blocks: row 5 over the first 256-column chunk, column 7 over the first 64-row block
    (and row 149 / column 299 in the last, short ones)."""
    C = torch.rand(B, N, M, generator=generator, dtype=F64)
    C[torch.rand(B, N, M, generator=generator) < 0.3] = INF
    C[:, 5, :CHUNK] = INF
    C[:, :COL_ROWS, 7] = INF
    C[:, 149, :] = INF
    C[:, 2 * COL_ROWS :, 299] = INF
    rows = torch.arange(N)
    C[:, rows, (2 * rows + 260) % M] = 0.5  # row 5: column 270, past the +inf chunk
    C[:, 100, 7] = C[:, 1, 299] = 0.25
    return C.to(dtype)


def assert_same(actual, expected, rtol, what):
    """The same infinities and no NaN (torch.testing: an inf must meet the same inf), the finite parts
    within rtol of the largest finite |expected| (potentials pass through 0)."""
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    finite = expected[torch.isfinite(expected)]
    scale = float(finite.abs().max()) if finite.numel() else 1.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * scale, msg=lambda m: f"{what}: {m}")


def nan_rows(t):
    return torch.isnan(t).any(-1)


# ---- +inf costs: the masked (feasible) problem ---------------------------------------------------------


@pytest.mark.parametrize("transpose", [False, True], ids=["rows", "columns"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_softmin_with_inf_costs_matches_masked_lse(device, transpose, dtype):
    generator = torch.Generator().manual_seed(0)
    C = masked_cost(generator)
    src = N if transpose else M
    h = torch.randn(B, src, generator=generator, dtype=F64)
    w = histograms(generator, B, src, zeros=(3, 140))
    log_w = w.log()
    h[:, 3] = INF  # a +inf potential where the mass is 0: skipped, not inf - inf
    acc = dtype
    out = _ops.softmin(C.to(device, dtype), None, None, h.to(device, acc), log_w.to(device, acc), 0, 0.1, 1.0,
                       transpose)  # fmt: skip
    expected = ref_softmin(C, h, log_w, 0.1, transpose)
    assert torch.isfinite(expected).all()
    assert_same(out, expected, 1e-10 if dtype == F64 else 2e-5, "softmin")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_masked_sinkhorn_matches_reference(device, dtype):
    """Balanced OT with +inf costs, feasible: the fixed-count iteration, the plan, the value and the
    marginal error of a plain float64 Sinkhorn with the same skip rule."""
    generator = torch.Generator().manual_seed(1)
    C = masked_cost(generator)
    a, b = histograms(generator, B, N), histograms(generator, B, M)
    eps, iterations = 0.05, 40
    result = fot.sinkhorn(C.to(device, dtype), a.to(device, dtype), b.to(device, dtype), eps=eps, max_iter=iterations,
                          check_every=0, return_plan=True)  # fmt: skip
    f, g = ref_sinkhorn(C, a.log(), b.log(), eps, iterations)
    plan = ref_plan(C, f, g, a.log(), b.log(), eps)
    rtol = 1e-9 if dtype == F64 else 1e-4
    assert torch.isfinite(f).all() and torch.isfinite(g).all()
    assert_same(result.f, f, rtol, "f")
    assert_same(result.g, g, rtol, "g")
    assert_same(result.plan, plan, rtol, "plan")
    assert bool((result.plan.cpu()[C == INF] == 0).all()), "a +inf cost carries mass"
    assert_same(result.cost, ref_value(C, f, g, a, b, a.log(), b.log(), eps), rtol, "value")
    assert_same(result.transport_cost, (plan * torch.where(C == INF, 0, C)).sum((-2, -1)), rtol, "<P, C>")
    assert_same(result.marginal_error, ref_marginal_error(C, f, g, a.log(), b.log(), eps), max(rtol, 1e-6), "error")


def test_masked_sinkhorn_converges_with_zero_mass_padding(device):
    """Zero-mass rows and columns whose costs are all +inf (padding): their potentials are +inf, the
    problem is feasible and converges to the reference's fixed point."""
    generator = torch.Generator().manual_seed(2)
    C = masked_cost(generator)
    a, b = histograms(generator, B, N, zeros=(10, 149)), histograms(generator, B, M, zeros=(0, 299))
    C[:, 10, :] = INF
    C[:, 149, :] = INF
    C[:, :, 0] = INF
    result = fot.sinkhorn(C.to(device), a.to(device), b.to(device), eps=0.1, tol=1e-10, max_iter=5000)
    assert bool((result.marginal_error <= 1e-10).all())
    f, g = ref_sinkhorn(C, a.log(), b.log(), 0.1, int(result.n_iter.max()))
    assert bool((result.f[:, [10, 149]] == INF).all()) and bool((result.g[:, 0] == INF).all())
    assert_same(result.f, f, 1e-8, "f")
    assert_same(result.g, g, 1e-8, "g")
    assert torch.isfinite(result.cost).all()
    assert_same(result.cost, ref_value(C, result.f.cpu(), result.g.cpu(), a, b, a.log(), b.log(), 0.1), 1e-8, "value")


# ---- +inf costs: infeasible problems -------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
def test_infeasible_rows_and_columns_give_inf_potentials_and_cost(device, dtype):
    """Rows 4 and 140 and column 280 have positive mass and only +inf costs (in problem 1 only). Column
    12 has no mass and finite costs to rows 4 and 140: two +inf terms in its softmin (+inf, so g = -inf
    there, never NaN). The other problems of the batch are untouched."""
    generator = torch.Generator().manual_seed(3)
    C = torch.rand(B, N, M, generator=generator, dtype=F64).to(dtype).double()  # representable in dtype
    a, b = histograms(generator, B, N), histograms(generator, B, M, zeros=(12,))
    C[1, [4, 140], :] = INF
    C[1, [4, 140], 12] = 0.5
    C[1, :, 280] = INF
    eps, iterations = 0.1, 30
    result = fot.sinkhorn(C.to(device, dtype), a.to(device), b.to(device), eps=eps, max_iter=iterations,
                          check_every=0, return_plan=True)  # fmt: skip
    for name in ("cost", "transport_cost", "f", "g", "plan", "marginal_error"):
        assert not torch.isnan(getattr(result, name)).any(), name
    f, g = ref_sinkhorn(C, a.log(), b.log(), eps, iterations)
    assert bool((f[1, [4, 140]] == INF).all()) and float(g[1, 280]) == INF and float(g[1, 12]) == -INF
    rtol = 1e-9 if dtype == F64 else 1e-4
    assert_same(result.f, f, rtol, "f")
    assert_same(result.g, g, rtol, "g")
    assert float(result.cost[1]) == INF
    assert torch.isfinite(result.cost[[0, 2]]).all()
    assert_same(result.cost[[0, 2]], ref_value(C, f, g, a, b, a.log(), b.log(), eps)[[0, 2]], rtol, "value")
    assert_same(result.plan, ref_plan(C, f, g, a.log(), b.log(), eps), rtol, "plan")
    # The infeasible rows receive no mass: their whole weight is marginal error.
    error = ref_marginal_error(C, f, g, a.log(), b.log(), eps)
    assert float(error[1]) >= float(a[1, 4] + a[1, 140])
    assert_same(result.marginal_error, error, max(rtol, 1e-6), "marginal error")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_all_inf_cost_is_infeasible_everywhere(device, dtype):
    C = torch.full((2, 70, 260), INF, dtype=dtype, device=device)
    result = fot.sinkhorn(C, eps=0.1, max_iter=7, tol=1e-6, return_plan=True)
    assert bool((result.f == INF).all()) and bool((result.g == INF).all())
    assert bool((result.cost == INF).all())
    assert bool((result.plan == 0).all()) and bool((result.transport_cost == 0).all())
    assert_same(result.marginal_error, torch.ones(2, dtype=F64), 1e-6, "marginal error")  # all of a is missing
    assert bool((result.n_iter == 7).all())


@pytest.mark.parametrize("transpose", [False, True], ids=["rows", "columns"])
def test_inf_potential_against_inf_cost_is_skipped(device, transpose):
    """softmin and transport with +inf potentials on positive mass: against a +inf cost the pair is
    skipped (not inf - inf), against a finite cost the term is +inf (softmin -inf). Several +inf terms
    share one chunk / block."""
    generator = torch.Generator().manual_seed(4)
    C = torch.rand(B, N, M, generator=generator, dtype=F64)
    src = N if transpose else M
    h = torch.randn(B, src, generator=generator, dtype=F64)
    log_w = histograms(generator, B, src).log()
    inf_src = [0, 1, 2, 70, src - 1]
    h[:, inf_src] = INF
    if transpose:
        C[:, inf_src, :] = INF
        C[0, inf_src, 5] = 0.5  # column 5 of problem 0 sees five +inf terms
    else:
        C[:, :, inf_src] = INF
        C[0, 5, inf_src] = 0.5
    out = _ops.softmin(C.to(device), None, None, h.to(device), log_w.to(device), 0, 0.1, 1.0, transpose)
    expected = ref_softmin(C, h, log_w, 0.1, transpose)
    assert float(expected[0, 5]) == -INF
    assert_same(out, expected, 1e-10, "softmin")


# ---- points: the same rule with potentials (costs are finite) -----------------------------------------


@pytest.mark.parametrize("transpose", [False, True], ids=["rows", "columns"])
@pytest.mark.parametrize("p", [1, 2])
def test_points_softmin_with_infinite_potentials(device, transpose, p):
    """+inf potentials where the mass is 0 (skipped) and on positive mass (a +inf term: softmin -inf)
    in problem 2; a whole 256-source chunk of zero mass in problem 1."""
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(B, N, 5, generator=generator, dtype=F64)
    y = torch.randn(B, M, 5, generator=generator, dtype=F64)
    src = N if transpose else M
    h = torch.randn(B, src, generator=generator, dtype=F64)
    w = histograms(generator, B, src, zeros=(3, 4))
    w[1, : min(src, CHUNK) - 1] = 0
    w = w / w.sum(-1, keepdim=True)
    h[:, [3, 4]] = INF
    h[1, :20] = INF
    h[2, [7, 8]] = INF
    cost = point_cost(x, y, p)
    out = _ops.softmin(None, x.to(device), y.to(device), h.to(device), w.log().to(device), p, 0.2, 1.0, transpose)
    expected = ref_softmin(cost, h, w.log(), 0.2, transpose)
    assert torch.isfinite(expected[:2]).all() and bool((expected[2] == -INF).all())
    assert_same(out, expected, 1e-9, "softmin")


@pytest.mark.parametrize("p", [1, 2])
def test_points_sinkhorn_with_zero_mass_matches_reference(device, p):
    generator = torch.Generator().manual_seed(6)
    x = torch.randn(B, N, 3, generator=generator, dtype=F64)
    y = torch.randn(B, M, 3, generator=generator, dtype=F64) + 0.5
    a, b = histograms(generator, B, N, zeros=(0, 149)), histograms(generator, B, M, zeros=range(CHUNK))
    eps, iterations = 0.1, 25
    centre = 0.5 * (x.mean(1, keepdim=True) + y.mean(1, keepdim=True))
    result = fot.sinkhorn_points(x.to(device), y.to(device), a.to(device), b.to(device), p=p, eps=eps,
                                 max_iter=iterations, check_every=0, return_plan=True)  # fmt: skip
    cost = point_cost(x - centre, y - centre, p)
    f, g = ref_sinkhorn(cost, a.log(), b.log(), eps, iterations)
    assert_same(result.f, f, 1e-8, "f")
    assert_same(result.g, g, 1e-8, "g")
    assert_same(result.plan, ref_plan(cost, f, g, a.log(), b.log(), eps), 1e-8, "plan")
    assert_same(result.cost, ref_value(cost, f, g, a, b, a.log(), b.log(), eps), 1e-8, "value")


# ---- NaN in, NaN out ----------------------------------------------------------------------------------


def dense_case(generator):
    C = torch.rand(B, N, M, generator=generator, dtype=F64)
    a, b = histograms(generator, B, N, zeros=(20,)), histograms(generator, B, M, zeros=(30,))
    return C, a, b


def solve_op(cost, x, y, log_a, log_b, p, eps=0.1, iterations=5, f0=None, g0=None):
    f0 = torch.zeros_like(log_a) if f0 is None else f0
    g0 = torch.zeros_like(log_b) if g0 is None else g0
    return _ops.solve(cost, x, y, log_a, log_b, f0, g0, p, eps, eps, 0.0, 0.0, 1e-6, iterations, 1)


def assert_only_problem_1_nan(outputs, what):
    for name, t in outputs.items():
        t = t.cpu()
        assert torch.isnan(t[1]).all(), f"{what}: {name} of the NaN problem is not all NaN"
        assert not torch.isnan(t[[0, 2]]).any(), f"{what}: NaN leaked into another problem's {name}"


@pytest.mark.parametrize("where", ["finite", "inf_chunk", "zero_mass"])
def test_nan_cost_gives_nan(device, where):
    """A NaN cost entry (problem 1): NaN in its row's and its column's softmin, on the row path and the
    column-block path, also where every other term of its 256-column chunk / 64-row block is skipped
    (+inf costs: the block maximum is -inf) and where the pair has zero mass; then NaN everywhere in a
    solve, in the transport statistics and in the plan's row."""
    generator = torch.Generator().manual_seed(7)
    C, a, b = dense_case(generator)
    i, j = (20, 30) if where == "zero_mass" else (70, 200)
    if where == "inf_chunk":
        C[1, i, :CHUNK] = INF
        C[1, COL_ROWS : 2 * COL_ROWS, j] = INF
    C[1, i, j] = NAN
    Cd, la, lb = C.to(device), a.log().to(device), b.log().to(device)
    h_rows, h_cols = torch.randn(B, M, dtype=F64), torch.randn(B, N, dtype=F64)
    rows = _ops.softmin(Cd, None, None, h_rows.to(device), lb, 0, 0.1, 1.0, False).cpu()
    cols = _ops.softmin(Cd, None, None, h_cols.to(device), la, 0, 0.1, 1.0, True).cpu()
    assert torch.isnan(rows[1, i]) and torch.isnan(cols[1, j])
    rows[1, i] = cols[1, j] = 0
    assert not torch.isnan(rows).any() and not torch.isnan(cols).any(), "NaN beyond the NaN entry's row / column"

    f, g, n_iter, error = solve_op(Cd, None, None, la, lb, 0)
    assert_only_problem_1_nan({"f": f, "g": g, "error": error[:, None]}, "solve")
    assert bool((n_iter[1] == 5).all()), "a NaN problem converged"

    f, g = torch.randn(B, N, dtype=F64).to(device), torch.randn(B, M, dtype=F64).to(device)
    mass, total, _ = _ops.transport(Cd, None, None, f, g, la, lb, 0, 0.1, False, False)
    assert torch.isnan(mass[1, i]) and torch.isnan(total[1, i])
    mass_c, total_c, _ = _ops.transport(Cd, None, None, f, g, la, lb, 0, 0.1, True, False)
    assert torch.isnan(mass_c[1, j]) and torch.isnan(total_c[1, j])
    plan = _ops.plan(Cd, None, None, f, g, la, lb, 0, 0.1).cpu()
    assert torch.isnan(plan[1, i, j]) and int(torch.isnan(plan).sum()) == 1


@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("side", ["x", "y"])
def test_nan_point_coordinate_gives_nan(device, p, side):
    generator = torch.Generator().manual_seed(8)
    x = torch.randn(B, N, 4, generator=generator, dtype=F64)
    y = torch.randn(B, M, 4, generator=generator, dtype=F64)
    a, b = histograms(generator, B, N), histograms(generator, B, M)
    index = 141 if side == "x" else 290
    (x if side == "x" else y)[1, index, 2] = NAN
    xd, yd, la, lb = x.to(device), y.to(device), a.log().to(device), b.log().to(device)
    # The point's own softmin is NaN; on the other side every softmin sees it.
    rows = _ops.softmin(None, xd, yd, torch.zeros_like(lb), lb, p, 0.1, 1.0, False).cpu()
    cols = _ops.softmin(None, xd, yd, torch.zeros_like(la), la, p, 0.1, 1.0, True).cpu()
    own, other = (rows, cols) if side == "x" else (cols, rows)
    assert torch.isnan(own[1, index]) and torch.isnan(other[1]).all()
    own[1, index] = 0
    assert not torch.isnan(own).any() and not torch.isnan(other[[0, 2]]).any()

    f, g, n_iter, error = solve_op(None, xd, yd, la, lb, p)
    assert_only_problem_1_nan({"f": f, "g": g, "error": error[:, None]}, "solve")
    mass, total, grad = _ops.transport(None, xd, yd, f, g, la, lb, p, 0.1, False, True)
    assert_only_problem_1_nan({"mass": mass, "cost": total, "grad": grad}, "transport")
    plan = _ops.plan(None, xd, yd, f, g, la, lb, p, 0.1)
    assert_only_problem_1_nan({"plan": plan}, "plan")


@pytest.mark.parametrize("geometry", ["cost", "points"])
@pytest.mark.parametrize("side", ["a", "b"])
def test_nan_weight_gives_nan(device, geometry, side):
    """A NaN weight (its log-weight NaN), in a chunk / block where every other weight is 0."""
    generator = torch.Generator().manual_seed(9)
    C, a, b = dense_case(generator)
    x = torch.randn(B, N, 3, generator=generator, dtype=F64)
    y = torch.randn(B, M, 3, generator=generator, dtype=F64)
    log_a, log_b = a.log(), b.log()
    if side == "a":
        log_a[1, :COL_ROWS] = -INF
        log_a[1, 33] = NAN
    else:
        log_b[1, :CHUNK] = -INF
        log_b[1, 33] = NAN
    cost, xd, yd, p = (C.to(device), None, None, 0) if geometry == "cost" else (None, x.to(device), y.to(device), 2)
    f, g, _, error = solve_op(cost, xd, yd, log_a.to(device), log_b.to(device), p)
    assert_only_problem_1_nan({"f": f, "g": g, "error": error[:, None]}, "solve")
    # The half-step that reads the NaN weight: every output NaN.
    h = torch.zeros(B, N if side == "a" else M, dtype=F64, device=device)
    log_w = (log_a if side == "a" else log_b).to(device)
    out = _ops.softmin(cost, xd, yd, h, log_w, p, 0.1, 1.0, side == "a")
    assert_only_problem_1_nan({"softmin": out}, "softmin")


@pytest.mark.parametrize("which", ["f0", "g0", "g0_zero_mass"])
def test_nan_warm_start_gives_nan(device, which):
    """Through the public API (warm starts are not checked for values): a NaN in the warm start the
    iteration reads (g0, or f0 given alone) reaches every output, even at a zero-mass entry."""
    generator = torch.Generator().manual_seed(10)
    C, a, b = dense_case(generator)
    f0, g0 = None, torch.zeros(B, M, dtype=F64)
    if which == "f0":
        f0, g0 = torch.zeros(B, N, dtype=F64), None
        f0[1, 7] = NAN
    else:
        g0[1, 30 if which == "g0_zero_mass" else 7] = NAN  # b[:, 30] = 0
    to = lambda t: None if t is None else t.to(device)  # noqa: E731
    result = fot.sinkhorn(C.to(device), a.to(device), b.to(device), eps=0.1, max_iter=50, f0=to(f0), g0=to(g0))
    outputs = {"f": result.f, "g": result.g, "cost": result.cost[:, None], "error": result.marginal_error[:, None]}
    assert_only_problem_1_nan(outputs, which)
    assert int(result.n_iter[1]) == 50


# ---- sparse OT's dual kernel -------------------------------------------------------------------------


@pytest.mark.parametrize("k", [0, 3])
def test_sparse_dual_inf_and_nan_costs(device, k):
    """+inf costs carry nothing (no NaN, also against a +inf dual variable); a NaN cost makes its
    column's sums and threshold NaN, and every row sum (each row meets that column's NaN threshold
    with k, the NaN entry's row without)."""
    generator = torch.Generator().manual_seed(11)
    n, m = 40, 70
    C = torch.rand(2, n, m, generator=generator, dtype=F64)
    alpha = torch.rand(2, n, generator=generator, dtype=F64)
    beta = torch.rand(2, m, generator=generator, dtype=F64)
    C[:, 3, :] = INF
    C[:, :, 5] = INF
    alpha[:, 3] = INF
    C[1, 10, 20] = NAN
    row_sum, col_sum, col_cost, col_sq, threshold = _ops.sparse_dual(C.to(device), alpha.to(device), beta.to(device),
                                                                     0.5, k)  # fmt: skip
    row_sum, col_sum, col_cost, col_sq, threshold = (t.cpu() for t in (row_sum, col_sum, col_cost, col_sq, threshold))
    for t in (row_sum, col_sum, col_cost, col_sq, threshold):
        assert not torch.isnan(t[0]).any()
    # Problem 0 against the plain formula.
    score = torch.where(C[0] == INF, -INF, alpha[0, :, None] - C[0])
    tau = score.topk(k, dim=0).values[-1] if k else torch.full((m,), -INF, dtype=F64)
    plan = torch.where(score >= tau, torch.relu(score + beta[0]) / 0.5, 0)
    plan = torch.nan_to_num(plan, nan=0.0)  # -inf + beta: no mass
    assert_same(row_sum[0], plan.sum(1), 1e-12, "row sums")
    assert_same(col_sum[0], plan.sum(0), 1e-12, "column sums")
    assert_same(col_cost[0], (plan * torch.where(plan > 0, C[0], 0)).sum(0), 1e-12, "column costs")
    assert_same(threshold[0], tau, 1e-12, "thresholds")
    assert torch.isnan(col_sum[1, 20]) and torch.isnan(col_cost[1, 20]) and torch.isnan(col_sq[1, 20])
    col_sum[1, 20] = 0
    assert not torch.isnan(col_sum[1]).any()
    if k:
        assert torch.isnan(threshold[1, 20]) and torch.isnan(row_sum[1]).all()
    else:
        assert torch.isnan(row_sum[1, 10]) and int(torch.isnan(row_sum[1]).sum()) == 1
