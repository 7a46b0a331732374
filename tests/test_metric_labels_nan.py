"""NaN in gives NaN out in every label loss of fastloss.metric, on the CPU and the GPU target: one
NaN row, or all-NaN embeddings, make the loss and every gradient entry NaN (mining, `loss > 0` counts,
max/min and hinges would otherwise drop the NaN pairs and report a finite loss), with the fused
kernels, the recomputing backward, the torch path (indices_tuple, other distances) and every
reduction."""

import pytest
import torch

from fastloss import metric as M

from conftest import is_gpu

LOSSES = {
    "nt_xent": lambda e, y, **kw: M.nt_xent(e, y, **kw),
    "supcon": lambda e, y, **kw: M.supcon(e, y, **kw),
    "multi_similarity": lambda e, y, **kw: M.multi_similarity(e, y, **kw),
    "multi_similarity_mined": lambda e, y, **kw: M.multi_similarity(e, y, mining=True, **kw),
    "circle": lambda e, y, **kw: M.circle(e, y, **kw),
    "contrastive": lambda e, y, **kw: M.contrastive(e, y, **kw),
    "contrastive_cosine": lambda e, y, **kw: M.contrastive(e, y, distance="cosine", **kw),
    "triplet": lambda e, y, **kw: M.triplet(e, y, **kw),
    "triplet_batch_hard": lambda e, y, **kw: M.triplet(e, y, mining="batch_hard", **kw),
    "triplet_semi_hard": lambda e, y, **kw: M.triplet(e, y, mining="semi_hard", **kw),
}
TORCH_PATH = {  # the same losses on the torch path: a miner's pairs, or a distance the kernels lack
    "nt_xent_pairs": lambda e, y: M.nt_xent(e, y, indices_tuple=_all_pairs(y)),
    "supcon_pairs": lambda e, y: M.supcon(e, y, indices_tuple=_all_pairs(y)),
    "multi_similarity_pairs": lambda e, y: M.multi_similarity(e, y, indices_tuple=_all_pairs(y)),
    "circle_pairs": lambda e, y: M.circle(e, y, indices_tuple=_all_pairs(y)),
    "contrastive_dot": lambda e, y: M.contrastive(e, y, distance="dot"),
    "contrastive_unnormalized": lambda e, y: M.contrastive(e, y, normalize_embeddings=False),
    "triplet_cosine": lambda e, y: M.triplet(e, y, distance="cosine"),
    "triplet_triplets": lambda e, y: M.triplet(e, y, indices_tuple=_all_triplets(y)),
}


def _all_pairs(y):
    same = y[:, None] == y[None, :]
    eye = torch.eye(len(y), dtype=torch.bool, device=y.device)
    a1, p = torch.where(same & ~eye)
    a2, n = torch.where(~same)
    return a1, p, a2, n


def _all_triplets(y):
    a1, p, a2, n = _all_pairs(y)
    i, j = torch.where(a1[:, None] == a2[None, :])
    return a1[i], p[i], n[j]


def _batch(device, which):
    dtype = torch.float32 if is_gpu(device) else torch.float64
    g = torch.Generator().manual_seed(3)
    e = torch.randn(24, 16, generator=g, dtype=dtype)
    if which == "one_row":
        e[5] = float("nan")
    else:
        e[:] = float("nan")
    y = (torch.arange(24) % 4).to(device)
    return e.to(device).requires_grad_(), y


@pytest.mark.parametrize("gradient_path", ["fused", "two_pass"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("which", ["one_row", "all"])
@pytest.mark.parametrize("name", list(LOSSES))
def test_nan_embeddings_give_a_nan_loss_and_gradient(name, which, reduction, gradient_path, device, monkeypatch):
    if gradient_path == "two_pass":
        from fastloss.metric import _losses

        monkeypatch.setattr(_losses, "_wants_grad", lambda *tensors: False)
    e, y = _batch(device, which)
    loss = LOSSES[name](e, y, reduction=reduction)
    assert torch.isnan(loss).all(), f"{name}: a NaN in the embeddings gave the loss {loss}"
    (grad,) = torch.autograd.grad(loss.sum(), e)
    assert torch.isnan(grad).all(), f"{name}: the gradient has {int((~grad.isnan()).sum())} entries that are not NaN"


@pytest.mark.parametrize("which", ["one_row", "all"])
def test_nan_reference_embeddings_give_a_nan_loss(which, device):
    r, ry = _batch(device, which)
    g = torch.Generator().manual_seed(4)
    e = torch.randn(10, 16, generator=g, dtype=r.dtype).to(device).requires_grad_()
    y = (torch.arange(10) % 4).to(device)
    for name, fn in LOSSES.items():
        loss = fn(e, y, ref_emb=r, ref_labels=ry)
        assert torch.isnan(loss), f"{name}: a NaN in ref_emb gave the loss {loss}"
        grads = torch.autograd.grad(loss, [e, r])
        assert all(torch.isnan(grad).all() for grad in grads), f"{name}: a gradient is not NaN"


@pytest.mark.sim_no_launch  # plain torch: no kernel
@pytest.mark.parametrize("which", ["one_row", "all"])
@pytest.mark.parametrize("name", list(TORCH_PATH))
def test_nan_embeddings_on_the_torch_path(name, which, device):
    e, y = _batch(device, which)
    loss = TORCH_PATH[name](e, y)
    assert torch.isnan(loss), f"{name}: a NaN in the embeddings gave the loss {loss}"
    (grad,) = torch.autograd.grad(loss, e)
    assert torch.isnan(grad).all(), f"{name}: the gradient is not NaN everywhere"


def test_finite_embeddings_keep_finite_losses_and_gradients(device):
    """The guard adds nothing when the inputs are finite, also in 16-bit where a sum could overflow."""
    dtypes = [torch.float32, torch.float16] if is_gpu(device) else [torch.float64, torch.float16]
    for dtype in dtypes:
        g = torch.Generator().manual_seed(5)
        e = (200 * torch.rand(512, 64, generator=g)).to(device, dtype).requires_grad_()  # sum ~ 3e6 > fp16 max
        y = (torch.arange(512) % 8).to(device)
        for name, fn in LOSSES.items():
            loss = fn(e, y)
            (grad,) = torch.autograd.grad(loss, e)
            assert torch.isfinite(loss) and torch.isfinite(grad).all(), f"{name} {dtype}: not finite"
