"""pytorch-metric-learning's options for the label losses, read and checked: ``distance=`` (a name
or a PML distance object), ``indices_tuple`` (a miner's pairs or triplets), ``reduction``; and the
NaN guard that makes a NaN anywhere in the embeddings reach the loss and its gradient."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch

from .. import _validate as V

# The PML distance classes whose matrix we compute, by exact class name (a subclass may override
# compute_mat, so it is not accepted on the name of its base).
_PML_DISTANCES = ("LpDistance", "CosineSimilarity", "DotProductSimilarity")
DISTANCE_NAMES = ("euclidean", "cosine", "dot")

IndicesTuple = Union[tuple, list]
DistanceArg = Union[str, object]


@dataclass(frozen=True)
class Distance:
    """A pair measure: ``similarity`` (dot product of the possibly normalized embeddings, larger is
    closer: PML's ``CosineSimilarity`` / ``DotProductSimilarity``) or the euclidean distance (PML's
    ``LpDistance(p=2, power=1)``); ``normalize``: l2-normalize the embeddings first."""

    similarity: bool
    normalize: bool

    @property
    def name(self) -> str:
        if self.similarity:
            return "cosine" if self.normalize else "dot"
        return "euclidean" if self.normalize else "euclidean (unnormalized)"


def distance(fn: str, value: DistanceArg, normalize_embeddings: Optional[bool]) -> Distance:
    """``value``: "euclidean", "cosine", "dot" or a PML distance object (its ``p``, ``power`` and
    ``normalize_embeddings`` are read); ``normalize_embeddings`` (None: the distance's own) must
    agree with an object's."""
    if normalize_embeddings is not None and not isinstance(normalize_embeddings, bool):
        raise TypeError(f"fastloss.{fn}: argument 'normalize_embeddings' must be a bool or None, got "
                        f"{type(normalize_embeddings).__name__}")  # fmt: skip
    if isinstance(value, str):
        if value not in DISTANCE_NAMES:
            raise ValueError(f"fastloss.{fn}: argument 'distance' must be one of {DISTANCE_NAMES} or a "
                             f"pytorch-metric-learning distance ({', '.join(_PML_DISTANCES)}), "
                             f"got {value!r}")  # fmt: skip
        if value == "cosine" and normalize_embeddings is False:
            raise ValueError(f"fastloss.{fn}: distance='cosine' normalizes the embeddings; for the plain dot product "
                             "use distance='dot'")  # fmt: skip
        default = value != "dot"
        normalize = default if normalize_embeddings is None else normalize_embeddings
        return Distance(similarity=value != "euclidean", normalize=normalize)
    kind = type(value).__name__
    if kind not in _PML_DISTANCES or not type(value).__module__.startswith("pytorch_metric_learning"):
        raise ValueError(f"fastloss.{fn}: argument 'distance' must be one of {DISTANCE_NAMES} or one of "
                         f"pytorch-metric-learning's {', '.join(_PML_DISTANCES)}, got {kind}")  # fmt: skip
    power, p = getattr(value, "power", 1), getattr(value, "p", 2)
    if power != 1:
        raise ValueError(f"fastloss.{fn}: {kind}(power={power}) is not supported (only power=1)")
    if kind == "LpDistance" and p != 2:
        raise ValueError(f"fastloss.{fn}: LpDistance(p={p}) is not supported (only p=2, the euclidean distance)")
    own = bool(getattr(value, "normalize_embeddings", True))
    if normalize_embeddings is not None and normalize_embeddings != own:
        raise ValueError(f"fastloss.{fn}: normalize_embeddings={normalize_embeddings} contradicts the distance "
                         f"{kind}(normalize_embeddings={own}); set it on one of them")  # fmt: skip
    return Distance(similarity=kind != "LpDistance", normalize=own)


def reduction(fn: str, value: object) -> str:
    return V.reduction(fn, value)


def indices_tuple(fn: str, value: Optional[IndicesTuple], n: int, m: int,
                  device: torch.device) -> Optional[tuple[torch.Tensor, ...]]:  # fmt: skip
    """A PML miner's output: (anchor, positive, negative) triplets or (anchor1, positive, anchor2,
    negative) pairs, 1-D integer tensors on the embeddings' device, anchors < n and the others < m
    (checked on the host except on CUDA, where it would be a sync: there use
    fastloss.set_target_checks(True) to have it checked)."""
    if value is None:
        return None
    if not isinstance(value, (tuple, list)) or len(value) not in (3, 4):
        raise TypeError(f"fastloss.{fn}: argument 'indices_tuple' must be a tuple of 3 tensors (anchors, positives, "
                        f"negatives) or 4 (anchors1, positives, anchors2, negatives), as PML's miners return, got "
                        f"{type(value).__name__}{'' if not isinstance(value, (tuple, list)) else f' of {len(value)}'}")
    names = ("anchors", "positives", "negatives") if len(value) == 3 else ("anchors1", "positives", "anchors2",
                                                                            "negatives")  # fmt: skip
    out = []
    for name, t in zip(names, value):
        if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.dtype.is_floating_point or t.dtype.is_complex \
                or t.dtype == torch.bool:  # fmt: skip
            raise TypeError(f"fastloss.{fn}: 'indices_tuple' {name} must be a 1-D integer tensor, got "
                            f"{t.dtype if isinstance(t, torch.Tensor) else type(t).__name__}"
                            f"{' ' + str(tuple(t.shape)) if isinstance(t, torch.Tensor) else ''}")  # fmt: skip
        if t.device != device:
            raise ValueError(f"fastloss.{fn}: 'indices_tuple' {name} is on {t.device}, the embeddings on {device}")
        out.append(t.to(torch.int64))
    lengths = [len(t) for t in out]
    if (len(out) == 3 and len(set(lengths)) != 1) or (len(out) == 4 and (lengths[0] != lengths[1]
                                                                          or lengths[2] != lengths[3])):
        raise ValueError(f"fastloss.{fn}: 'indices_tuple' {names} must pair up, got lengths {lengths}")
    from .._library import may_inspect_values

    for name, t in zip(names, out):
        limit = n if name.startswith("anchors") else m
        if t.numel() and may_inspect_values(t) and (int(t.min()) < 0 or int(t.max()) >= limit):
            raise ValueError(f"fastloss.{fn}: 'indices_tuple' {name} must be in [0, {limit}), got "
                             f"[{int(t.min())}, {int(t.max())}]")  # fmt: skip
    return tuple(out)


def nan_guard(loss: torch.Tensor, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
    """``loss`` made NaN (and its gradient NaN) when any input holds a NaN or an infinity, with no host
    read: the kernels' and PML's comparisons (mining, ``loss > 0`` counts, max/min, hinges) would
    otherwise drop a NaN pair and report a finite loss on a diverged run. The flag is 0 for finite
    inputs (a float32 sum, so 16-bit inputs do not overflow) and NaN otherwise; multiplying it by
    the inputs' sum puts it on the autograd path, so the gradient of every input is NaN too."""
    if not inputs:
        return loss
    total = inputs[0].sum(dtype=torch.float32)
    for t in inputs[1:]:
        total = total + t.sum(dtype=torch.float32)
    flag = total.detach() * 0
    return loss + (flag * total).to(loss.dtype)
