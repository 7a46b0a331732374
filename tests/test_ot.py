"""fastloss.ot: Sinkhorn on cost matrices and point clouds, envelope and implicit gradients, the
Sinkhorn divergence, balanced assignment and sparse OT, against POT and float64 references."""

from __future__ import annotations

import math

import numpy as np
import ot as pot
import pytest
import torch
from conftest import assert_close, cpu_reference, gpu_sized, sized

import fastloss
import fastloss.ot as fot
from fastloss.ot import _ops
from fastloss.reference import ot as ref

F64 = torch.float64


def uniform(n, dtype=F64):
    return torch.full((n,), 1.0 / n, dtype=dtype)


def random_histogram(n, generator, zeros=0):
    w = torch.rand(n, generator=generator, dtype=F64) + 0.1
    if zeros:
        w[torch.randperm(n, generator=generator)[:zeros]] = 0
    return w / w.sum()


def pot_plan(C, a, b, eps):
    return torch.from_numpy(pot.sinkhorn(a.numpy(), b.numpy(), C.numpy(), eps, method="sinkhorn_log",
                                         stopThr=1e-13, numItermax=200000))  # fmt: skip


# ---- sinkhorn on cost matrices --------------------------------------------------------------


@pytest.mark.parametrize("eps", [1.0, 0.1, 0.01])
@pytest.mark.parametrize("shape", [(1, 5), (6, 1), (33, 50)])
def test_sinkhorn_matches_pot_log(device, eps, shape):
    generator = torch.Generator().manual_seed(1)
    n, m = shape
    C = torch.rand(n, m, generator=generator, dtype=F64)
    a, b = random_histogram(n, generator), random_histogram(m, generator)
    result = fot.sinkhorn(C.to(device), a.to(device), b.to(device), eps=eps, tol=1e-11, max_iter=100000,
                          return_plan=True)  # fmt: skip
    expected = pot_plan(C, a, b, eps)
    assert_close(result.plan, expected, 1e-7, "plan")
    assert_close(result.transport_cost, (expected * C).sum(), 1e-7, "<P, C>")
    plan = result.plan.cpu()
    assert_close(plan.sum(1), a, 1e-9, "row marginal")
    assert_close(plan.sum(0), b, 1e-9, "column marginal")
    assert float(result.marginal_error) <= 1e-11
    # The entropic value: <P, C> + eps KL(P | a x b).
    kl = (plan * (plan / (a[:, None] * b[None, :])).log()).nansum()
    assert_close(result.cost, result.transport_cost + eps * kl, 1e-8, "OT_eps")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sinkhorn_small_eps_is_finite_and_approaches_emd(device, dtype):
    generator = torch.Generator().manual_seed(2)
    n, m = 30, 40
    x = torch.rand(n, 2, generator=generator, dtype=F64)
    y = torch.rand(m, 2, generator=generator, dtype=F64)
    C = torch.cdist(x, y)  # unit scale
    exact = pot.emd2(uniform(n).numpy(), uniform(m).numpy(), C.numpy())
    previous_gap = math.inf
    for eps in (1.0, 0.1, 1e-2, 1e-3):
        result = fot.sinkhorn(C.to(device, dtype), eps=eps, tol=1e-5, max_iter=20000, eps_scaling=0.7,
                              return_plan=True)  # fmt: skip
        for name in ("cost", "transport_cost", "f", "g", "plan", "marginal_error"):
            assert torch.isfinite(getattr(result, name)).all(), f"{name} at eps={eps}"
        gap = abs(float(result.transport_cost) - exact)
        # Entropic bias: 0 <= <P_eps, C> - W <= eps log(n m) (plus the tolerance).
        assert gap <= eps * math.log(n * m) + 1e-4, (eps, gap)
        assert gap <= previous_gap + 1e-6
        previous_gap = gap
    assert previous_gap < 2e-3
    # The same on points, where the cost is recomputed in float32 every half-step.
    points = fot.sinkhorn_points(x.to(device, dtype), y.to(device, dtype), eps=1e-3, p=1, tol=1e-5, max_iter=20000,
                                 eps_scaling=0.7, return_plan=True)  # fmt: skip
    for name in ("cost", "transport_cost", "f", "g", "plan", "marginal_error"):
        assert torch.isfinite(getattr(points, name)).all(), f"points {name}"
    assert abs(float(points.transport_cost) - exact) <= 1e-3 * math.log(n * m) + 1e-4


def test_sinkhorn_batched_equals_each_problem_and_stops_on_its_own(device):
    generator = torch.Generator().manual_seed(3)
    B, n, m = 4, 17, 23
    C = torch.rand(B, n, m, generator=generator, dtype=F64) * torch.tensor([0.1, 1.0, 3.0, 10.0], dtype=F64)[:, None, None]
    a = torch.stack([random_histogram(n, generator) for _ in range(B)])
    b = torch.stack([random_histogram(m, generator, zeros=2) for _ in range(B)])
    batched = fot.sinkhorn(C.to(device), a.to(device), b.to(device), eps=0.2, tol=1e-9, return_plan=True)
    assert len(set(batched.n_iter.tolist())) > 1, "problems of different difficulty should stop at different iterations"
    for i in range(B):
        single = fot.sinkhorn(C[i].to(device), a[i].to(device), b[i].to(device), eps=0.2, tol=1e-9, return_plan=True)
        assert int(single.n_iter) == int(batched.n_iter[i])
        assert_close(batched.plan[i], single.plan, 1e-12, f"plan {i}")
        assert_close(batched.cost[i], single.cost, 1e-12, f"cost {i}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_sinkhorn_low_precision_costs(device, dtype):
    generator = torch.Generator().manual_seed(4)
    C = torch.rand(40, 30, generator=generator)
    with cpu_reference():
        expected = fot.sinkhorn(C.to(dtype).double(), eps=0.05, tol=1e-8)
    result = fot.sinkhorn(C.to(device, dtype), eps=0.05, tol=1e-6, return_plan=True)
    assert result.f.dtype == torch.float32 and result.plan.dtype == torch.float32
    assert_close(result.cost, expected.cost, 1e-4, "cost")


def test_check_every_zero_runs_max_iter_and_warm_start_helps(device):
    generator = torch.Generator().manual_seed(5)
    C = torch.rand(20, 25, generator=generator, dtype=F64).to(device)
    fixed = fot.sinkhorn(C, eps=0.05, max_iter=37, check_every=0)
    assert int(fixed.n_iter) == 37
    reference_f, reference_g = ref.sinkhorn_log(C.cpu(), uniform(20), uniform(25), 0.05, 37)
    assert_close(fixed.f, reference_f, 1e-12, "f after 37 iterations")
    assert_close(fixed.g, reference_g, 1e-12, "g after 37 iterations")
    cold = fot.sinkhorn(C, eps=0.05, tol=1e-9)
    warm = fot.sinkhorn(C, eps=0.05, tol=1e-9, f0=cold.f, g0=cold.g)
    assert int(warm.n_iter) < int(cold.n_iter)
    assert_close(warm.cost, cold.cost, 1e-9, "warm-started cost")


def test_eps_scaling_converges_to_the_same_solution_and_ends_at_eps(device):
    generator = torch.Generator().manual_seed(19)
    x = torch.rand(40, 2, generator=generator, dtype=F64).to(device)
    y = torch.rand(30, 2, generator=generator, dtype=F64).to(device)
    plain = fot.sinkhorn_points(x, y, eps=0.002, tol=1e-9, max_iter=100000)
    annealed = fot.sinkhorn_points(x, y, eps=0.002, tol=1e-9, max_iter=100000, eps_scaling=0.8)
    assert int(annealed.n_iter) < int(plain.n_iter)
    assert_close(annealed.cost, plain.cost, 1e-7, "annealed cost")
    # Cut short: the last of the 5 iterations still runs at eps, so the result is finite (not converged).
    short = fot.sinkhorn_points(x, y, eps=0.002, max_iter=5, check_every=0, eps_scaling=0.5, eps_start=10.0)
    assert torch.isfinite(short.cost) and torch.isfinite(short.f).all()


def test_unbalanced_envelope_gradients_match_unrolled_float64(device):
    generator = torch.Generator().manual_seed(22)
    n, m, eps, rho = 8, 11, 0.2, 0.7
    C = torch.rand(n, m, generator=generator, dtype=F64)
    a = torch.rand(n, generator=generator, dtype=F64) + 0.2
    b = 1.5 * torch.rand(m, generator=generator, dtype=F64) + 0.2
    leaves = [t.clone().requires_grad_(True) for t in (C, a, b)]
    f, g = ref.sinkhorn_log(*leaves, eps, 3000, rho=rho)
    ref.dual_value(*leaves, f, g, eps, rho).backward()
    mine = [t.clone().to(device).requires_grad_(True) for t in (C, a, b)]
    fot.sinkhorn(*mine, eps=eps, rho=rho, tol=1e-13, max_iter=100000).cost.backward()
    for name, got, want in zip(("C", "a", "b"), (t.grad for t in mine), (t.grad for t in leaves)):
        assert_close(got, want, 1e-8, f"d{name}")  # unbalanced: no gauge, no centring


def test_unbatched_histograms_with_a_batch_of_costs_and_warm_f_alone(device):
    generator = torch.Generator().manual_seed(23)
    C = torch.rand(3, 7, 9, generator=generator, dtype=F64).to(device)
    a = random_histogram(7, generator).to(device).requires_grad_(True)
    r = fot.sinkhorn(C, a, eps=0.2, tol=1e-12)
    r.cost.sum().backward()
    assert a.grad.shape == (7,)
    expected = sum(fot.sinkhorn(C[i], a.detach(), eps=0.2, tol=1e-12).cost for i in range(3))
    assert_close(r.cost.sum(), expected, 1e-12, "batched C, shared a")
    cold = fot.sinkhorn(C[0], eps=0.05, tol=1e-9)
    warm_f = fot.sinkhorn(C[0], eps=0.05, tol=1e-9, f0=cold.f)
    assert int(warm_f.n_iter) < int(cold.n_iter) // 2, "f0 alone must warm-start too"


def test_infinite_costs_are_forbidden_pairs(device):
    generator = torch.Generator().manual_seed(24)
    C = torch.rand(5, 6, generator=generator, dtype=F64)
    C[0, 1] = C[3, 0] = float("inf")
    for grad in ("envelope", "implicit"):
        Cd = C.clone().to(device).requires_grad_(True)
        r = fot.sinkhorn(Cd, eps=0.1, tol=1e-10, return_plan=True, grad=grad)
        assert float(r.plan[0, 1]) == 0.0 and float(r.plan[3, 0]) == 0.0
        assert torch.isfinite(r.transport_cost) and torch.isfinite(r.cost)
        (r.cost + r.transport_cost).backward()
        assert torch.isfinite(Cd.grad).all(), grad


def test_inplace_change_before_backward_raises():
    C = torch.rand(4, 5, dtype=F64, requires_grad=True)
    work = C * 1.0
    r = fot.sinkhorn(work, eps=0.1)
    with torch.no_grad():
        work.mul_(3)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        r.cost.backward()


def test_unbalanced_matches_pot(device):
    generator = torch.Generator().manual_seed(6)
    n, m = 12, 15
    C = torch.rand(n, m, generator=generator, dtype=F64)
    a = torch.rand(n, generator=generator, dtype=F64) + 0.2
    b = 2 * torch.rand(m, generator=generator, dtype=F64) + 0.2  # masses differ
    eps, rho = 0.1, 0.5
    result = fot.sinkhorn(C.to(device), a.to(device), b.to(device), eps=eps, rho=rho, tol=1e-12, max_iter=100000,
                          return_plan=True)  # fmt: skip
    expected = pot.unbalanced.sinkhorn_unbalanced(a.numpy(), b.numpy(), C.numpy(), eps, rho, reg_type="kl",
                                                  numItermax=100000, stopThr=1e-14)  # fmt: skip
    assert_close(result.plan, torch.from_numpy(expected), 1e-7, "unbalanced plan")
    f, g = ref.sinkhorn_log(C, a, b, eps, 2000, rho=rho)
    assert_close(result.cost, ref.dual_value(C, a, b, f, g, eps, rho), 1e-9, "unbalanced value")


# ---- point clouds ---------------------------------------------------------------------------


@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("dim", [1, 3, 17])
def test_points_equal_the_materialized_cost(device, p, dim):
    generator = torch.Generator().manual_seed(7)
    B, n, m = 2, 70, 45  # not multiples of any tile
    x = torch.randn(B, n, dim, generator=generator, dtype=F64) + 3.0  # off-centre: the kernels centre
    y = torch.randn(B, m, dim, generator=generator, dtype=F64) + 3.5
    C = ref.sq_euclidean_half(x, y) if p == 2 else ref.euclidean(x, y)
    with cpu_reference():
        expected = fot.sinkhorn(C, eps=0.3, tol=1e-10, return_plan=True)
    result = fot.sinkhorn_points(x.to(device), y.to(device), eps=0.3, p=p, tol=1e-10, return_plan=True)
    assert_close(result.cost, expected.cost, 1e-9, "cost")
    assert_close(result.transport_cost, expected.transport_cost, 1e-9, "<P, C>")
    assert_close(result.plan, expected.plan, 1e-8, "plan")
    assert_close(result.f - result.f.mean(-1, keepdim=True), expected.f - expected.f.mean(-1, keepdim=True), 1e-8, "f")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_points_low_precision_inputs(device, dtype):
    generator = torch.Generator().manual_seed(8)
    x = (torch.randn(64, 8, generator=generator) + 20).to(dtype)  # far from the origin
    y = (torch.randn(50, 8, generator=generator) + 20).to(dtype)
    with cpu_reference():
        expected = fot.sinkhorn_points(x.double(), y.double(), eps=0.05, tol=1e-9)
    x_d = x.to(device).requires_grad_(True)
    result = fot.sinkhorn_points(x_d, y.to(device), eps=0.05, tol=1e-6)
    assert result.f.dtype == torch.float32
    assert_close(result.cost, expected.cost, 1e-4, "cost")
    result.cost.backward()
    assert x_d.grad.dtype == dtype and torch.isfinite(x_d.grad.float()).all()


def test_points_edge_cases(device):
    generator = torch.Generator().manual_seed(9)
    one = torch.randn(1, 3, generator=generator, dtype=F64)
    cloud = torch.randn(9, 3, generator=generator, dtype=F64)
    # n = 1: all mass goes from the single point, cost = mean of the costs.
    r = fot.sinkhorn_points(one.to(device), cloud.to(device), eps=0.1, tol=1e-12)
    assert_close(r.transport_cost, ref.sq_euclidean_half(one, cloud).mean(), 1e-10, "n = 1")
    # duplicate points and zero-mass entries
    dup = torch.cat([cloud, cloud[:3]])
    a = torch.cat([torch.full((9,), 1 / 9, dtype=F64), torch.zeros(3, dtype=F64)])
    r1 = fot.sinkhorn_points(dup.to(device), cloud.to(device), a.to(device), eps=0.1, tol=1e-12, return_plan=True)
    r2 = fot.sinkhorn_points(cloud.to(device), cloud.to(device), eps=0.1, tol=1e-12)
    assert_close(r1.cost, r2.cost, 1e-10, "zero-mass duplicates change nothing")
    assert float(r1.plan[9:].abs().max()) == 0.0
    # very different scales: the answer scales with the cost when eps does.
    s = 1e3
    big = fot.sinkhorn_points((cloud * s).to(device), (cloud.flip(0) * s + s).to(device), eps=0.1 * s * s, tol=1e-12)
    small = fot.sinkhorn_points(cloud.to(device), (cloud.flip(0) + 1).to(device), eps=0.1, tol=1e-12)
    assert_close(big.cost / (s * s), small.cost, 1e-9, "scale invariance")


# ---- gradients ------------------------------------------------------------------------------


def _converged_reference_value(C, a, b, eps):
    f, g = ref.sinkhorn_log(C, a, b, eps, 3000)
    return ref.dual_value(C, a, b, f, g, eps)


def test_envelope_gradient_of_cost_matrix_and_histograms(device):
    generator = torch.Generator().manual_seed(10)
    n, m, eps = 11, 14, 0.2
    C = torch.rand(n, m, generator=generator, dtype=F64)
    a, b = random_histogram(n, generator), random_histogram(m, generator)
    leaves = [t.clone().requires_grad_(True) for t in (C, a, b)]
    _converged_reference_value(*leaves, eps).backward()
    mine = [t.clone().to(device).requires_grad_(True) for t in (C, a, b)]
    result = fot.sinkhorn(*mine, eps=eps, tol=1e-13, max_iter=100000)
    result.cost.backward()
    assert_close(mine[0].grad, leaves[0].grad, 1e-9, "dC = plan")
    for name, got, want in (("a", mine[1].grad, leaves[1].grad), ("b", mine[2].grad, leaves[2].grad)):
        assert_close(got - got.mean(), want - want.mean(), 1e-8, f"d{name} (centred)")


@pytest.mark.parametrize("p", [1, 2])
def test_envelope_gradient_of_points(device, p):
    generator = torch.Generator().manual_seed(11)
    x = torch.randn(2, 13, 4, generator=generator, dtype=F64)
    y = torch.randn(2, 19, 4, generator=generator, dtype=F64) + 0.5
    cost = ref.sq_euclidean_half if p == 2 else ref.euclidean
    xr, yr = x.clone().requires_grad_(True), y.clone().requires_grad_(True)
    a, b = uniform(13).expand(2, 13), uniform(19).expand(2, 19)
    _converged_reference_value(cost(xr, yr), a, b, 0.3).sum().backward()
    xm, ym = x.to(device).requires_grad_(True), y.to(device).requires_grad_(True)
    weights = torch.tensor([1.0, -2.0], dtype=F64, device=device)
    (fot.sinkhorn_points(xm, ym, eps=0.3, p=p, tol=1e-13, max_iter=100000).cost * weights).sum().backward()
    assert_close(xm.grad, xr.grad * weights.cpu()[:, None, None], 1e-8, "dx")
    assert_close(ym.grad, yr.grad * weights.cpu()[:, None, None], 1e-8, "dy")


def test_implicit_gradients_through_plan_and_potentials():
    generator = torch.Generator().manual_seed(12)
    n, m, eps = 9, 12, 0.25
    C = torch.rand(n, m, generator=generator, dtype=F64)
    a, b = random_histogram(n, generator), random_histogram(m, generator)
    W = torch.randn(n, m, generator=generator, dtype=F64)

    def losses(plan, transport, f, g):
        fc = f - f.mean()
        return (plan * W).sum() + 3 * transport + (fc * torch.arange(n, dtype=F64)).sum() / 10

    leaves = [t.clone().requires_grad_(True) for t in (C, a, b)]
    f, g = ref.sinkhorn_log(*leaves, eps, 3000)
    P = ref.plan(*leaves, f, g, eps)
    losses(P, (P * leaves[0]).sum(), f, g).backward()
    mine = [t.clone().requires_grad_(True) for t in (C, a, b)]
    result = fot.sinkhorn(*mine, eps=eps, tol=1e-13, max_iter=100000, grad="implicit", return_plan=True)
    losses(result.plan, result.transport_cost, result.f, result.g).backward()
    assert_close(mine[0].grad, leaves[0].grad, 1e-7, "dC")
    for name, got, want in (("a", mine[1].grad, leaves[1].grad), ("b", mine[2].grad, leaves[2].grad)):
        assert_close(got - got.mean(), want - want.mean(), 1e-7, f"d{name} (centred)")


@pytest.mark.parametrize("p", [1, 2])
def test_implicit_gradients_of_points_without_a_matrix(device, p):
    generator = torch.Generator().manual_seed(21)
    n, m, eps = 9, 12, 0.3
    x = torch.randn(n, 3, generator=generator, dtype=F64)
    y = torch.randn(m, 3, generator=generator, dtype=F64) + 0.3
    a, b = random_histogram(n, generator), random_histogram(m, generator)
    weights_f = torch.randn(n, generator=generator, dtype=F64)
    weights_g = torch.randn(m, generator=generator, dtype=F64)
    cost_fn = ref.sq_euclidean_half if p == 2 else ref.euclidean

    def loss(f, g, value):
        return ((f - f.mean()) * weights_f).sum() + ((g - g.mean()) * weights_g).sum() + 2 * value

    leaves = [t.clone().requires_grad_(True) for t in (x, y, a, b)]
    C = cost_fn(leaves[0], leaves[1])
    f, g = ref.sinkhorn_log(C, leaves[2], leaves[3], eps, 3000)
    loss(f, g, ref.dual_value(C, leaves[2], leaves[3], f, g, eps)).backward()
    mine = [t.clone().to(device).requires_grad_(True) for t in (x, y, a, b)]
    r = fot.sinkhorn_points(mine[0], mine[1], mine[2], mine[3], eps=eps, p=p, tol=1e-13, max_iter=100000,
                            grad="implicit")  # fmt: skip
    loss(r.f, r.g, r.cost).backward()
    for name, got, want in zip("xyab", (t.grad for t in mine), (t.grad for t in leaves)):
        if name in "ab":
            got, want = got - got.mean(), want - want.mean()
        assert_close(got, want, 1e-7, f"d{name}")


def test_implicit_gradients_batched_equal_each_problem():
    generator = torch.Generator().manual_seed(20)
    C = torch.rand(3, 6, 8, generator=generator, dtype=F64)
    W = torch.randn(3, 6, 8, generator=generator, dtype=F64)
    batched = C.clone().requires_grad_(True)
    r = fot.sinkhorn(batched, eps=0.3, tol=1e-13, max_iter=100000, grad="implicit", return_plan=True)
    (r.plan * W).sum().backward()
    for i in range(3):
        single = C[i].clone().requires_grad_(True)
        s = fot.sinkhorn(single, eps=0.3, tol=1e-13, max_iter=100000, grad="implicit", return_plan=True)
        (s.plan * W[i]).sum().backward()
        assert_close(batched.grad[i], single.grad, 1e-8, f"dC of problem {i}")


def test_envelope_backward_memory_does_not_depend_on_iterations():
    # What autograd saves for the backward is the same at 5 and at 500 iterations: O(n + m) numbers.
    x = torch.randn(50, 3, dtype=F64, requires_grad=True)
    y = torch.randn(60, 3, dtype=F64)
    saved = {}
    for iterations in (5, 500):
        total = [0]

        def pack(t, total=total):
            total[0] += t.numel()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            r = fot.sinkhorn_points(x, y, eps=0.01, max_iter=iterations, check_every=0)
        assert int(r.n_iter) == iterations
        saved[iterations] = total[0]
    assert 0 < saved[5] == saved[500] <= 10 * (50 + 60) * 3, saved


# ---- divergence, modules ---------------------------------------------------------------------


@pytest.mark.parametrize("reach", [None, 0.7])
def test_sinkhorn_divergence_properties(device, reach):
    generator = torch.Generator().manual_seed(13)
    x = torch.randn(25, 2, generator=generator, dtype=F64).to(device)
    y = (torch.randn(31, 2, generator=generator, dtype=F64) + 1).to(device)
    # The self terms OT(x, x) of the balanced divergence never reach tol = 1e-12 (the CPU stops at
    # max_iter, about 8e-12); their cost has converged long before (the reference runs 4000 iterations).
    # The simulated GPU, at about 2 ms an iteration, stops at 4000 too, where the gradient at x = y is
    # still 5.5e-7 (the CPU's too: 2.5e-7 at 10^4 iterations, 5e-9 at 4 10^4, 2e-12 at 10^5).
    iterations = sized(device, 100000, 4000)
    options = dict(eps=0.1, reach=reach, tol=1e-12, max_iter=iterations)
    s_xy = fot.sinkhorn_divergence(x, y, **options)
    s_yx = fot.sinkhorn_divergence(y, x, **options)
    assert float(s_xy) > 0
    assert_close(s_xy, s_yx, 1e-9, "symmetry")
    xg = x.clone().requires_grad_(True)
    s_xx = fot.sinkhorn_divergence(xg, x, **options)
    assert float(s_xx) == 0.0
    s_xx.backward()
    assert float(xg.grad.abs().max()) < (1e-8 if iterations == 100000 else 1e-6), "the gradient vanishes at x = y"
    # against the formula on materialized costs
    a, b = uniform(25), uniform(31)
    xc, yc = x.cpu(), y.cpu()
    rho = None if reach is None else reach**2

    def value(p, q, wp, wq):
        C = ref.sq_euclidean_half(p, q)
        f, g = ref.sinkhorn_log(C, wp, wq, 0.1, 4000, rho=rho)
        return ref.dual_value(C, wp, wq, f, g, 0.1, rho)

    expected = value(xc, yc, a, b) - 0.5 * value(xc, xc, a, a) - 0.5 * value(yc, yc, b, b)
    assert_close(s_xy, expected, 1e-8, "divergence")


def test_unbalanced_divergence_with_unequal_masses(device):
    generator = torch.Generator().manual_seed(25)
    x = torch.randn(12, 2, generator=generator, dtype=F64)
    y = torch.randn(15, 2, generator=generator, dtype=F64) + 0.5
    a = torch.rand(12, generator=generator, dtype=F64) + 0.1
    b = 2 * torch.rand(15, generator=generator, dtype=F64) + 0.1
    eps, reach = 0.1, 0.8
    rho = reach**2
    s = fot.sinkhorn_divergence(x.to(device), y.to(device), a.to(device), b.to(device), eps=eps, reach=reach,
                                tol=1e-12, max_iter=100000)  # fmt: skip

    def value(p, q, wp, wq):
        C = ref.sq_euclidean_half(p, q)
        f, g = ref.sinkhorn_log(C, wp, wq, eps, 4000, rho=rho)
        return ref.dual_value(C, wp, wq, f, g, eps, rho)

    expected = value(x, y, a, b) - 0.5 * value(x, x, a, a) - 0.5 * value(y, y, b, b)
    expected = expected + 0.5 * eps * (a.sum() - b.sum()) ** 2
    assert_close(s, expected, 1e-8, "unbalanced divergence")
    assert float(s) > 0


def test_modules(device):
    x = torch.randn(3, 20, 2, dtype=F64, device=device, requires_grad=True)
    y = torch.randn(3, 30, 2, dtype=F64, device=device)
    loss = fastloss.nn.SinkhornDivergence(eps=0.1)(x, y)
    loss.backward()
    assert loss.shape == () and x.grad.shape == x.shape
    per = fastloss.nn.SinkhornLoss(eps=0.1, reduction="none")(x, y)
    assert_close(per, fot.sinkhorn_points(x, y, eps=0.1).cost, 1e-12, "SinkhornLoss")


# ---- balanced assignment ----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_balanced_assignment_matches_swav(device, dtype):
    generator = torch.Generator().manual_seed(14)
    z = torch.nn.functional.normalize(torch.randn(96, 16, generator=generator, dtype=F64), dim=1)
    protos = torch.nn.functional.normalize(torch.randn(10, 16, generator=generator, dtype=F64), dim=1)
    scores = (z @ protos.t()).to(dtype)
    q = fot.balanced_assignment(scores.to(device), eps=0.05, n_iter=3)
    expected = ref.swav_sinkhorn_knopp(scores.double(), 0.05, 3)
    assert_close(q, expected, 1e-12 if dtype == F64 else 1e-5, "assignment")
    assert_close(ref.swav_sinkhorn_log(scores.double(), 0.05, 3), expected, 1e-12, "the two references agree")
    assert_close(q.sum(1), torch.ones(96, dtype=F64), 1e-6, "rows sum to 1")


def test_balanced_assignment_survives_unnormalized_scores(device):
    scores = torch.randn(64, 8, dtype=torch.float32) * 30  # exp(scores / 0.05) overflows float32
    with torch.no_grad():
        kernel_domain = ref.swav_sinkhorn_knopp(scores, 0.05, 3)
    assert not torch.isfinite(kernel_domain).all()
    q = fot.balanced_assignment(scores.to(device))
    assert torch.isfinite(q).all()
    assert_close(q, ref.swav_sinkhorn_log(scores.double(), 0.05, 3), 1e-5, "log-domain result")


def _distributed_worker(rank, world, init_file, scores, out):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        local = scores.chunk(world)[rank]
        out[rank] = fot.balanced_assignment(local, eps=0.05, n_iter=3, process_group=dist.group.WORLD)
    finally:
        dist.destroy_process_group()


def test_balanced_assignment_distributed_gloo(tmp_path):
    import torch.multiprocessing as mp

    generator = torch.Generator().manual_seed(15)
    scores = torch.randn(50, 7, generator=generator) * 0.5
    manager = mp.get_context("spawn").Manager()
    out = manager.dict()
    mp.start_processes(_distributed_worker, args=(2, str(tmp_path / "init"), scores, out), nprocs=2, join=True,
                       start_method="spawn")  # fmt: skip
    gathered = torch.cat([out[0], out[1]])
    assert_close(gathered, fot.balanced_assignment(scores), 1e-6, "2 ranks == 1 process on the whole batch")


# ---- sparse OT --------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [None, 5, 2])
def test_sparse_ot_matches_pot_and_respects_k(device, k):
    generator = torch.Generator().manual_seed(16)
    n, m, gamma = 20, 25, 0.1
    C = torch.rand(n, m, generator=generator, dtype=F64)
    result = fot.sparse_ot(C.to(device), gamma=gamma, k=k, tol=1e-9, max_iter=1000 if k == 2 else 3000)
    assert result.n_iter <= (1000 if k == 2 else 3000)
    kwargs = {"reg_type": "l2"} if k is None else {"reg_type": "sparsity_constrained", "max_nz": k}
    expected, log = pot.smooth.smooth_ot_dual(uniform(n).numpy(), uniform(m).numpy(), C.numpy(), gamma, stopThr=1e-14,
                                              numItermax=20000, log=True, **kwargs)  # fmt: skip
    expected = torch.from_numpy(expected)
    plan = result.plan.cpu()
    if k is not None:
        assert int((plan > 0).sum(0).max()) <= k
        assert result.indices.shape == (k, m)
        assert_close(result.values.sum(0), plan.sum(0), 1e-12, "values carry the whole column")
    assert_close(result.cost, (plan * C).sum(), 1e-10, "cost")
    assert_close(result.objective, (plan * C).sum() + 0.5 * gamma * plan.square().sum(), 1e-10, "objective")
    if k != 2:
        # The dual relaxation is tight here: the plan is feasible and unique.
        assert float(result.marginal_error) <= 1e-7
        assert_close(plan, expected, 1e-4, "plan")
        return
    # With k = 2 of 20 rows the relaxation is not tight (POT's own plan misses the marginals by 0.07):
    # compare the dual objective, which both solvers maximize. It is piecewise quadratic (kinks where a
    # column's top k changes), and both L-BFGS runs stop at a kink: within 1e-4 of each other.
    def dual(alpha, beta):
        return float(ref.sparse_dual_value(C, uniform(n), uniform(m), alpha, beta, gamma, k))

    theirs = dual(torch.from_numpy(log["alpha"]), torch.from_numpy(log["beta"]))
    ours = dual(result.alpha.cpu(), result.beta.cpu())
    assert ours >= theirs - 1e-4 * abs(theirs), (ours, theirs)


# ---- bad input, ops ----------------------------------------------------------------------------


def test_bad_input_raises_clear_errors():
    C = torch.rand(4, 5)
    cases = [
        (lambda: fot.sinkhorn(C, eps=0.0), "eps"),
        (lambda: fot.sinkhorn(C, eps=-1.0), "eps"),
        (lambda: fot.sinkhorn(C, torch.tensor([0.5, 0.5, 0.5, -0.5]), eps=0.1), "non-negative"),
        (lambda: fot.sinkhorn(C, torch.full((4,), 0.3), eps=0.1), "sum to 1"),
        (lambda: fot.sinkhorn(C, torch.full((3,), 1 / 3), eps=0.1), "'a' must have shape"),
        (lambda: fot.sinkhorn(C, b=torch.full((4,), 0.25), eps=0.1), "'b' must have shape"),
        (lambda: fot.sinkhorn(torch.rand(5), eps=0.1), "C must be"),
        (lambda: fot.sinkhorn(torch.rand(0, 3), eps=0.1), "n >= 1"),
        (lambda: fot.sinkhorn(C, eps=0.1, max_iter=-1), "max_iter"),
        (lambda: fot.sinkhorn(C, eps=0.1, eps_scaling=1.5), "eps_scaling"),
        (lambda: fot.sinkhorn(C, eps=0.1, grad="unrolled"), "grad"),
        (lambda: fot.sinkhorn(C, eps=0.1, rho=1.0, grad="implicit"), "balanced"),
        (lambda: fot.sinkhorn(C, eps=0.1, f0=torch.zeros(5)), "'f0'"),
        (lambda: fot.sinkhorn_points(torch.rand(4, 3), torch.rand(5, 2), eps=0.1), "dimension"),
        (lambda: fot.sinkhorn_points(torch.rand(4, 3), torch.rand(5, 3), eps=0.1, p=3), "p must be"),
        (lambda: fot.sinkhorn_points(torch.rand(4, 3), torch.rand(5, 3), eps=0.1, p=2.0), "p must be"),
        (lambda: fot.sinkhorn_divergence(torch.rand(4, 3), torch.rand(5, 3), eps=0.1, p=True), "p must be"),
        (lambda: fot.sinkhorn_points(torch.tensor([[float("nan"), 0.0]]), torch.rand(5, 2), eps=0.1), "'x' has NaN"),
        (lambda: fot.sinkhorn(torch.tensor([[0.0, float("nan")]]), eps=0.1), "NaN or -inf"),
        (lambda: fot.sinkhorn(torch.tensor([[0.0, float("-inf")]]), eps=0.1), "NaN or -inf"),
        (lambda: fot.sinkhorn(C, eps=0.1, eps_start=1.0), "eps_start only applies"),
        (lambda: fot.sinkhorn(C, eps=0.1, eps_scaling=0.5, eps_start=-1.0), "eps_start"),
        (lambda: fastloss.nn.SinkhornLoss(eps=0.1, reduction="max"), "reduction"),
        (lambda: fot.sinkhorn_points(torch.rand(4, 3), torch.rand(5, 3).double(), eps=0.1), "float64"),
        (lambda: fot.sparse_ot(C, gamma=0.0), "gamma"),
        (lambda: fot.sparse_ot(C, gamma=1.0, k=0), "k must be"),
        (lambda: fot.balanced_assignment(torch.rand(3)), "scores must be"),
        (lambda: fot.balanced_assignment(torch.rand(3, 2), n_iter=0), "n_iter"),
    ]
    for call, message in cases:
        with pytest.raises((ValueError, TypeError), match=message):
            call()


def _op_samples():
    generator = torch.Generator().manual_seed(17)
    C = torch.rand(2, 5, 7, generator=generator)
    x, y = torch.randn(2, 5, 3, generator=generator), torch.randn(2, 7, 3, generator=generator)
    la, lb = torch.full((2, 5), -math.log(5)), torch.full((2, 7), -math.log(7))
    f, g = torch.zeros(2, 5), torch.zeros(2, 7)
    return [
        (_ops.solve, (C, None, None, la, lb, f, g, 0, 0.1, 0.1, 0.0, 0.0, 1e-6, 50, 10)),
        (_ops.solve, (None, x, y, la, lb, f, g, 2, 0.1, 0.1, 0.0, 0.0, 1e-6, 50, 10)),
        (_ops.softmin, (C, None, None, g, lb, 0, 0.1, 1.0, False)),
        (_ops.softmin, (None, x, y, f, la, 2, 0.1, 1.0, True)),
        (_ops.transport, (None, x, y, f, g, la, lb, 1, 0.1, False, True)),
        (_ops.transport, (None, x, y, f, g, la, lb, 2, 0.1, True, True, torch.randn(2, 5, generator=generator))),
        (_ops.transport, (C, None, None, f, g, la, lb, 0, 0.1, False, False, torch.randn(2, 7, generator=generator))),
        (_ops.transport, (C, None, None, f, g, la, lb, 0, 0.1, True, False, torch.randn(2, 5, generator=generator))),
        (_ops.plan, (C, None, None, f, g, la, lb, 0, 0.1)),
        (_ops.sparse_dual, (C, f, g, 0.5, 2)),
    ]


def test_opcheck():
    for op, args in _op_samples():
        torch.library.opcheck(op.overload, args, test_utils=("test_schema", "test_faketensor"))


# ---- CUDA against CPU --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_ops_match_cpu(dtype, gpu):
    for op, args in _op_samples():
        args = [a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
        cpu = op(*args)
        with gpu.kernels():
            out = op(*[gpu(a) if isinstance(a, torch.Tensor) else a for a in args])
        cpu = cpu if isinstance(cpu, tuple) else (cpu,)
        out = out if isinstance(out, tuple) else (out,)
        for i, (c, g) in enumerate(zip(cpu, out)):
            if c.is_floating_point():
                # ot_solve's 4th output, the marginal error |P 1 - a|, is a difference of O(1) sums
                # (about 1e-7 here): compared in the units of the marginals, not relative to itself.
                atol = (1e-6 if dtype == torch.float32 else 1e-14) if op is _ops.solve and i == 3 else 0.0
                assert_close(g, c, 1e-5 if dtype == torch.float32 else 1e-12, str(op), atol=atol)
            else:
                assert torch.equal(g.cpu(), c)


# Point clouds over several 64-point tiles (float32: 16 x 4 per thread) with remainders, and a
# dimension over several 16-wide shared-memory stages with a short last one (csrc/ot/cuda_kernels.cuh).
# Simulated GPU: 130 and 97 points (3 and 2 tiles, both with a remainder), d = 37 (16 + 16 + 5).
LARGE_TILES = gpu_sized((3, 300, 257, 70), (3, 130, 97, 37))


def test_cuda_large_tiles(gpu):
    batch, n, m, dim = LARGE_TILES
    generator = torch.Generator().manual_seed(18)
    x = torch.randn(batch, n, dim, generator=generator)
    y = torch.randn(batch, m, dim, generator=generator)
    cpu = fot.sinkhorn_points(x, y, eps=5.0, tol=1e-6)
    with gpu.kernels():
        out = fot.sinkhorn_points(gpu(x), gpu(y), eps=5.0, tol=1e-6)
    assert torch.equal(cpu.n_iter, out.n_iter.cpu())
    assert_close(out.cost, cpu.cost, 1e-5, "cost")


@pytest.mark.real_gpu(reason="CUDA graph capture")
def test_cuda_graph_capture():
    generator = torch.Generator().manual_seed(18)
    x = torch.randn(3, 300, 70, generator=generator)
    y = torch.randn(3, 257, 70, generator=generator)
    cpu = fot.sinkhorn_points(x, y, eps=5.0, tol=1e-6)
    xs, ys = x.cuda(), y.cuda()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = fot.sinkhorn_points(xs, ys, eps=5.0, max_iter=40, check_every=10, tol=1e-6)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured.n_iter.cpu(), cpu.n_iter.clamp(max=40))
