"""The label losses in plain torch on the full (n, m) matrix of the chosen distance, for what the
fused kernels do not cover: a miner's ``indices_tuple`` (PML's semantics: the loss over exactly those
pairs or triplets) and the distances they lack (unnormalized euclidean, dot product, cosine triplets).
Memory is O(n m) (O(n m^2) for triplets without a 3-tuple), as in pytorch-metric-learning.

Pairs are held as count matrices (how many times the tuple lists each (anchor, reference) pair), so
a repeated pair weighs as often as PML's pair-based losses count it, while its matrix-based losses
(SupCon, Multi-Similarity, Circle) see only whether a pair is listed. Everything here is decided on
the device: no host reads.

Each function returns (per-anchor losses (n,), PML's reduced loss); ``reduce`` picks one."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ._pml_options import Distance


def matrix(x: torch.Tensor, y: torch.Tensor, dist: Distance) -> torch.Tensor:
    """(n, m) similarities or euclidean distances in the accumulator type (float64 stays float64).
    Distances are the exact differences (not |x|^2 + |y|^2 - 2 x.y), so near-duplicates keep their
    relative accuracy; torch.cdist gives a zero gradient at distance 0."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    x, y = x.to(acc), y.to(acc)
    if dist.normalize:
        x, y = F.normalize(x, dim=1), F.normalize(y, dim=1)
    if dist.similarity:
        return x @ y.T
    return torch.cdist(x, y, compute_mode="donot_use_mm_for_euclid_dist")


class PairSet:
    """Positive and negative pair counts (n, m): from labels (every pair, without (i, i) when the
    references are the embeddings themselves) or from PML's indices_tuple (pairs, or triplets as
    (a, p, a, n) as PML converts them)."""

    def __init__(self, n: int, m: int, like: torch.Tensor, labels: Optional[torch.Tensor],
                 ref_labels: Optional[torch.Tensor], self_paired: bool,
                 indices: Optional[tuple[torch.Tensor, ...]]) -> None:  # fmt: skip
        self.triplets = indices if indices is not None and len(indices) == 3 else None
        self.listed: tuple[torch.Tensor | int, torch.Tensor | int]  # how many pairs each list holds
        if indices is None:
            assert labels is not None and ref_labels is not None  # (checked by the caller)
            same = labels[:, None] == ref_labels[None, :]
            diff = ~same
            if self_paired:
                eye = torch.eye(n, m, dtype=torch.bool, device=like.device)
                same = same & ~eye
            self.pos, self.neg = same.to(like.dtype), diff.to(like.dtype)
            self.listed = (self.pos.sum(), self.neg.sum())
            return
        a1, p, a2, n_idx = (indices[0], indices[1], indices[0], indices[2]) if len(indices) == 3 else indices
        self.pos = like.new_zeros((n, m)).index_put_((a1, p), like.new_ones(a1.shape), accumulate=True)
        self.neg = like.new_zeros((n, m)).index_put_((a2, n_idx), like.new_ones(a2.shape), accumulate=True)
        self.listed = (a1.shape[0], a2.shape[0])

    def too_few(self) -> torch.Tensor | bool:
        """PML's zero loss when neither list has more than one pair (GenericPairLoss)."""
        p, n = self.listed
        if isinstance(p, torch.Tensor) and isinstance(n, torch.Tensor):
            return (p <= 1) & (n <= 1)
        return bool(p <= 1) and bool(n <= 1)


def _where(cond, zero_like: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    if isinstance(cond, torch.Tensor):
        return torch.where(cond, zero_like * 0, value)
    return zero_like * 0 if cond else value


def _mean_nonzero(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """PML's AvgNonZeroReducer over weighted elements: the mean over those > 0, 0 when none."""
    count = (weights * (values > 0)).sum()
    total = (weights * values).sum()
    return torch.where(count > 0, total / count.clamp(min=1), total * 0)


def _masked_lse(values: torch.Tensor, mask: torch.Tensor, add_one: bool) -> torch.Tensor:
    """Per row log(sum over mask of e^v (+ 1)); a row with an empty mask and no extra 1 gives 0, as
    PML's lmu.logsumexp."""
    live = mask.any(dim=1, keepdim=True)
    if add_one:
        v = torch.cat([values.masked_fill(~mask, float("-inf")), values.new_zeros((values.shape[0], 1))], dim=1)
        return torch.logsumexp(v, dim=1)
    # An empty row is filled with zeros rather than -inf: logsumexp's backward over a row of -inf is
    # NaN even where the row is not used.
    v = values.masked_fill(~mask & live, float("-inf")).masked_fill(~live, 0.0)
    out = torch.logsumexp(v, dim=1)
    return torch.where(live[:, 0], out, out.new_zeros(()))


def nt_xent(mat: torch.Tensor, pairs: PairSet, temperature: float):
    """Each positive pair against its anchor's listed negatives (repeats counted, as PML)."""
    s = mat / temperature
    live = (pairs.neg > 0).any(dim=1, keepdim=True)
    # log(0) = -inf leaves a pair out; a row without negatives is filled with zeros instead (see
    # _masked_lse) and its pairs' loss is log(1) = 0.
    neg_lse = torch.logsumexp(torch.where(live, s + pairs.neg.log(), s * 0), dim=1, keepdim=True)
    per_pair = torch.where(live, F.softplus(neg_lse - s), s * 0)
    rows = (pairs.pos * per_pair).sum(dim=1)
    count = pairs.pos.sum()
    empty = (count == 0) | (pairs.neg.sum() == 0)
    mean = torch.where(empty, rows.sum() * 0, rows.sum() / count.clamp(min=1))
    return rows, _where(pairs.too_few(), rows.sum(), mean)


def supcon(mat: torch.Tensor, pairs: PairSet, temperature: float):
    pos, neg = pairs.pos > 0, pairs.neg > 0
    s = mat / temperature
    log_prob = s - _masked_lse(s, pos | neg, add_one=False)[:, None]
    rows = -(pos * log_prob).sum(dim=1) / pos.sum(dim=1).clamp(min=1)
    empty = ~(pos.any() & neg.any())
    rows = torch.where(empty, rows * 0, rows)
    return rows, _where(pairs.too_few(), rows.sum(), _mean_nonzero(rows, torch.ones_like(rows)))


def multi_similarity(mat: torch.Tensor, pairs: PairSet, alpha: float, beta: float, base: float):
    pos, neg = pairs.pos > 0, pairs.neg > 0
    rows = _masked_lse(-alpha * (mat - base), pos, add_one=True) / alpha + \
        _masked_lse(beta * (mat - base), neg, add_one=True) / beta
    return rows, _where(pairs.too_few(), rows.sum(), rows.mean() if rows.numel() else rows.sum())


def circle(mat: torch.Tensor, pairs: PairSet, m: float, gamma: float):
    pos, neg = pairs.pos > 0, pairs.neg > 0
    s = mat.detach()
    logits = torch.where(pos, -gamma * torch.relu(1 + m - s) * (mat - (1 - m)),
                         gamma * torch.relu(s + m) * (mat - m))  # fmt: skip
    rows = F.softplus(_masked_lse(logits, pos, add_one=False) + _masked_lse(logits, neg, add_one=False))
    rows = torch.where(pos.any(dim=1) & neg.any(dim=1), rows, rows * 0)
    return rows, _where(pairs.too_few(), rows.sum(), _mean_nonzero(rows, torch.ones_like(rows)))


def contrastive(mat: torch.Tensor, pairs: PairSet, pos_margin: float, neg_margin: float, dist: Distance):
    pos_loss = torch.relu(pos_margin - mat if dist.similarity else mat - pos_margin)
    neg_loss = torch.relu(mat - neg_margin if dist.similarity else neg_margin - mat)
    rows = (pairs.pos * pos_loss).sum(dim=1) + (pairs.neg * neg_loss).sum(dim=1)
    mean = _mean_nonzero(pos_loss, pairs.pos) + _mean_nonzero(neg_loss, pairs.neg)
    return rows, _where(pairs.too_few(), rows.sum(), mean)


def _hardest(mat: torch.Tensor, mask: torch.Tensor, largest: bool) -> torch.Tensor:
    fill = float("-inf") if largest else float("inf")
    values = mat.masked_fill(~mask, fill)
    return values.max(dim=1).values if largest else values.min(dim=1).values


def triplet(mat: torch.Tensor, pairs: PairSet, margin: float, mining: str, mining_margin: float, dist: Distance):
    """Per triplet relu(margin(ap, an) + margin) with PML's margin (an - ap for a similarity,
    ap - an for a distance), over a 3-tuple's triplets, every (a, p, n) of the pair counts, or the
    fused miners' choice (batch_hard, semi_hard), averaged over the nonzero ones."""
    def violation(ap, an):
        return (an - ap if dist.similarity else ap - an) + margin

    n = mat.shape[0]
    if pairs.triplets is not None:
        a, p, neg = pairs.triplets
        losses = torch.relu(violation(mat[a, p], mat[a, neg]))
        rows = mat.new_zeros(n).index_add(0, a, losses)
        return rows, _mean_nonzero(losses, torch.ones_like(losses))
    pos_mask, neg_mask = pairs.pos > 0, pairs.neg > 0
    if mining == "batch_hard":  # the hardest positive and negative of each anchor
        hp = _hardest(mat, pos_mask, largest=not dist.similarity)
        hn = _hardest(mat, neg_mask, largest=dist.similarity)
        live = pos_mask.any(dim=1) & neg_mask.any(dim=1)
        losses = torch.relu(violation(torch.where(live, hp, hp.new_zeros(())), torch.where(live, hn, hn.new_zeros(()))))
        losses = torch.where(live, losses, losses * 0)
        return losses, _mean_nonzero(losses, live.to(losses.dtype))
    weights = pairs.pos[:, :, None] * pairs.neg[:, None, :]  # (n, m, m): anchor, positive, negative
    ap, an = mat[:, :, None], mat[:, None, :]
    losses = torch.relu(violation(ap, an))
    if mining == "semi_hard":  # 0 < gap <= mining_margin, gap = an - ap (distances) or ap - an
        gap = (ap - an) if dist.similarity else (an - ap)
        weights = weights * ((gap > 0) & (gap <= mining_margin)).to(weights.dtype)
    rows = (weights * losses).sum(dim=(1, 2))
    return rows, _mean_nonzero(losses, weights)


def reduce(rows: torch.Tensor, mean: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return rows
    return rows.sum() if reduction == "sum" else mean
