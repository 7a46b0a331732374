"""Modules of the metric family: the losses of ``fastloss.metric`` with their hyperparameters held,
called like pytorch-metric-learning's (``loss(embeddings, labels, ref_emb=None, ref_labels=None)``)
or like a CLIP loss (``loss(query, key)``)."""

from __future__ import annotations

import math

import torch

from .. import metric as M

__all__ = ["InfoNCELoss", "NTXentLoss", "SupConLoss", "MultiSimilarityLoss", "CircleLoss", "ContrastiveLoss",
           "TripletMarginLoss", "AUCLoss", "DecoupledSoftmaxLoss"]  # fmt: skip


class InfoNCELoss(torch.nn.Module):
    """``fastloss.metric.info_nce``. With ``learnable_scale=True`` it holds CLIP's logit scale as a
    parameter ``log_scale`` (initialized to log(1 / temperature)); the multiplier is
    ``exp(log_scale)`` clamped at ``max_scale`` (CLIP: 100)."""

    def __init__(self, temperature: float = 0.07, *, symmetric: bool = False, learnable_scale: bool = False,
                 max_scale: float = 100.0, normalize: bool = True, reduction: str = "mean") -> None:  # fmt: skip
        super().__init__()
        self.temperature, self.symmetric, self.normalize, self.reduction = temperature, symmetric, normalize, reduction
        self.max_scale = max_scale
        self.log_scale = torch.nn.Parameter(torch.tensor(math.log(1.0 / temperature))) if learnable_scale else None

    def forward(self, query, key, labels=None):
        scale = None if self.log_scale is None else self.log_scale.exp().clamp(max=self.max_scale)
        return M.info_nce(query, key, temperature=self.temperature, labels=labels, symmetric=self.symmetric,
                          logit_scale=scale, normalize=self.normalize, reduction=self.reduction)  # fmt: skip


class _LabelLoss(torch.nn.Module):
    fn = staticmethod(lambda *a, **k: None)

    def __init__(self, **options) -> None:
        super().__init__()
        self.options = options

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.options.items())

    def forward(self, embeddings, labels, ref_emb=None, ref_labels=None, process_group=None):
        return type(self).fn(embeddings, labels, ref_emb=ref_emb, ref_labels=ref_labels, process_group=process_group,
                             **self.options)  # fmt: skip


class NTXentLoss(_LabelLoss):
    """``fastloss.metric.nt_xent`` (pytorch-metric-learning's NTXentLoss semantics)."""

    fn = staticmethod(M.nt_xent)

    def __init__(self, temperature: float = 0.07) -> None:
        super().__init__(temperature=temperature)


class SupConLoss(_LabelLoss):
    """``fastloss.metric.supcon`` (SupConLoss semantics)."""

    fn = staticmethod(M.supcon)

    def __init__(self, temperature: float = 0.1) -> None:
        super().__init__(temperature=temperature)


class MultiSimilarityLoss(_LabelLoss):
    """``fastloss.metric.multi_similarity``; with ``mining=True`` the MultiSimilarityMiner is fused."""

    fn = staticmethod(M.multi_similarity)

    def __init__(self, alpha: float = 2.0, beta: float = 50.0, base: float = 0.5, epsilon: float = 0.1,
                 mining: bool = True) -> None:  # fmt: skip
        super().__init__(alpha=alpha, beta=beta, base=base, epsilon=epsilon, mining=mining)


class CircleLoss(_LabelLoss):
    """``fastloss.metric.circle`` (CircleLoss semantics)."""

    fn = staticmethod(M.circle)

    def __init__(self, m: float = 0.25, gamma: float = 256.0) -> None:
        super().__init__(m=m, gamma=gamma)


class ContrastiveLoss(_LabelLoss):
    """``fastloss.metric.contrastive`` (ContrastiveLoss semantics)."""

    fn = staticmethod(M.contrastive)

    def __init__(self, pos_margin: float = 0.0, neg_margin: float = 1.0, distance: str = "euclidean") -> None:
        super().__init__(pos_margin=pos_margin, neg_margin=neg_margin, distance=distance)


class TripletMarginLoss(_LabelLoss):
    """``fastloss.metric.triplet`` (TripletMarginLoss semantics, with its miners fused)."""

    fn = staticmethod(M.triplet)

    def __init__(self, margin: float = 0.05, mining: str = "all", mining_margin: float | None = None) -> None:
        super().__init__(margin=margin, mining=mining, mining_margin=mining_margin)


class AUCLoss(torch.nn.Module):
    """``fastloss.metric.auc_loss`` (the MW loss)."""

    def __init__(self, temperature: float = 1.0, normalize: bool = True) -> None:
        super().__init__()
        self.temperature, self.normalize = temperature, normalize

    def forward(self, query, key, labels=None):
        return M.auc_loss(query, key, labels=labels, temperature=self.temperature, normalize=self.normalize)


class DecoupledSoftmaxLoss(torch.nn.Module):
    """``fastloss.metric.decoupled_softmax`` (DEXML)."""

    def __init__(self, temperature: float = 0.05, normalize: bool = True) -> None:
        super().__init__()
        self.temperature, self.normalize = temperature, normalize

    def forward(self, query, keys, positives):
        return M.decoupled_softmax(query, keys, positives, temperature=self.temperature, normalize=self.normalize)
