"""NaN in gives NaN out in the query/key losses (info_nce one-way and symmetric, auc_loss,
decoupled_softmax), on the CPU and the GPU target, forward and gradient, and for a NaN logit scale;
a non-positive scale is an error (at once on the CPU, a device error on CUDA), with no host read.

The per-row NaN pattern is compared with float64 references written plainly in PyTorch: a NaN query
row makes its own row NaN (and, in symmetric CLIP, every column), a NaN key reaches every row."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import fastloss
from fastloss import metric as M

from conftest import assert_close, is_gpu

N, D = 7, 8


def _unit(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x.double(), dim=1)


def ref_info_nce(q, k, scale, symmetric):
    logits = scale * _unit(q) @ _unit(k).T
    target = torch.arange(q.shape[0])
    rows = F.cross_entropy(logits, target, reduction="none")
    return 0.5 * (rows + F.cross_entropy(logits.T, target, reduction="none")) if symmetric else rows


def ref_auc(q, k, temperature=1.0):
    s = _unit(q) @ _unit(k).T
    positive = s.diagonal().unsqueeze(1)
    negative = ~torch.eye(q.shape[0], k.shape[0], dtype=torch.bool)
    terms = F.softplus((s - positive) / temperature)
    return torch.where(negative, terms, 0).sum(1) / negative.sum(1)


def ref_decoupled(q, k, mask, temperature=0.05):
    logits = _unit(q) @ _unit(k).T / temperature
    lse_negatives = logits.masked_fill(mask, -math.inf).logsumexp(1, keepdim=True)
    terms = F.softplus(lse_negatives - logits)
    return torch.where(mask, terms, 0).sum(1) / mask.sum(1).clamp(min=1)


def _mask(n, m):
    mask = torch.eye(n, m, dtype=torch.bool)
    mask[0, 3] = True  # one query with two positives
    return mask


LOSSES = {
    "info_nce": (lambda q, k, **kw: M.info_nce(q, k, temperature=0.1, **kw), lambda q, k: ref_info_nce(q, k, 10, False)),
    "clip": (lambda q, k, **kw: M.info_nce(q, k, temperature=0.1, symmetric=True, **kw),
             lambda q, k: ref_info_nce(q, k, 10, True)),
    "auc": (lambda q, k, **kw: M.auc_loss(q, k, **kw), ref_auc),
    "decoupled": (lambda q, k, **kw: M.decoupled_softmax(q, k, _mask(q.shape[0], k.shape[0]).to(q.device), **kw),
                  lambda q, k: ref_decoupled(q, k, _mask(q.shape[0], k.shape[0]))),
}  # fmt: skip


def _poisoned(where: str, seed: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(N, D, generator=g, dtype=torch.float64), torch.randn(N, D, generator=g, dtype=torch.float64)
    if where == "one_query":
        q[2, 3] = math.nan
    elif where == "all_queries":
        q.fill_(math.nan)
    elif where == "one_key":
        k[4, 1] = math.nan
    return q.to(dtype), k.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("where", ["one_query", "all_queries", "one_key"])
@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_nan_embeddings_give_nan_loss_and_gradient(loss, where, dtype, device):
    ours, reference = LOSSES[loss]
    q, k = _poisoned(where, 3, dtype)
    expected = reference(q, k)
    assert bool(expected.isnan().any()), "the reference itself must see the NaN"
    q_dev, k_dev = q.to(device).requires_grad_(), k.to(device).requires_grad_()
    rows = ours(q_dev, k_dev, reduction="none")
    assert_close(rows, expected, 2e-5 if dtype == torch.float32 else 3e-2, f"{loss} per row, NaN in {where}")
    for reduction in ("mean", "sum"):
        value = ours(q_dev, k_dev, reduction=reduction)
        assert bool(value.isnan()), f"{loss} {reduction}: NaN in {where} gave {float(value)}"
    got = torch.autograd.grad(ours(q_dev, k_dev), (q_dev, k_dev))
    leaves = [t.double().requires_grad_() for t in (q, k)]
    want = torch.autograd.grad(reference(*leaves).mean(), leaves)
    for name, g, w in zip(("query", "key"), got, want):
        assert torch.equal(g.isnan().cpu(), w.isnan()), f"{loss}: NaN pattern of the {name} gradient, NaN in {where}"


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("name", ["scale", "log_scale", "logit_scale"])
def test_nan_scale_gives_nan_loss_and_gradients(name, symmetric, device):
    q, k = _poisoned("none", 5, torch.float32)
    q, k = q.to(device).requires_grad_(), k.to(device).requires_grad_()
    s = torch.tensor(math.nan, device=torch.device(str(device))).requires_grad_()
    value = M.info_nce(q, k, symmetric=symmetric, **{name: s})
    assert bool(value.isnan()), f"{name}=nan gave {float(value)}"
    grads = torch.autograd.grad(value, (q, k, s))
    assert all(bool(g.isnan().any()) for g in grads), "the NaN scale must reach every gradient"


def test_non_positive_scale_raises_on_the_cpu():
    q, k = _poisoned("none", 6, torch.float32)
    for name, bad in (("scale", 0.0), ("scale", -2.0), ("logit_scale", math.inf), ("log_scale", 1e5)):
        with pytest.raises(ValueError, match=f"fastloss.info_nce: argument '{name}'"):
            M.info_nce(q, k, **{name: torch.tensor(bad)})
        with pytest.raises(ValueError, match=f"fastloss.info_nce: argument '{name}'"):
            M.info_nce(q, k, **{name: bad})


def test_non_positive_scale_on_cuda_gives_nan_and_a_device_error(gpu):
    q, k = (gpu(t) for t in _poisoned("none", 7, torch.float32))
    with gpu.kernels():
        value = M.info_nce(q, k, scale=gpu(torch.tensor(-1.0)))
        assert bool(value.isnan())
        with pytest.raises(ValueError, match="fastloss.info_nce .*argument 'scale'.*finite and > 0"):
            fastloss.check_device_errors()
        fastloss.check_device_errors()  # raised once
        assert bool(M.info_nce(q, k, scale=gpu(torch.tensor(14.0))).isfinite())


@pytest.mark.parametrize("case", ["log_scale", "logit_scale", "module"])
def test_a_tensor_scale_makes_no_host_read_on_cuda(case, gpu):
    from test_sync_free import host_syncs

    def dev(*shape, seed):
        return gpu(torch.randn(*shape, generator=torch.Generator().manual_seed(seed))).requires_grad_()

    def run():
        q, k = dev(24, 16, seed=0), dev(24, 16, seed=1)
        if case == "module":
            loss = gpu(fastloss.nn.InfoNCELoss(symmetric=True, learnable_scale=True))(q, k)
        else:
            s = gpu(torch.tensor(2.6)).requires_grad_()
            loss = M.info_nce(q, k, **{case: s.exp() if case == "logit_scale" else s})
        loss.backward()

    count, what = host_syncs(run)
    assert count == 0, what
