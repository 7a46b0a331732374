"""The label losses as a pytorch-metric-learning user calls them: the modules' defaults against PML's
classes with theirs, PML's ``indices_tuple`` from its miners (module forward in PML's positional
order), ``reduction`` ("none" per anchor against PML's unreduced losses), and ``distance=`` (names
and PML distance objects) for contrastive and triplet; loss and gradient, float64."""

import pytest
import torch

import fastloss
from fastloss import metric as M

from conftest import assert_close

pml = pytest.importorskip("pytorch_metric_learning")
from pytorch_metric_learning import distances, losses, miners, reducers  # noqa: E402

# PML's euclidean distances come from torch.cdist, which for more than 25 rows uses |x|^2 + |y|^2 - 2 x.y
# (relative errors ~1e-9 in float64 for close pairs), ours from the exact differences.
TOL = 1e-7
MODULES = [  # (ours, PML's), both with their defaults
    ("NTXentLoss", fastloss.nn.NTXentLoss, losses.NTXentLoss),
    ("SupConLoss", fastloss.nn.SupConLoss, losses.SupConLoss),
    ("MultiSimilarityLoss", fastloss.nn.MultiSimilarityLoss, losses.MultiSimilarityLoss),
    ("CircleLoss", fastloss.nn.CircleLoss, losses.CircleLoss),
    ("ContrastiveLoss", fastloss.nn.ContrastiveLoss, losses.ContrastiveLoss),
    ("TripletMarginLoss", fastloss.nn.TripletMarginLoss, losses.TripletMarginLoss),
]


def batch(seed=0, b=40, d=12, classes=5):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, d, generator=g, dtype=torch.float64), torch.randint(0, classes, (b,), generator=g)


def both(ours, theirs, e, *args, what=""):
    """Loss and gradient of ours and PML's on copies of e."""
    e1, e2 = e.clone().requires_grad_(), e.clone().requires_grad_()
    a, b = ours(e1, *args), theirs(e2, *args)
    assert_close(a, b, TOL, f"{what} loss", atol=1e-13)
    ga = torch.autograd.grad(a.sum(), e1)[0]
    gb = torch.autograd.grad(b.sum(), e2, allow_unused=True)[0] if b.requires_grad else None
    assert_close(ga, torch.zeros_like(e) if gb is None else gb, TOL, f"{what} gradient", atol=1e-13)


@pytest.mark.parametrize("name, ours, theirs", MODULES, ids=[m[0] for m in MODULES])
def test_module_defaults_equal_pml(name, ours, theirs):
    e, y = batch(1)
    both(ours(), theirs(), e, y, what=name)


def test_function_defaults_equal_the_modules():
    e, y = batch(2)
    for fn, module in ((M.nt_xent, fastloss.nn.NTXentLoss()), (M.supcon, fastloss.nn.SupConLoss()),
                       (M.multi_similarity, fastloss.nn.MultiSimilarityLoss()), (M.circle, fastloss.nn.CircleLoss()),
                       (M.contrastive, fastloss.nn.ContrastiveLoss()), (M.triplet, fastloss.nn.TripletMarginLoss())):
        assert_close(fn(e, y), module(e, y), 0.0, fn.__name__)


MINERS = [
    ("MultiSimilarityMiner", lambda: miners.MultiSimilarityMiner(0.1)),
    ("TripletMarginMiner", lambda: miners.TripletMarginMiner(margin=0.2, type_of_triplets="all")),
    ("TripletMarginMiner_semihard", lambda: miners.TripletMarginMiner(margin=0.2, type_of_triplets="semihard")),
    ("BatchHardMiner", lambda: miners.BatchHardMiner()),
    ("PairMarginMiner", lambda: miners.PairMarginMiner(pos_margin=0.3, neg_margin=0.9)),
]
LOSS_PAIRS = [  # (ours, PML's), with non-default hyperparameters
    ("nt_xent", lambda: fastloss.nn.NTXentLoss(0.2), lambda: losses.NTXentLoss(0.2)),
    ("supcon", lambda: fastloss.nn.SupConLoss(0.3), lambda: losses.SupConLoss(0.3)),
    ("multi_similarity", lambda: fastloss.nn.MultiSimilarityLoss(1.0, 30.0, 0.4),
     lambda: losses.MultiSimilarityLoss(1.0, 30.0, 0.4)),
    ("circle", lambda: fastloss.nn.CircleLoss(0.25, 64.0), lambda: losses.CircleLoss(0.25, 64.0)),
    ("contrastive", lambda: fastloss.nn.ContrastiveLoss(0.1, 0.8), lambda: losses.ContrastiveLoss(0.1, 0.8)),
    ("triplet", lambda: fastloss.nn.TripletMarginLoss(0.1), lambda: losses.TripletMarginLoss(0.1)),
]


@pytest.mark.parametrize("miner", MINERS, ids=[m[0] for m in MINERS])
@pytest.mark.parametrize("loss", LOSS_PAIRS, ids=[p[0] for p in LOSS_PAIRS])
def test_indices_tuple_from_pml_miners_matches_pml(loss, miner):
    name, ours, theirs = loss
    e, y = batch(3)
    mined = miner[1]()(e, y)
    assert len(mined[0]) > 1, "the miner found nothing: the test would not test anything"
    both(lambda x, yy, t: ours()(x, yy, t), lambda x, yy, t: theirs()(x, yy, t), e, y, mined, what=f"{name} {miner[0]}")


def test_indices_tuple_with_ref_emb_and_without_labels():
    e, y = batch(4)
    r, ry = batch(5, b=30)
    mined = miners.MultiSimilarityMiner(0.2)(e, y, r, ry)
    for name, ours, theirs in LOSS_PAIRS:
        both(lambda x, t: ours()(x, y, t, r, ry), lambda x, t: theirs()(x, y, t, r, ry), e, mined, what=name)
        # PML computes the loss from the tuple alone: labels may be None
        both(lambda x, t: ours()(x, None, t), lambda x, t: theirs()(x, None, t), e, mined, what=f"{name} no labels")


def test_indices_tuple_is_refused_with_a_clear_error():
    e, y = batch(6)
    a = torch.arange(3)
    cases = [
        (lambda: M.triplet(e, y, indices_tuple=(a, a)), TypeError, "fastloss.triplet: argument 'indices_tuple'"),
        (lambda: M.supcon(e, y, indices_tuple=(a, a, a.float())), TypeError, "'indices_tuple' negatives"),
        (lambda: M.supcon(e, y, indices_tuple=(a, a, a[:2])), ValueError, "must pair up"),
        (lambda: M.circle(e, y, indices_tuple=(a, a, a + 100)), ValueError, r"negatives must be in \[0, 40\)"),
        (lambda: M.multi_similarity(e, y, mining=True, indices_tuple=(a, a, a)), ValueError, "mining=True"),
        (lambda: M.triplet(e, y, mining="batch_hard", indices_tuple=(a, a, a)), ValueError, "mining='batch_hard'"),
        (lambda: M.supcon(e, None), ValueError, "fastloss.supcon: argument 'labels' is required"),
    ]
    for call, kind, message in cases:
        with pytest.raises(kind, match=message):
            call()


def per_anchor(loss_dict, n):
    """PML's unreduced losses (DoNothingReducer) summed per anchor: (n,)."""
    rows = torch.zeros(n, dtype=torch.float64)
    for part in loss_dict.values():
        values = part["losses"]
        if isinstance(values, torch.Tensor) and values.numel():
            indices = part["indices"]  # (anchors, ...) for pairs and triplets, the anchors for per-anchor losses
            anchors = indices if isinstance(indices, torch.Tensor) else indices[0]
            rows = rows.index_add(0, anchors, values.reshape(-1).to(torch.float64))
    return rows


@pytest.mark.parametrize("mined", [False, True], ids=["labels", "indices_tuple"])
@pytest.mark.parametrize("loss", LOSS_PAIRS, ids=[p[0] for p in LOSS_PAIRS])
def test_reduction_none_is_the_per_anchor_sum_of_pml_unreduced_losses(loss, mined):
    name, ours, theirs = loss
    e, y = batch(7, b=30)
    t = miners.MultiSimilarityMiner(0.1)(e, y) if mined else None
    module = ours()
    module.reduction = "none"
    e1, e2 = e.clone().requires_grad_(), e.clone().requires_grad_()
    rows = module(e1, y, t)
    unreduced = theirs()
    unreduced.reducer = reducers.DoNothingReducer()
    want = per_anchor(unreduced(e2, y, t), e.shape[0])
    assert rows.shape == (e.shape[0],)
    assert_close(rows, want, TOL, f"{name} per-anchor losses", atol=1e-13)
    weights = torch.linspace(0.5, 2.0, e.shape[0], dtype=torch.float64)  # a non-uniform upstream gradient
    assert_close(torch.autograd.grad((rows * weights).sum(), e1)[0],
                 torch.autograd.grad((want * weights).sum(), e2)[0], TOL, f"{name} per-anchor gradient", atol=1e-13)
    module.reduction = "sum"
    assert_close(module(e, y, t), want.sum(), TOL, f"{name} sum")


@pytest.mark.parametrize("fn", [M.nt_xent, M.supcon, M.multi_similarity, M.circle, M.contrastive, M.triplet])
def test_reduction_is_checked(fn):
    e, y = batch(8)
    with pytest.raises(ValueError, match=f"fastloss.{fn.__name__}: argument 'reduction'"):
        fn(e, y, reduction="avg")


DISTANCES = [  # (our distance=..., normalize_embeddings, PML's distance)
    ("euclidean", None, distances.LpDistance()),
    ("euclidean", False, distances.LpDistance(normalize_embeddings=False)),
    ("cosine", None, distances.CosineSimilarity()),
    ("dot", None, distances.DotProductSimilarity(normalize_embeddings=False)),  # our "dot" is the plain product
    ("dot", True, distances.DotProductSimilarity(normalize_embeddings=True)),
    ("object", None, distances.LpDistance(normalize_embeddings=False)),
    ("object", None, distances.CosineSimilarity()),
    ("object", None, distances.DotProductSimilarity()),
]


@pytest.mark.parametrize("case", DISTANCES, ids=lambda c: f"{c[0]}-{c[1]}-{type(c[2]).__name__}")
@pytest.mark.parametrize("kind", ["contrastive", "triplet", "triplet_batch_hard", "triplet_semi_hard"])
def test_distance_matches_pml(kind, case):
    name, normalize, pml_distance = case
    e, y = batch(9, b=24, d=6)
    distance = pml_distance if name == "object" else name
    similarity = type(pml_distance).__name__ != "LpDistance"
    if kind == "contrastive":
        pm, nm = (0.6, 0.2) if similarity else (0.1, 0.9 if normalize is None else 2.5)
        ours = fastloss.nn.ContrastiveLoss(pm, nm, distance=distance, normalize_embeddings=normalize)
        theirs = losses.ContrastiveLoss(pm, nm, distance=pml_distance)
        both(ours, theirs, e, y, what=f"{kind} {name}")
        return
    mining = {"triplet": "all", "triplet_batch_hard": "batch_hard", "triplet_semi_hard": "semi_hard"}[kind]
    ours = fastloss.nn.TripletMarginLoss(0.3, mining=mining, distance=distance, normalize_embeddings=normalize)
    theirs = losses.TripletMarginLoss(0.3, distance=pml_distance)
    miner = {"all": None, "batch_hard": miners.BatchHardMiner(distance=pml_distance),
             "semi_hard": miners.TripletMarginMiner(0.3, type_of_triplets="semihard", distance=pml_distance)}[mining]
    both(ours, lambda x, yy: theirs(x, yy, None if miner is None else miner(x, yy)), e, y, what=f"{kind} {name}")


def test_unsupported_distances_are_refused_with_a_clear_error():
    e, y = batch(10)
    cases = [
        (distances.LpDistance(p=1), "LpDistance\\(p=1\\) is not supported"),
        (distances.LpDistance(power=2), "power=2"),
        (distances.SNRDistance(), "got SNRDistance"),
        ("manhattan", "argument 'distance' must be one of"),
    ]
    for fn in (M.contrastive, M.triplet):
        for distance, message in cases:
            with pytest.raises(ValueError, match=f"fastloss.{fn.__name__}: .*{message}"):
                fn(e, y, distance=distance)
        with pytest.raises(ValueError, match="contradicts"):
            fn(e, y, distance=distances.LpDistance(normalize_embeddings=False), normalize_embeddings=True)
        with pytest.raises(ValueError, match="distance='dot'"):
            fn(e, y, distance="cosine", normalize_embeddings=False)


def test_module_forward_takes_pml_positional_order():
    """loss(embeddings, labels, indices_tuple, ref_emb, ref_labels): the third positional is the tuple."""
    e, y = batch(11)
    r, ry = batch(12, b=20)
    mined = miners.TripletMarginMiner(0.2)(e, y, r, ry)
    ours = fastloss.nn.TripletMarginLoss(0.2)(e, y, mined, r, ry)
    assert_close(ours, losses.TripletMarginLoss(0.2)(e, y, mined, r, ry), TOL, "positional call")
    assert "margin=0.2" in repr(fastloss.nn.TripletMarginLoss(0.2))


@pytest.mark.gpu
@pytest.mark.parametrize("loss", LOSS_PAIRS, ids=[p[0] for p in LOSS_PAIRS])
def test_reduction_none_on_the_gpu_matches_pml_per_anchor(loss, gpu):
    """The fused kernels in float32 with a non-uniform upstream gradient (the fused gradient must not
    be used: it would be wrong, and reported as a device error)."""
    name, ours, theirs = loss
    e, y = batch(13, b=30)
    unreduced = theirs()
    unreduced.reducer = reducers.DoNothingReducer()
    e2 = e.clone().requires_grad_()
    want = per_anchor(unreduced(e2, y), e.shape[0])
    weights = torch.linspace(0.5, 2.0, e.shape[0], dtype=torch.float64)
    want_grad = torch.autograd.grad((want * weights).sum(), e2)[0]
    module = ours()
    module.reduction = "none"
    leaf = gpu(e.float()).requires_grad_()
    with gpu.kernels():
        rows = module(leaf, gpu(y))
        grad = torch.autograd.grad((rows * gpu(weights.float())).sum(), leaf)[0]
        fastloss.check_device_errors()
    assert_close(rows, want, 1e-4, f"{name} per-anchor losses on the GPU", atol=1e-6)
    assert_close(grad, want_grad, 1e-4, f"{name} per-anchor gradient on the GPU", atol=1e-6)
