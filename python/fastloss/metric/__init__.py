"""Pairwise metric-learning and contrastive losses as fused row-block kernels: the B x B similarity
matrix is never materialized, labels enter as integer vectors.

Kernels: ``csrc/metric/``; ops: :mod:`fastloss.metric._ops`; modules: ``fastloss.nn`` (InfoNCELoss,
NTXentLoss, SupConLoss, MultiSimilarityLoss, CircleLoss, ContrastiveLoss, TripletMarginLoss).
"""

from __future__ import annotations

from ._losses import (auc_loss, circle, contrastive, decoupled_softmax, info_nce, multi_similarity, nt_xent, supcon,
                      triplet)  # fmt: skip

__all__ = ["info_nce", "nt_xent", "supcon", "multi_similarity", "contrastive", "triplet", "circle", "auc_loss",
           "decoupled_softmax"]  # fmt: skip
# The family keeps one namespace, fastloss.metric.* (fastloss.circle would read ambiguously).
__fastloss_exports__: tuple[str, ...] = ()
