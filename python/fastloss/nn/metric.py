"""Modules of the metric family: the losses of ``fastloss.metric`` with their hyperparameters held,
called like pytorch-metric-learning's (``loss(embeddings, labels, indices_tuple, ref_emb, ref_labels)``)
or like a CLIP loss (``loss(query, key)``)."""

from __future__ import annotations

import math
import warnings
from typing import TYPE_CHECKING, Optional

import torch
from torch import Tensor

from .. import metric as M
from ..metric._pml_options import DistanceArg, IndicesTuple

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

__all__ = ["InfoNCELoss", "NTXentLoss", "SupConLoss", "MultiSimilarityLoss", "CircleLoss", "ContrastiveLoss",
           "TripletMarginLoss", "AUCLoss", "DecoupledSoftmaxLoss"]  # fmt: skip


class InfoNCELoss(torch.nn.Module):
    """``fastloss.metric.info_nce`` as a module, with open_clip's learnable logit scale.

    With ``learnable_scale=True`` it holds the parameter ``logit_scale``, the log of the multiplier, as
    open_clip's ``CLIP`` model does (same name and meaning, so that entry of an open_clip state dict
    loads here), initialized to ``log(1 / temperature)``; the multiplier is ``exp(logit_scale)`` clamped
    at ``max_scale`` (CLIP: 100). A state dict saved by earlier fastloss versions, where the parameter
    was named ``log_scale``, still loads. Without it, the temperature is fixed, or the multiplier is
    passed per call (``scale=``, as open_clip's ``ClipLoss`` takes its ``logit_scale`` argument)."""

    logit_scale: torch.nn.Parameter | None

    def __init__(self, temperature: float = 0.07, *, symmetric: bool = False, learnable_scale: bool = False,
                 max_scale: float = 100.0, normalize: bool = True, reduction: str = "mean") -> None:  # fmt: skip
        super().__init__()
        self.temperature, self.symmetric, self.normalize, self.reduction = temperature, symmetric, normalize, reduction
        self.max_scale = max_scale
        if learnable_scale:
            self.logit_scale = torch.nn.Parameter(torch.tensor(math.log(1.0 / temperature)))
        else:
            self.register_parameter("logit_scale", None)

    @property
    def log_scale(self) -> torch.nn.Parameter | None:
        """The former name of ``logit_scale`` (deprecated: open_clip's name is ``logit_scale``)."""
        warnings.warn("fastloss.nn.InfoNCELoss: 'log_scale' is now named 'logit_scale' (open_clip's name, same value: "
                      "the log of the multiplier); use that", FutureWarning, stacklevel=2)  # fmt: skip
        return self.logit_scale

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:  # fmt: skip
        # Earlier fastloss versions saved the same parameter (the log of the multiplier) as "log_scale".
        old, new = prefix + "log_scale", prefix + "logit_scale"
        if old in state_dict and new not in state_dict:
            state_dict[new] = state_dict.pop(old)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)  # fmt: skip

    def forward(self, query: torch.Tensor, key: torch.Tensor, labels: torch.Tensor | None = None, *,
                scale: torch.Tensor | float | None = None) -> torch.Tensor:  # fmt: skip
        """The InfoNCE loss of queries ``(n, d)`` against keys ``(m, d)``.

        ``labels`` ``(n,)`` int: query i's positive key (None: key i). ``scale``: the multiplier of the
        logits for this call (open_clip ``ClipLoss``'s third argument, ``model.logit_scale.exp()``);
        not with ``learnable_scale=True``, whose parameter gives it. Returns the loss ("mean"/"sum":
        a scalar; "none": ``(n,)``), float32 for 16-bit inputs."""
        if self.logit_scale is not None:
            if scale is not None:
                raise ValueError("fastloss.nn.InfoNCELoss: argument 'scale' is given, but the module has its own "
                                 "learnable logit_scale (learnable_scale=True)")  # fmt: skip
            return M.info_nce(query, key, labels=labels, symmetric=self.symmetric, log_scale=self.logit_scale,
                              max_scale=self.max_scale, normalize=self.normalize, reduction=self.reduction)  # fmt: skip
        return M.info_nce(query, key, labels=labels, symmetric=self.symmetric, normalize=self.normalize,
                          reduction=self.reduction, **({"temperature": self.temperature} if scale is None else
                                                       {"scale": scale}))  # fmt: skip

    def extra_repr(self) -> str:
        scale = "learnable logit_scale" if self.logit_scale is not None else f"temperature={self.temperature}"
        return f"{scale}, symmetric={self.symmetric}, normalize={self.normalize}, reduction={self.reduction!r}"


class _LabelLoss(torch.nn.Module):
    """A label loss called as pytorch-metric-learning's: ``loss(embeddings, labels, indices_tuple,
    ref_emb, ref_labels)`` in PML's positional order. Subclasses hold their hyperparameters as
    attributes and name them in ``_options`` (for the repr)."""

    _options: tuple[str, ...] = ()

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={getattr(self, k)!r}" for k in self._options)

    def _call(self, embeddings: Tensor, labels: Optional[Tensor], indices_tuple: Optional[IndicesTuple],
              ref_emb: Optional[Tensor], ref_labels: Optional[Tensor],
              process_group: Optional[ProcessGroup]) -> Tensor:  # fmt: skip
        raise NotImplementedError

    def forward(self, embeddings: Tensor, labels: Optional[Tensor] = None,
                indices_tuple: Optional[IndicesTuple] = None, ref_emb: Optional[Tensor] = None,
                ref_labels: Optional[Tensor] = None, *,
                process_group: Optional[ProcessGroup] = None) -> Tensor:  # fmt: skip
        """The loss of ``embeddings`` (batch, dim) with integer class ``labels`` (batch,), as PML's
        ``loss(embeddings, labels, indices_tuple, ref_emb, ref_labels)``: ``indices_tuple`` a PML
        miner's (anchors, positives, negatives) or (anchors1, positives, anchors2, negatives) to
        compute the loss over exactly those (``labels`` may then be None); ``ref_emb`` / ``ref_labels``
        the references the rows are paired with (default: the batch itself, without (i, i));
        ``process_group``: the references are every rank's (fused kernels only). Returns a scalar, or
        per-anchor losses (batch,) with ``reduction="none"``."""
        return self._call(embeddings, labels, indices_tuple, ref_emb, ref_labels, process_group)


class NTXentLoss(_LabelLoss):
    """``fastloss.metric.nt_xent``: PML's ``NTXentLoss(temperature=0.07)``."""

    _options = ("temperature", "reduction")

    def __init__(self, temperature: float = 0.07, *, reduction: str = "mean") -> None:
        super().__init__()
        self.temperature, self.reduction = temperature, reduction

    def _call(self, embeddings, labels, indices_tuple, ref_emb, ref_labels, process_group):
        return M.nt_xent(embeddings, labels, temperature=self.temperature, indices_tuple=indices_tuple, ref_emb=ref_emb,
                         ref_labels=ref_labels, reduction=self.reduction, process_group=process_group)  # fmt: skip


class SupConLoss(_LabelLoss):
    """``fastloss.metric.supcon``: PML's ``SupConLoss(temperature=0.1)``."""

    _options = ("temperature", "reduction")

    def __init__(self, temperature: float = 0.1, *, reduction: str = "mean") -> None:
        super().__init__()
        self.temperature, self.reduction = temperature, reduction

    def _call(self, embeddings, labels, indices_tuple, ref_emb, ref_labels, process_group):
        return M.supcon(embeddings, labels, temperature=self.temperature, indices_tuple=indices_tuple, ref_emb=ref_emb,
                        ref_labels=ref_labels, reduction=self.reduction, process_group=process_group)  # fmt: skip


class MultiSimilarityLoss(_LabelLoss):
    """``fastloss.metric.multi_similarity``: PML's ``MultiSimilarityLoss(alpha=2, beta=50, base=0.5)``
    over all pairs; ``mining=True`` fuses ``MultiSimilarityMiner(epsilon)`` (PML's usual pairing with
    it), or pass any miner's ``indices_tuple`` to ``forward``."""

    _options = ("alpha", "beta", "base", "mining", "epsilon", "reduction")

    def __init__(self, alpha: float = 2.0, beta: float = 50.0, base: float = 0.5, *, mining: bool = False,
                 epsilon: float = 0.1, reduction: str = "mean") -> None:  # fmt: skip
        super().__init__()
        self.alpha, self.beta, self.base = alpha, beta, base
        self.mining, self.epsilon, self.reduction = mining, epsilon, reduction

    def _call(self, embeddings, labels, indices_tuple, ref_emb, ref_labels, process_group):
        return M.multi_similarity(embeddings, labels, alpha=self.alpha, beta=self.beta, base=self.base,
                                  mining=self.mining, epsilon=self.epsilon, indices_tuple=indices_tuple,
                                  ref_emb=ref_emb, ref_labels=ref_labels, reduction=self.reduction,
                                  process_group=process_group)  # fmt: skip


class CircleLoss(_LabelLoss):
    """``fastloss.metric.circle``: PML's ``CircleLoss(m=0.4, gamma=80)``."""

    _options = ("m", "gamma", "reduction")

    def __init__(self, m: float = 0.4, gamma: float = 80.0, *, reduction: str = "mean") -> None:
        super().__init__()
        self.m, self.gamma, self.reduction = m, gamma, reduction

    def _call(self, embeddings, labels, indices_tuple, ref_emb, ref_labels, process_group):
        return M.circle(embeddings, labels, m=self.m, gamma=self.gamma, indices_tuple=indices_tuple, ref_emb=ref_emb,
                        ref_labels=ref_labels, reduction=self.reduction, process_group=process_group)  # fmt: skip


class ContrastiveLoss(_LabelLoss):
    """``fastloss.metric.contrastive``: PML's ``ContrastiveLoss(pos_margin=0, neg_margin=1)``;
    ``distance`` as PML's (a name, or a PML ``LpDistance`` / ``CosineSimilarity`` /
    ``DotProductSimilarity`` object)."""

    _options = ("pos_margin", "neg_margin", "distance", "normalize_embeddings", "reduction")

    def __init__(self, pos_margin: float = 0.0, neg_margin: float = 1.0, *, distance: DistanceArg = "euclidean",
                 normalize_embeddings: Optional[bool] = None, reduction: str = "mean") -> None:  # fmt: skip
        super().__init__()
        self.pos_margin, self.neg_margin = pos_margin, neg_margin
        self.distance, self.normalize_embeddings, self.reduction = distance, normalize_embeddings, reduction

    def _call(self, embeddings, labels, indices_tuple, ref_emb, ref_labels, process_group):
        return M.contrastive(embeddings, labels, pos_margin=self.pos_margin, neg_margin=self.neg_margin,
                             distance=self.distance, normalize_embeddings=self.normalize_embeddings,
                             indices_tuple=indices_tuple, ref_emb=ref_emb, ref_labels=ref_labels,
                             reduction=self.reduction, process_group=process_group)  # fmt: skip


class TripletMarginLoss(_LabelLoss):
    """``fastloss.metric.triplet``: PML's ``TripletMarginLoss(margin=0.05)`` over all triplets, with
    its miners fused (``mining="batch_hard"`` or ``"semi_hard"``) or any miner's ``indices_tuple``;
    ``distance`` as ``ContrastiveLoss``'s."""

    _options = ("margin", "mining", "mining_margin", "distance", "normalize_embeddings", "reduction")

    def __init__(self, margin: float = 0.05, *, mining: str = "all", mining_margin: Optional[float] = None,
                 distance: DistanceArg = "euclidean", normalize_embeddings: Optional[bool] = None,
                 reduction: str = "mean") -> None:  # fmt: skip
        super().__init__()
        self.margin, self.mining, self.mining_margin = margin, mining, mining_margin
        self.distance, self.normalize_embeddings, self.reduction = distance, normalize_embeddings, reduction

    def _call(self, embeddings, labels, indices_tuple, ref_emb, ref_labels, process_group):
        return M.triplet(embeddings, labels, margin=self.margin, mining=self.mining, mining_margin=self.mining_margin,
                         distance=self.distance, normalize_embeddings=self.normalize_embeddings,
                         indices_tuple=indices_tuple, ref_emb=ref_emb, ref_labels=ref_labels,
                         reduction=self.reduction, process_group=process_group)  # fmt: skip


class AUCLoss(torch.nn.Module):
    """``fastloss.metric.auc_loss`` (the MW loss) with its hyperparameters held."""

    def __init__(self, temperature: float = 1.0, normalize: bool = True, *, reduction: str = "mean") -> None:
        super().__init__()
        self.temperature, self.normalize, self.reduction = temperature, normalize, reduction

    def forward(self, query: torch.Tensor, key: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """The MW loss of queries ``(n, d)`` against keys ``(m, d)``; ``labels`` ``(n,)`` int: query i's
        positive key (None: key i). Returns a scalar, or ``(n,)`` per-query losses with
        ``reduction="none"``; float32 for 16-bit inputs."""
        return M.auc_loss(query, key, labels=labels, temperature=self.temperature, normalize=self.normalize,
                          reduction=self.reduction)  # fmt: skip


class DecoupledSoftmaxLoss(torch.nn.Module):
    """``fastloss.metric.decoupled_softmax`` (DEXML) with its hyperparameters held."""

    def __init__(self, temperature: float = 0.05, normalize: bool = True, *, reduction: str = "mean") -> None:
        super().__init__()
        self.temperature, self.normalize, self.reduction = temperature, normalize, reduction

    def forward(self, query: torch.Tensor, keys: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
        """The decoupled softmax loss of queries ``(n, d)`` against keys ``(m, d)``; ``positives``: a
        ``(n, m)`` bool mask or a ``(n, P)`` int tensor of key indices padded with -1. Returns a scalar,
        or ``(n,)`` per-query losses with ``reduction="none"``; float32 for 16-bit inputs."""
        return M.decoupled_softmax(query, keys, positives, temperature=self.temperature, normalize=self.normalize,
                                   reduction=self.reduction)  # fmt: skip
