"""float32 euclidean losses stay accurate for near-duplicate embeddings (16 unit vectors 0-15 degrees
apart): the kernels recompute the distance of close pairs from the differences instead of
|x|^2 + |y|^2 - 2 x.y, whose rounding gave 1e-3 relative errors in the gradient. Reference: PML in
float64 (its cdist is exact enough there), CPU and the GPU target."""

import math

import pytest
import torch

from fastloss import metric as M

from conftest import assert_close

pml = pytest.importorskip("pytorch_metric_learning")
from pytorch_metric_learning import losses, miners  # noqa: E402


def fan(dim=8):
    """16 unit vectors at about 0, 1, ..., 15 degrees in a random plane of R^dim (float64). Each angle
    is moved by up to 0.3 degrees: on the exact grid, positives and negatives at the same distance
    from an anchor tie, and which of them the miners pick (or whether a gap of exactly 0 counts)
    would depend on the last bit."""
    g = torch.Generator().manual_seed(0)
    basis, _ = torch.linalg.qr(torch.randn(dim, 2, generator=g, dtype=torch.float64))
    degrees = torch.arange(16, dtype=torch.float64) + 0.3 * torch.rand(16, generator=g, dtype=torch.float64)
    angles = degrees * math.pi / 180
    return torch.stack([angles.cos(), angles.sin()], dim=1) @ basis.T


CASES = {
    "triplet_all": (lambda e, y: M.triplet(e, y, margin=0.05),
                    lambda e, y: losses.TripletMarginLoss(0.05)(e, y)),
    "triplet_semi_hard": (lambda e, y: M.triplet(e, y, margin=0.05, mining="semi_hard", mining_margin=0.1),
                          lambda e, y: losses.TripletMarginLoss(0.05)(
                              e, y, miners.TripletMarginMiner(0.1, type_of_triplets="semihard")(e, y))),
    "triplet_batch_hard": (lambda e, y: M.triplet(e, y, margin=0.05, mining="batch_hard"),
                           lambda e, y: losses.TripletMarginLoss(0.05)(e, y, miners.BatchHardMiner()(e, y))),
    "contrastive": (lambda e, y: M.contrastive(e, y, pos_margin=0.02, neg_margin=0.2),
                    lambda e, y: losses.ContrastiveLoss(0.02, 0.2)(e, y)),
}


@pytest.mark.parametrize("labels", ["halves", "alternating"])
@pytest.mark.parametrize("name", list(CASES))
def test_near_duplicates_in_float32_match_float64_within_1e_5(name, labels, device):
    ours, theirs = CASES[name]
    e64 = fan()
    y = torch.arange(16) // 8 if labels == "halves" else torch.arange(16) % 2
    want_leaf = e64.clone().requires_grad_()
    want = theirs(want_leaf, y)
    (want_grad,) = torch.autograd.grad(want, want_leaf)
    leaf = e64.float().to(device).requires_grad_()
    got = ours(leaf, y.to(device))
    (got_grad,) = torch.autograd.grad(got, leaf)
    assert float(want.detach()) > 0, "the case has no active pair: it would test nothing"
    assert_close(got, want, 1e-5, f"{name} loss")
    assert_close(got_grad, want_grad, 1e-5, f"{name} gradient")
