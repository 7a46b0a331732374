"""The metric family (fastloss.metric) against pytorch-metric-learning (loss and gradient with
respect to the embeddings), against F.cross_entropy on the materialized logits, and against the
float64 references of fastloss.reference.metric; edge cases, memory and the distributed mode."""

import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

import fastloss
from fastloss import metric as M
from fastloss.metric import _ops
from fastloss.reference import metric as R

from conftest import assert_close, gpu_sized, is_gpu

pml = pytest.importorskip("pytorch_metric_learning")
from pytorch_metric_learning import distances, losses, miners  # noqa: E402

TOL = {torch.float64: 1e-10, torch.float32: 2e-5}


def pml_cases():
    """(name, fastloss call, PML call): each takes (e, y, ref_e, ref_y) and returns the loss."""
    def ref(kw, r, ry):
        return {} if r is None else {"ref_emb": r, "ref_labels": ry}

    return [
        ("nt_xent", lambda e, y, r, ry: M.nt_xent(e, y, temperature=0.1, **ref(0, r, ry)),
         lambda e, y, r, ry: losses.NTXentLoss(0.1)(e, y, **ref(0, r, ry))),
        ("supcon", lambda e, y, r, ry: M.supcon(e, y, temperature=0.2, **ref(0, r, ry)),
         lambda e, y, r, ry: losses.SupConLoss(0.2)(e, y, **ref(0, r, ry))),
        ("ms_mined", lambda e, y, r, ry: M.multi_similarity(e, y, mining=True, **ref(0, r, ry)),
         lambda e, y, r, ry: losses.MultiSimilarityLoss()(
             e, y, miners.MultiSimilarityMiner(0.1)(e, y, r, ry), **ref(0, r, ry))),
        ("ms_all", lambda e, y, r, ry: M.multi_similarity(e, y, alpha=0.1, beta=40, mining=False, **ref(0, r, ry)),
         lambda e, y, r, ry: losses.MultiSimilarityLoss(alpha=0.1, beta=40)(e, y, **ref(0, r, ry))),
        ("circle", lambda e, y, r, ry: M.circle(e, y, m=0.25, gamma=256, **ref(0, r, ry)),
         lambda e, y, r, ry: losses.CircleLoss(m=0.25, gamma=256)(e, y, **ref(0, r, ry))),
        ("contrastive", lambda e, y, r, ry: M.contrastive(e, y, **ref(0, r, ry)),
         lambda e, y, r, ry: losses.ContrastiveLoss()(e, y, **ref(0, r, ry))),
        ("contrastive_cos", lambda e, y, r, ry: M.contrastive(e, y, pos_margin=0.8, neg_margin=0.1, distance="cosine",
                                                              **ref(0, r, ry)),
         lambda e, y, r, ry: losses.ContrastiveLoss(0.8, 0.1, distance=distances.CosineSimilarity())(
             e, y, **ref(0, r, ry))),
        ("triplet_all", lambda e, y, r, ry: M.triplet(e, y, margin=0.2, **ref(0, r, ry)),
         lambda e, y, r, ry: losses.TripletMarginLoss(margin=0.2)(e, y, **ref(0, r, ry))),
        ("triplet_hard", lambda e, y, r, ry: M.triplet(e, y, mining="batch_hard", **ref(0, r, ry)),
         lambda e, y, r, ry: losses.TripletMarginLoss()(e, y, miners.BatchHardMiner()(e, y, r, ry), **ref(0, r, ry))),
        ("triplet_semi", lambda e, y, r, ry: M.triplet(e, y, margin=0.3, mining="semi_hard", **ref(0, r, ry)),
         lambda e, y, r, ry: losses.TripletMarginLoss(margin=0.3)(
             e, y, miners.TripletMarginMiner(margin=0.3, type_of_triplets="semihard")(e, y, r, ry), **ref(0, r, ry))),
    ]  # fmt: skip


CASES = pml_cases()
SHAPES = [(64, 16, 5, torch.float64), (97, 33, 10, torch.float32), (128, 64, 3, torch.float32), (2, 8, 2, torch.float64)]


def compare_with_pml(name, ours_fn, theirs_fn, e, y, r=None, ry=None, tol=None):
    leaves = [e.clone().requires_grad_()] + ([r.clone().requires_grad_()] if r is not None else [])
    ours = ours_fn(leaves[0], y, leaves[1] if r is not None else None, ry)
    ours_grads = torch.autograd.grad(ours, leaves, allow_unused=True) if ours.requires_grad else [None] * len(leaves)
    leaves2 = [t.detach().clone().requires_grad_() for t in leaves]
    theirs = theirs_fn(leaves2[0], y, leaves2[1] if r is not None else None, ry)
    theirs_grads = torch.autograd.grad(theirs, leaves2, allow_unused=True) if theirs.requires_grad else [None] * len(leaves)
    tol = tol or TOL[e.dtype]
    assert_close(ours, theirs, tol, f"{name} loss", atol=tol * 1e-3)
    for got, want in zip(ours_grads, theirs_grads):
        got = torch.zeros_like(e) if got is None else got
        want = torch.zeros_like(got) if want is None else want
        assert_close(got, want, tol, f"{name} gradient", atol=tol * 1e-4)


@pytest.fixture(params=["fused", "two_pass"])
def gradient_path(request, monkeypatch):
    """Both backward paths: the gradient computed in the forward (default) and the recomputing backward."""
    if request.param == "two_pass":
        from fastloss.metric import _losses

        monkeypatch.setattr(_losses, "_wants_grad", lambda *tensors: False)
    return request.param


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"B{s[0]}d{s[1]}c{s[2]}{str(s[3])[-7:]}")
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_matches_pytorch_metric_learning(case, shape, gradient_path):
    name, ours, theirs = case
    b, d, classes, dtype = shape
    g = torch.Generator().manual_seed(b + d)
    e = torch.randn(b, d, generator=g, dtype=dtype)
    y = torch.randint(0, classes, (b,), generator=g)
    # Semi-hard mining tests 0 < d_an - d_ap <= margin: in float32 a triplet within rounding of the
    # edge can fall on either side (our distances and torch.cdist's differ in the last bits).
    tol = 1e-3 if name == "triplet_semi" and dtype == torch.float32 else None
    compare_with_pml(name, ours, theirs, e, y, tol=tol)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_ref_emb_matches_pytorch_metric_learning(case, gradient_path):
    name, ours, theirs = case
    g = torch.Generator().manual_seed(7)
    e, r = torch.randn(40, 24, generator=g, dtype=torch.float64), torch.randn(70, 24, generator=g, dtype=torch.float64)
    y, ry = torch.randint(0, 6, (40,), generator=g), torch.randint(0, 6, (70,), generator=g)
    compare_with_pml(name, ours, theirs, e, y, r, ry)
    # Two views with the labels themselves as ref_labels: PML leaves out the pairs (i, i). (PML's own
    # MS miner keeps (i, i) there and its loss then asserts, so that case has no reference.)
    if name != "ms_mined":
        compare_with_pml(name, ours, theirs, e, y, r[:40], y)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_empty_batches_give_a_zero_loss_and_zero_gradients(case):
    name, ours, _ = case
    e = torch.randn(0, 8, dtype=torch.float64, requires_grad=True)
    r = torch.randn(6, 8, dtype=torch.float64, requires_grad=True)
    loss = ours(e, torch.zeros(0, dtype=torch.int64), r, torch.arange(6))
    loss.backward()
    assert float(loss.detach()) == 0 and (r.grad is None or bool((r.grad == 0).all()))
    e = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    loss = ours(e, torch.arange(4), torch.randn(0, 8, dtype=torch.float64), torch.zeros(0, dtype=torch.int64))
    loss.backward()
    assert float(loss.detach()) == 0 and bool((e.grad == 0).all())
    q = torch.randn(0, 8, dtype=torch.float64, requires_grad=True)
    k = torch.randn(5, 8, dtype=torch.float64, requires_grad=True)
    M.info_nce(q, k, reduction="sum").backward()
    assert bool((k.grad == 0).all())


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_edge_cases_match_pytorch_metric_learning(case):
    """Anchors without positives or negatives, a single class, duplicate embeddings, B = 1."""
    name, ours, theirs = case
    g = torch.Generator().manual_seed(8)
    e = torch.randn(12, 8, generator=g, dtype=torch.float64)
    for labels in ([0] * 12, [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [0, 0, 0, 1, 2, 2, 3, 4, 4, 4, 4, 5]):
        compare_with_pml(name, ours, theirs, e, torch.tensor(labels))
    dup = e.clone()
    dup[5] = dup[2]
    compare_with_pml(name, ours, theirs, dup, torch.tensor([0, 0, 1, 1, 2, 2, 0, 1, 2, 0, 1, 2]))
    compare_with_pml(name, ours, theirs, e[:1], torch.tensor([3]))


def test_float16_inputs_match_pml_on_the_same_rounded_values():
    g = torch.Generator().manual_seed(9)
    e16 = torch.randn(80, 32, generator=g).half()
    y = torch.randint(0, 6, (80,), generator=g)
    for name, ours, theirs in CASES:
        leaf = e16.clone().requires_grad_()
        loss = ours(leaf, y, None, None)
        assert loss.dtype == torch.float16
        (grad,) = torch.autograd.grad(loss, leaf)
        assert grad.dtype == torch.float16
        e32 = e16.float().requires_grad_()
        expected = theirs(e32, y, None, None)
        (expected_grad,) = torch.autograd.grad(expected, e32)
        assert_close(loss.float(), expected, 1e-2, f"{name} float16")
        assert_close(grad.float(), expected_grad, 1e-2, f"{name} float16 gradient", atol=1e-5)


def test_multi_similarity_mining_pairs_equal_the_miner():
    g = torch.Generator().manual_seed(10)
    e = torch.randn(64, 32, generator=g)
    y = torch.randint(0, 10, (64,), generator=g)
    x = F.normalize(e, dim=1)
    scale = torch.tensor(2.0, dtype=torch.float64)
    _, counts, stats, *_ = _ops.forward(x, x, y, y, None, None, None, scale, 0, _ops.KINDS["multi_similarity"], 50.0,
                                        0.5, 0.1, 1, False)  # fmt: skip
    s = x @ x.T
    same = (y[:, None] == y[None, :]) & ~torch.eye(64, dtype=torch.bool)
    diff = y[:, None] != y[None, :]
    ours_pos = same & (s - 0.1 < stats[:, 3:4].float())
    ours_neg = diff & (s + 0.1 > stats[:, 2:3].float())
    a1, p, a2, n = miners.MultiSimilarityMiner(0.1)(e, y)
    theirs_pos = torch.zeros(64, 64, dtype=torch.bool)
    theirs_pos[a1, p] = True
    theirs_neg = torch.zeros(64, 64, dtype=torch.bool)
    theirs_neg[a2, n] = True
    assert torch.equal(ours_pos, theirs_pos) and torch.equal(ours_neg, theirs_neg)
    assert torch.equal(counts[:, 0], ours_pos.sum(1).double()) and torch.equal(counts[:, 1], ours_neg.sum(1).double())
    # And the kernel's thresholds are the per-row minimum positive and maximum negative similarity.
    assert_close(stats[:, 2], s.masked_fill(~same, 9).amin(1), 1e-6, "min positive")


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_info_nce_equals_cross_entropy_on_the_materialized_logits(symmetric, dtype):
    g = torch.Generator().manual_seed(11)
    for n, m in ((1, 1), (2, 2), (70, 70), (33, 33)) if symmetric else ((1, 1), (2, 5), (70, 70), (33, 90)):
        q = torch.randn(n, 20, generator=g, dtype=dtype, requires_grad=True)
        k = torch.randn(m, 20, generator=g, dtype=dtype, requires_grad=True)
        scale = torch.tensor(25.0, dtype=dtype, requires_grad=True)
        ours = M.info_nce(q, k, symmetric=symmetric, logit_scale=scale)
        logits = scale * F.normalize(q, dim=1) @ F.normalize(k, dim=1).T
        target = torch.arange(n)
        theirs = F.cross_entropy(logits, target)
        if symmetric:
            theirs = 0.5 * (theirs + F.cross_entropy(logits.T, target))
        tol = TOL[dtype]
        assert_close(ours, theirs, tol, "info_nce", atol=1e-6 if dtype == torch.float32 else 1e-14)  # n = 1: 0
        for got, want in zip(torch.autograd.grad(ours, (q, k, scale)), torch.autograd.grad(theirs, (q, k, scale))):
            assert_close(got, want, tol * 5, "info_nce gradient", atol=tol * 1e-3)  # n = 1: exactly 0


def test_info_nce_labels_temperature_and_reductions():
    g = torch.Generator().manual_seed(12)
    q = torch.randn(40, 16, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(55, 16, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 55, (40,), generator=g)
    logits = F.normalize(q, dim=1) @ F.normalize(k, dim=1).T / 0.05
    for reduction in ("mean", "sum", "none"):
        ours = M.info_nce(q, k, temperature=0.05, labels=labels, reduction=reduction)
        theirs = F.cross_entropy(logits, labels, reduction=reduction)
        assert_close(ours, theirs, 1e-10, reduction)
        assert_close(torch.autograd.grad(ours.sum(), q)[0], torch.autograd.grad(theirs.sum(), q, retain_graph=True)[0],
                     1e-10, reduction)  # fmt: skip
    assert_close(M.info_nce(q, k[:40], temperature=0.05, normalize=False),
                 F.cross_entropy(q @ k[:40].T / 0.05, torch.arange(40)), 1e-10, "unnormalized")  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_temperature_in_16_bit_is_finite(dtype):
    g = torch.Generator().manual_seed(13)
    e = torch.randn(64, 32, generator=g).to(dtype).requires_grad_()
    y = torch.randint(0, 4, (64,), generator=g)
    values = [M.info_nce(e, e.flip(0), temperature=0.01, symmetric=True), M.nt_xent(e, y, temperature=0.01),
              M.supcon(e, y, temperature=0.01), M.circle(e, y, gamma=256), M.multi_similarity(e, y, beta=50)]
    for value in values:
        (grad,) = torch.autograd.grad(value, e)
        assert torch.isfinite(value) and bool(torch.isfinite(grad).all())
    expected = R.info_nce(e.detach().float(), e.detach().flip(0).float(), temperature=0.01, symmetric=True)
    assert_close(values[0].float(), expected, 1e-2, "info_nce tau 0.01")


def test_fused_gradient_is_used_only_for_a_uniform_upstream_gradient():
    """The forward computes the gradient of the summed row terms in the same pass; a backward whose
    upstream gradient is not one value over the active rows (a masked or weighted sum of per-row
    losses) must recompute, and both give the materialized cross entropy's gradients."""
    g = torch.Generator().manual_seed(19)
    q = torch.randn(50, 16, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(50, 16, generator=g, dtype=torch.float64, requires_grad=True)
    weights = torch.rand(50, generator=g, dtype=torch.float64)
    mask = torch.rand(50, generator=g) < 0.5
    logits = F.normalize(q, dim=1) @ F.normalize(k, dim=1).T / 0.07
    per_row = F.cross_entropy(logits, torch.arange(50), reduction="none")
    for combine in (lambda v: v.mean(), lambda v: 3 * v.sum(), lambda v: (v * weights).sum(), lambda v: v[mask].sum()):
        ours = combine(M.info_nce(q, k, reduction="none"))
        theirs = combine(per_row)
        for got, want in zip(torch.autograd.grad(ours, (q, k)), torch.autograd.grad(theirs, (q, k), retain_graph=True)):
            assert_close(got, want, 1e-10, "info_nce gradient")
    e = torch.randn(40, 8, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 4, (40,), generator=g)
    for fn in (M.supcon, M.circle, M.triplet, M.multi_similarity):  # uniform (mean) and masked (nonzero) reductions
        with torch.no_grad():
            unfused = fn(e, y)  # no fused gradient without grad mode; same value
        assert_close(fn(e, y), unfused, 1e-12, fn.__name__)


def test_auc_loss_and_decoupled_softmax_match_the_float64_references():
    g = torch.Generator().manual_seed(14)
    q = torch.randn(30, 12, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(45, 12, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 45, (30,), generator=g)
    for ours, theirs in ((lambda: M.auc_loss(q, k, labels=labels, temperature=0.3),
                          lambda: R.auc_loss(q, k, labels=labels, temperature=0.3)),
                         (lambda: M.auc_loss(q, k), lambda: R.auc_loss(q, k))):  # fmt: skip
        a, b = ours(), theirs()
        assert_close(a, b, 1e-10, "auc")
        for got, want in zip(torch.autograd.grad(a, (q, k)), torch.autograd.grad(b, (q, k))):
            assert_close(got, want, 1e-10, "auc gradient")
    mask = torch.rand(30, 45, generator=g) < 0.1
    mask[0] = False  # a query without positives gives 0
    mask[1] = True  # ... and one whose keys are all positive (no negative) too
    padded = torch.full((30, 45), -1, dtype=torch.int64)
    for i in range(30):
        cols = mask[i].nonzero().flatten()
        padded[i, : cols.numel()] = cols
    expected = R.decoupled_softmax(q, k, mask)
    (want,) = torch.autograd.grad(expected, q)
    for positives in (mask, padded):
        ours = M.decoupled_softmax(q, k, positives)
        assert_close(ours, expected, 1e-10, "decoupled softmax")
        assert_close(torch.autograd.grad(ours, q)[0], want, 1e-9, "decoupled softmax gradient")


def test_modules_wrap_the_functions():
    g = torch.Generator().manual_seed(15)
    e = torch.randn(20, 8, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (20,), generator=g)
    assert_close(fastloss.nn.MultiSimilarityLoss(mining=True)(e, y), losses.MultiSimilarityLoss()(
        e, y, miners.MultiSimilarityMiner()(e, y)), 1e-10, "module")  # fmt: skip
    assert_close(fastloss.nn.TripletMarginLoss(0.1, mining="batch_hard")(e, y),
                 losses.TripletMarginLoss(0.1)(e, y, miners.BatchHardMiner()(e, y)), 1e-10, "module")  # fmt: skip
    clip = fastloss.nn.InfoNCELoss(symmetric=True, learnable_scale=True).double()
    loss = clip(e, e.flip(0))
    loss.backward()
    assert clip.logit_scale.grad is not None and torch.isfinite(clip.logit_scale.grad)


def test_backward_is_deterministic():
    g = torch.Generator().manual_seed(16)
    e = torch.randn(300, 32, generator=g, requires_grad=True)
    y = torch.randint(0, 7, (300,), generator=g)
    runs = [torch.autograd.grad(M.multi_similarity(e, y) + M.info_nce(e, e.flip(0), symmetric=True), e)[0]
            for _ in range(2)]  # fmt: skip
    assert torch.equal(runs[0], runs[1])


def test_ops_pass_opcheck(device):
    g = torch.Generator().manual_seed(17)
    dtype = torch.float32 if is_gpu(device) else torch.float64  # (the CUDA kernels take float32 at most)
    x = F.normalize(torch.randn(10, 6, generator=g, dtype=dtype), dim=1).to(device).requires_grad_()
    y = torch.randint(0, 3, (10,), generator=g).to(device)
    scale = torch.tensor(0.1, dtype=torch.float64, device=device)
    # On a GPU the fused backward takes a uniform upstream gradient on trust (checked on the device,
    # test_fused_backward_on_the_gpu_...), which opcheck's random gradients are not.
    for kind in ("nt_xent", "multi_similarity", "triplet"):
        for fused in (False,) if is_gpu(device) else (False, True):
            torch.library.opcheck(torch.ops.fastloss.metric_forward.default,
                                  (x, x, y, y, None, None, None, scale, 0, _ops.KINDS[kind], 50.0, 0.5, 0.1, 1, False,
                                   fused))  # fmt: skip
    torch.library.opcheck(torch.ops.fastloss.metric_forward.default,
                          (x, x.detach().flip(0).requires_grad_(), None, None, None, None, None,
                           torch.tensor(10.0, dtype=torch.float64, device=device, requires_grad=True), -1, 0, 0.0, 0.0,
                           0.0, 0, True))  # fmt: skip


@pytest.mark.parametrize("kind", ["nt_xent", "multi_similarity", "triplet"])
def test_fused_backward_on_the_gpu_uses_a_uniform_upstream_and_reports_any_other(gpu, kind):
    """No host read in the backward on CUDA: the fused gradient is scaled by the upstream gradient of the
    first active row, and an upstream gradient that is not uniform is reported as a device error."""
    g = torch.Generator().manual_seed(29)
    x0 = F.normalize(torch.randn(11, 6, generator=g), dim=1)
    y = gpu(torch.randint(0, 3, (11,), generator=g))
    scale = torch.tensor(0.1, dtype=torch.float64)

    def grad(fused, weights):
        x = gpu(x0).requires_grad_()
        with gpu.kernels():
            terms = _ops.forward(x, x, y, y, None, None, None, scale, 0, _ops.KINDS[kind], 50.0, 0.5, 0.1, 1, False,
                                 fused)[0]  # fmt: skip
            return torch.autograd.grad((terms[:, 0] * gpu(weights)).sum(), x)[0].cpu()

    uniform = torch.full((11,), 0.37)
    fastloss.check_device_errors()
    assert_close(grad(True, uniform), grad(False, uniform), 2e-5, "fused gradient, uniform upstream")
    fastloss.check_device_errors()  # nothing reported
    grad(True, torch.linspace(0.1, 1.0, 11))
    with pytest.raises(RuntimeError, match="upstream gradient that differs"):
        fastloss.check_device_errors()
    fastloss.check_device_errors()  # raised once, then cleared


def test_memory_stays_linear_in_the_batch():
    """B = 8192, d = 128: the similarity matrix alone would be 256 MiB in float32."""
    script = textwrap.dedent("""
        import resource, torch, fastloss
        e = torch.randn(8192, 128, requires_grad=True)
        y = torch.randint(0, 100, (8192,))
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        (fastloss.metric.info_nce(e, e.flip(0), symmetric=True) + fastloss.metric.multi_similarity(e, y)).backward()
        print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    grown_mib = float(result.stdout.strip().splitlines()[-1])
    assert grown_mib < 64, f"peak memory grew by {grown_mib:.0f} MiB"


def test_bad_input_is_refused_with_a_clear_error():
    e = torch.randn(10, 4)
    y = torch.randint(0, 3, (10,))
    cases = [
        (lambda: M.nt_xent(e, y[:9]), ValueError, "'labels'"),
        (lambda: M.nt_xent(e, y, temperature=-1.0), ValueError, "'temperature'"),
        (lambda: M.supcon(e, y.float()), TypeError, "'labels'"),
        (lambda: M.multi_similarity(e, y, ref_emb=torch.randn(5, 3), ref_labels=y[:5]), ValueError, "'ref_emb'"),
        (lambda: M.multi_similarity(e, y, ref_emb=torch.randn(5, 4)), ValueError, "'ref_emb' must have as many"),
        (lambda: M.multi_similarity(e, y, ref_emb=torch.randn(5, 4), ref_labels=y), ValueError, "'ref_emb'"),
        (lambda: M.info_nce(e, e, logit_scale=torch.tensor(0.0)), ValueError, "'logit_scale'"),
        (lambda: M.triplet(e, y, mining="hardest"), ValueError, "'mining'"),
        (lambda: M.contrastive(e, y, distance="manhattan"), ValueError, "'distance'"),
        (lambda: M.info_nce(e, torch.randn(10, 5)), ValueError, "dim"),
        (lambda: M.info_nce(e, torch.randn(9, 4)), ValueError, "at least"),
        (lambda: M.info_nce(e, torch.randn(12, 4), symmetric=True), ValueError, "square"),
        (lambda: M.info_nce(e, e, labels=torch.full((10,), 10)), ValueError, "'labels'"),
        (lambda: M.info_nce(e, e, logit_scale=torch.ones(2)), ValueError, "'logit_scale'"),
        (lambda: M.circle(e[0], y), ValueError, "'embeddings'"),
        (lambda: M.decoupled_softmax(e, e, torch.ones(10, 9, dtype=torch.bool)), ValueError, "'positives'"),
        (lambda: M.decoupled_softmax(e, e, torch.full((10, 2), 10)), ValueError, "'positives'"),
        (lambda: M.auc_loss(e, e, temperature=0.0), ValueError, "'temperature'"),
    ]
    for call, error, words in cases:
        with pytest.raises(error, match=words) as info:
            call()
        assert "fastloss." in str(info.value)


def _distributed_worker(rank, world, init_file, e, y, out):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        local_e = e.chunk(world)[rank].clone().requires_grad_()
        local_y = y.chunk(world)[rank]
        group = dist.group.WORLD
        results = {}
        for name, fn in (("nt_xent", M.nt_xent), ("supcon", M.supcon), ("multi_similarity", M.multi_similarity),
                         ("triplet", M.triplet), ("circle", M.circle)):  # fmt: skip
            loss = fn(local_e, local_y, process_group=group)
            (grad,) = torch.autograd.grad(loss, local_e)
            results[name] = (loss.detach(), grad)
        out[rank] = results
    finally:
        dist.destroy_process_group()


def test_process_group_gives_the_gradient_of_the_concatenated_batch(tmp_path):
    """2 gloo processes: the per-rank losses add up to the single-process loss on the concatenated
    batch, and each rank's embedding gradient equals that loss's gradient for its rows."""
    import torch.multiprocessing as mp

    g = torch.Generator().manual_seed(18)
    e = torch.randn(48, 16, generator=g, dtype=torch.float64)
    y = torch.randint(0, 5, (48,), generator=g)
    manager = mp.get_context("spawn").Manager()
    out = manager.dict()
    mp.start_processes(_distributed_worker, args=(2, str(tmp_path / "init"), e, y, out), nprocs=2, join=True,
                       start_method="spawn")  # fmt: skip
    for name, fn in (("nt_xent", M.nt_xent), ("supcon", M.supcon), ("multi_similarity", M.multi_similarity),
                     ("triplet", M.triplet), ("circle", M.circle)):  # fmt: skip
        whole = e.clone().requires_grad_()
        loss = fn(whole, y)
        (grad,) = torch.autograd.grad(loss, whole)
        assert_close(out[0][name][0] + out[1][name][0], loss, 1e-10, f"{name} loss")
        assert_close(torch.cat([out[0][name][1], out[1][name][1]]), grad, 1e-10, f"{name} gradient")


# ---- CUDA: the same losses on the GPU (chunks of rows of S; csrc/metric/metric_cuda.cu) ----------------


@pytest.fixture(params=["one_chunk", "many_chunks"])
def cuda_chunks(request, gpu):
    """Every CUDA test runs with the default workspace (one chunk at these sizes) and with a budget so
    small that each chunk holds a few rows (dY accumulated over chunks, column statistics merged)."""
    from fastloss import _C

    _C.metric_cuda_set_chunk_budget(0 if request.param == "one_chunk" else 3000)
    yield request.param
    _C.metric_cuda_set_chunk_budget(0)


def cuda_grads(gpu, fn, *tensors):
    """fn(*tensors on the GPU) and its gradients (zeros for an input it does not use), run on the GPU."""
    leaves = [gpu(t.detach()).requires_grad_() for t in tensors]
    with gpu.kernels():
        value = fn(*leaves)
        grads = torch.autograd.grad(value, leaves, allow_unused=True)
    return value, [torch.zeros_like(t) if g is None else g for t, g in zip(leaves, grads)]


# B x d x classes. The GPU kernels work on 128 x 128 tiles of S: B = 200 is two row tiles with a
# remainder; on the simulated GPU B = 130 (two tiles, 2 rows in the second) and d = 40 keep that at a
# third of the cost (B = 200, d = 64 took about 50 s per nt_xent case there).
CUDA_PML_SHAPES = gpu_sized([(97, 33, 10), (200, 64, 4), (1, 8, 1), (2, 8, 2)],
                            [(97, 33, 10), (130, 40, 4), (1, 8, 1), (2, 8, 2)])


@pytest.mark.parametrize("shape", CUDA_PML_SHAPES, ids=lambda s: f"B{s[0]}d{s[1]}c{s[2]}")
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_cuda_float32_matches_pytorch_metric_learning_in_float64(case, shape, gradient_path, cuda_chunks, gpu):
    name, ours, theirs = case
    b, d, classes = shape
    g = torch.Generator().manual_seed(b * d + 1)
    e = torch.randn(b, d, generator=g, dtype=torch.float64)
    y = torch.randint(0, classes, (b,), generator=g)
    value, (grad,) = cuda_grads(gpu, lambda t: ours(t, gpu(y), None, None), e.float())
    leaf = e.clone().requires_grad_()
    want = theirs(leaf, y, None, None)
    want_grad = torch.autograd.grad(want, leaf)[0] if want.requires_grad else torch.zeros_like(e)
    tol = 1e-3 if name == "triplet_semi" else 5e-5  # semi-hard: boundary triplets, as on the CPU
    assert_close(value.double().cpu(), want, tol, f"{name} loss on CUDA", atol=1e-7)
    assert_close(grad.double().cpu(), want_grad, tol, f"{name} gradient on CUDA", atol=1e-8)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_cuda_ref_emb_matches_the_cpu(case, cuda_chunks, gpu):
    name, ours, _ = case
    g = torch.Generator().manual_seed(31)
    e, r = torch.randn(70, 24, generator=g), torch.randn(90, 24, generator=g)
    y, ry = torch.randint(0, 6, (70,), generator=g), torch.randint(0, 6, (90,), generator=g)
    value, grads = cuda_grads(gpu, lambda a, b: ours(a, gpu(y), b, gpu(ry)), e, r)
    leaves = [e.double().requires_grad_(), r.double().requires_grad_()]
    want = ours(leaves[0], y, leaves[1], ry)
    want_grads = torch.autograd.grad(want, leaves, allow_unused=True)
    tol = 1e-3 if name == "triplet_semi" else 5e-5
    assert_close(value.double().cpu(), want, tol, f"{name} loss with ref_emb on CUDA", atol=1e-7)
    for got, expected in zip(grads, want_grads):
        expected = torch.zeros_like(got.double().cpu()) if expected is None else expected
        assert_close(got.double().cpu(), expected, tol, f"{name} gradient with ref_emb on CUDA", atol=1e-8)


@pytest.mark.parametrize("positives", ["diagonal", "labels", "symmetric"])
@pytest.mark.parametrize("b", [1, 65, 130, 300])
def test_cuda_info_nce_equals_cross_entropy_with_the_scale_gradient(positives, b, gradient_path, cuda_chunks, gpu):
    """The fused-tile InfoNCE engine (csrc/metric/info_nce_cuda.cu): one-way with the diagonal or
    label targets, and symmetric CLIP; a learnable logit scale; more keys than queries one-way."""
    g = torch.Generator().manual_seed(b + 5)
    keys = b if positives == "symmetric" else b + 37
    q, k = torch.randn(b, 40, generator=g, dtype=torch.float64), torch.randn(keys, 40, generator=g, dtype=torch.float64)
    target = torch.randint(0, keys, (b,), generator=g) if positives == "labels" else torch.arange(b)
    weights = torch.rand(b, generator=g, dtype=torch.float64)
    log_scale = torch.tensor(2.5, dtype=torch.float64)
    symmetric = positives == "symmetric"
    labels = gpu(target) if positives == "labels" else None
    for combine in (lambda v: v.mean(), lambda v: (v * weights.to(v)).sum()):  # uniform, then per-row weights
        value, (gq, gk, gs) = cuda_grads(
            gpu, lambda a, c, s: combine(M.info_nce(a, c, logit_scale=s.exp(), labels=labels, symmetric=symmetric,
                                               reduction="none")),
            q.float(), k.float(), log_scale.float())  # fmt: skip
        leaves = [t.clone().requires_grad_() for t in (q, k, log_scale)]
        logits = F.normalize(leaves[0], dim=1) @ F.normalize(leaves[1], dim=1).T * leaves[2].exp()
        per_row = F.cross_entropy(logits, target, reduction="none")
        if symmetric:
            per_row = (per_row + F.cross_entropy(logits.T, target, reduction="none")) / 2
        want = combine(per_row)
        for got, expected, what in zip((value, gq, gk, gs), (want,) + torch.autograd.grad(want, leaves),
                                       ("loss", "dq", "dk", "dscale")):  # fmt: skip
            assert_close(got.double().cpu(), expected, 5e-5, f"info_nce {positives} {what} on CUDA", atol=1e-8)


def test_cuda_info_nce_forward_walks_several_column_tiles_per_block(gpu):
    """More than 64 column tiles of S (8300 keys): each forward block walks two tiles in turn, reusing
    its shared memory between them (the other shapes give every block a single column tile, so a
    missing barrier between two tiles went unseen there: scripts/sim_planted_bugs.py)."""
    g = torch.Generator().manual_seed(41)
    q, k = torch.randn(5, 8, generator=g, dtype=torch.float64), torch.randn(8300, 8, generator=g, dtype=torch.float64)
    target = torch.randint(0, 8300, (5,), generator=g)
    value, (gq, gk) = cuda_grads(gpu, lambda a, c: M.info_nce(a, c, labels=gpu(target), temperature=0.2,
                                                            reduction="none").sum(), q.float(), k.float())  # fmt: skip
    leaves = [t.clone().requires_grad_() for t in (q, k)]
    logits = F.normalize(leaves[0], dim=1) @ F.normalize(leaves[1], dim=1).T / 0.2
    want = F.cross_entropy(logits, target, reduction="none").sum()
    for got, expected, what in zip((value, gq, gk), (want,) + torch.autograd.grad(want, leaves), ("loss", "dq", "dk")):
        assert_close(got.double().cpu(), expected, 5e-5, f"info_nce, 65 column tiles: {what}", atol=1e-8)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_16_bit_clip_at_temperature_001_is_finite_and_close(dtype, cuda_chunks, gpu):
    g = torch.Generator().manual_seed(23)
    b = gpu_sized(300, 150)  # simulated GPU: 2 tiles of 128 rows, not 3 (300 took a minute with many chunks)
    q, k = (torch.randn(b, 64, generator=g).to(dtype) for _ in range(2))
    y = gpu(torch.randint(0, 5, (b,), generator=g))
    for fn in (lambda a, b: M.info_nce(a, b, temperature=0.01, symmetric=True),
               lambda a, b: M.nt_xent(a, y, temperature=0.01), lambda a, b: M.circle(a, y, gamma=256),
               lambda a, b: M.multi_similarity(a, y, beta=50)):  # fmt: skip
        value, grads = cuda_grads(gpu, fn, q, k)
        assert torch.isfinite(value) and all(bool(torch.isfinite(t).all()) for t in grads)
    for temperature, symmetric in ((0.01, True), (0.07, True), (0.07, False)):
        value, grads = cuda_grads(gpu, lambda a, b: M.info_nce(a, b, temperature=temperature, symmetric=symmetric),
                                  q, k)  # fmt: skip
        # The float64 reference sees the normalized inputs rounded to 16 bits, as the kernels read them,
        # and differentiates through the rounding as autograd does (straight through).
        leaves = [t.double().requires_grad_() for t in (q, k)]
        normalized = [F.normalize(t, dim=1) for t in leaves]
        rounded = [n + (n.to(dtype).double() - n).detach() for n in normalized]
        want = R.info_nce(*rounded, temperature=temperature, symmetric=symmetric, normalize=False)
        what = f"16-bit InfoNCE on CUDA, tau {temperature}, symmetric {symmetric}"
        assert_close(value.double().cpu(), want, 1e-2, what)
        for got, expected in zip(grads, torch.autograd.grad(want, leaves)):
            assert_close(got.double().cpu(), expected, 2e-2, what + " gradient")


def test_cuda_auc_and_decoupled_softmax_match_the_float64_references(cuda_chunks, gpu):
    g = torch.Generator().manual_seed(24)
    q, k = torch.randn(80, 20, generator=g, dtype=torch.float64), torch.randn(100, 20, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 100, (80,), generator=g)
    mask = torch.rand(80, 100, generator=g) < 0.05
    mask[0] = False
    mask[1] = True
    for name, ours, theirs in (
        ("auc", lambda a, b: M.auc_loss(a, b, labels=gpu(labels), temperature=0.3),
         lambda a, b: R.auc_loss(a, b, labels=labels, temperature=0.3)),
        ("decoupled", lambda a, b: M.decoupled_softmax(a, b, gpu(mask)), lambda a, b: R.decoupled_softmax(a, b, mask)),
    ):  # fmt: skip
        value, grads = cuda_grads(gpu, ours, q.float(), k.float())
        leaves = [q.clone().requires_grad_(), k.clone().requires_grad_()]
        want = theirs(*leaves)
        assert_close(value.double().cpu(), want, 5e-5, f"{name} on CUDA")
        for got, expected in zip(grads, torch.autograd.grad(want, leaves)):
            assert_close(got.double().cpu(), expected, 5e-5, f"{name} gradient on CUDA", atol=1e-9)


def test_cuda_is_deterministic_and_handles_empty_batches_and_bad_targets(gpu):
    g = torch.Generator().manual_seed(25)
    e = gpu(torch.randn(300, 32, generator=g)).requires_grad_()
    y = gpu(torch.randint(0, 7, (300,), generator=g))
    with gpu.kernels():
        runs = [torch.autograd.grad(M.multi_similarity(e, y) + M.info_nce(e, e.flip(0), symmetric=True), e)[0]
                for _ in range(2)]  # fmt: skip
        assert torch.equal(runs[0], runs[1])
        empty = torch.randn(0, 8, device=gpu.device, requires_grad=True)
        loss = M.supcon(empty, torch.zeros(0, dtype=torch.int64, device=gpu.device))
        assert float(loss) == 0 and torch.equal(torch.autograd.grad(loss, empty)[0], torch.zeros_like(empty))
        bad = torch.arange(300, device=gpu.device)
        bad[7] = 300
        fastloss.set_target_checks(True)  # the opt-in eager host check raises at once
        try:
            with pytest.raises(ValueError, match="must be in"):
                M.info_nce(e, e, labels=bad)
        finally:
            fastloss.set_target_checks(False)
        # By default: the row with the bad label is NaN, the others exact, and the kernel reports it on the device.
        rows = M.info_nce(e.detach(), e.detach(), labels=bad, reduction="none")
        with pytest.raises(ValueError, match=r"fastloss.metric \(an earlier call, found on the device\): targets .* "
                           r"holds 300 at position 7"):
            fastloss.check_device_errors()
        rows = rows.cpu()
        assert bool(torch.isnan(rows[7])) and bool(torch.isfinite(rows[torch.arange(300) != 7]).all())
        with pytest.raises(ValueError, match="float64"):
            M.nt_xent(e.detach().double(), y)
