"""Float64 references of the metric family written plainly in PyTorch with the full similarity
matrix (the label-based losses are also checked against pytorch-metric-learning in the tests), and
the self-check that compares the kernels with them."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .._library import is_cuda_device
from .._registry import SelfCheck, register_self_check, relative_error


def similarities(query, key, normalize=True):
    q, k = query.double(), key.double()
    if normalize:
        q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
    return q @ k.T


def info_nce(query, key, *, temperature=0.07, labels=None, symmetric=False, logit_scale=None, normalize=True):
    scale = (1.0 / temperature) if logit_scale is None else logit_scale.double()
    logits = scale * similarities(query, key, normalize)
    targets = torch.arange(query.shape[0]) if labels is None else labels
    rows = F.cross_entropy(logits, targets)
    if not symmetric:
        return rows
    return 0.5 * (rows + F.cross_entropy(logits.T, targets))


def nt_xent(embeddings, labels, *, temperature=0.07):
    """Per positive pair -log(e^{s_p} / (e^{s_p} + sum_neg e^{s_n})), mean over positive pairs."""
    s = similarities(embeddings, embeddings) / temperature
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(len(labels), dtype=torch.bool)
    pos, neg = same & ~eye, ~same
    if not bool(pos.any()) or not bool(neg.any()):
        return s.sum() * 0
    neg_lse = torch.logsumexp(s.masked_fill(~neg, -float("inf")), dim=1, keepdim=True)
    pair = F.softplus(neg_lse - s)
    pair = torch.where(torch.isfinite(neg_lse).expand_as(s), pair, torch.zeros_like(pair))
    return pair[pos].sum() / pos.sum()


def auc_loss(query, key, *, labels=None, temperature=1.0, normalize=True):
    s = similarities(query, key, normalize)
    targets = torch.arange(query.shape[0]) if labels is None else labels
    positive = s.gather(1, targets[:, None])
    negative = torch.ones_like(s, dtype=torch.bool).scatter_(1, targets[:, None], False)
    terms = F.softplus((s - positive) / temperature) * negative
    return (terms.sum(1) / negative.sum(1).clamp_min(1)).mean()


def decoupled_softmax(query, keys, positives, *, temperature=0.05, normalize=True):
    """positives: (n, m) bool mask."""
    logits = similarities(query, keys, normalize) / temperature
    z = torch.logsumexp(logits.masked_fill(positives, -float("inf")), dim=1, keepdim=True)
    pair = torch.where(positives, F.softplus(z - logits), torch.zeros_like(logits))
    return (pair.sum(1) / positives.sum(1).clamp_min(1)).mean()


def _self_check(device: torch.device, dtype: torch.dtype) -> tuple[float, float]:
    from .. import metric

    if is_cuda_device(device) and dtype == torch.float64:  # the CUDA kernels compute in float32 at most
        dtype = torch.float32
    g = torch.Generator().manual_seed(0)
    q = torch.randn(50, 32, generator=g).to(device, dtype)
    k = torch.randn(50, 32, generator=g).to(device, dtype)
    labels = torch.randint(0, 5, (50,), generator=g).to(device)
    ours = torch.stack([metric.info_nce(q, k, symmetric=True), metric.nt_xent(q, labels)])
    expected = torch.stack([info_nce(q.cpu(), k.cpu(), symmetric=True), nt_xent(q.cpu(), labels.cpu())])
    tol = {torch.float64: 1e-10, torch.float32: 1e-5}.get(dtype, 2e-2)
    return relative_error(ours, expected), tol


register_self_check(SelfCheck("metric.info_nce + nt_xent", _self_check))
