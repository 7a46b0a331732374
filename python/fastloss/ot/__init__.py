"""Optimal transport: batched log-domain Sinkhorn on cost matrices and on point clouds, the
Sinkhorn divergence, balanced (SwAV) assignment and sparsity-constrained quadratic OT.

Kernels: ``csrc/ot/``; ops: :mod:`fastloss.ot._ops`; design notes: ``docs/ot.md``; modules:
``fastloss.nn.SinkhornLoss``, ``fastloss.nn.SinkhornDivergence``.
"""

from __future__ import annotations

from ._assignment import balanced_assignment
from ._divergence import sinkhorn_divergence
from ._sinkhorn import SinkhornResult, sinkhorn, sinkhorn_points
from ._sparse import SparseOTResult, sparse_ot

__all__ = [
    "sinkhorn",
    "sinkhorn_points",
    "sinkhorn_divergence",
    "balanced_assignment",
    "sparse_ot",
    "SinkhornResult",
    "SparseOTResult",
]
# fastloss.sinkhorn would also read well, but the family keeps one namespace: fastloss.ot.*.
__fastloss_exports__: tuple[str, ...] = ()
