"""The functional API of the metric family: argument checks, normalization (in torch, so autograd
differentiates it), the fused op, and the reduction each peer loss applies (pytorch-metric-learning
semantics, named per function)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Optional

import torch
import torch.nn.functional as F

from .. import _library as L
from .. import _validate as V
from . import _dense
from . import _distributed
from . import _logit_scale
from . import _ops
from . import _pml_options as O

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup



def _embeddings(fn: str, name: str, t) -> torch.Tensor:
    V.tensor(fn, name, t)
    V.dtype_in(fn, name, t, V.FLOAT_DTYPES)
    if t.dim() != 2:
        raise ValueError(f"fastloss.{fn}: argument '{name}' must be (batch, dim), got shape {tuple(t.shape)}")
    if t.shape[1] == 0:
        raise ValueError(f"fastloss.{fn}: argument '{name}' must have dim >= 1")
    return t


def _labels(fn: str, name: str, labels, length: int, device) -> torch.Tensor:
    V.tensor(fn, name, labels)
    if labels.dim() != 1 or labels.shape[0] != length:
        raise ValueError(f"fastloss.{fn}: argument '{name}' must be a 1-D tensor of length {length}, got shape "
                         f"{tuple(labels.shape)}")  # fmt: skip
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"fastloss.{fn}: argument '{name}' must hold integer class labels, got {labels.dtype}")
    if labels.device != device:
        raise ValueError(f"fastloss.{fn}: argument '{name}' is on {labels.device}, the embeddings on {device}")
    return labels.to(torch.int64)


def _normalized(t: torch.Tensor, normalize: bool) -> torch.Tensor:
    """Embeddings as the kernels take them: l2-normalized in float32 (float64 stays float64). On the
    CPU the kernels compute in that type; on CUDA 16-bit embeddings are rounded back to their type
    after the normalization, so the tensor cores read them as 16-bit."""
    acc = torch.float64 if t.dtype == torch.float64 else torch.float32
    out = F.normalize(t.to(acc), dim=1) if normalize else t.to(acc)
    return out.to(t.dtype) if L.is_cuda(t) and t.dtype in (torch.float16, torch.bfloat16) else out


def _wants_grad(*tensors) -> bool:
    """Whether the forward should also compute the gradients (the fused path): a backward is coming.
    Not while compiling, where the backward's check of a uniform upstream gradient would break the graph."""
    return (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
            and not torch.compiler.is_compiling())  # fmt: skip


def _positive(fn: str, name: str, value) -> float:
    return V.real_number(fn, name, value, positive=True)


def _check_references(fn: str, embeddings: torch.Tensor, labels: Optional[torch.Tensor],
                      ref_emb: Optional[torch.Tensor], ref_labels: Optional[torch.Tensor],
                      labels_optional: bool = False):  # fmt: skip
    """The embeddings, labels and references checked: (labels, ref_labels, self_paired) with int64
    labels. PML leaves out the pair (i, i) whenever the reference labels are the labels themselves
    (no ref_labels, or the same tensor): the two-view call loss(v1, y, ref_emb=v2, ref_labels=y)."""
    _embeddings(fn, "embeddings", embeddings)
    if labels is None and not labels_optional:
        raise ValueError(f"fastloss.{fn}: argument 'labels' is required (it may be None only with an indices_tuple)")
    checked = None if labels is None else _labels(fn, "labels", labels, embeddings.shape[0], embeddings.device)
    if ref_emb is None:
        if ref_labels is not None:
            raise ValueError(f"fastloss.{fn}: 'ref_labels' needs 'ref_emb'")
    else:
        _embeddings(fn, "ref_emb", ref_emb)
        V.same_device(fn, embeddings=embeddings, ref_emb=ref_emb)
        if ref_emb.shape[1] != embeddings.shape[1] or ref_emb.dtype != embeddings.dtype:
            raise ValueError(f"fastloss.{fn}: 'ref_emb' {tuple(ref_emb.shape)} {ref_emb.dtype} does not match the "
                             f"embeddings {tuple(embeddings.shape)} {embeddings.dtype}")  # fmt: skip
    self_paired = ref_emb is None or ref_labels is None or ref_labels is labels
    if ref_emb is not None and self_paired and ref_emb.shape[0] != embeddings.shape[0]:
        raise ValueError(f"fastloss.{fn}: with ref_labels None or the labels themselves, 'ref_emb' must have as "
                         f"many rows as the embeddings ({embeddings.shape[0]}), got {ref_emb.shape[0]}")  # fmt: skip
    if ref_emb is None or self_paired:
        ref_checked = checked
    else:
        ref_checked = _labels(fn, "ref_labels", ref_labels, ref_emb.shape[0], ref_emb.device)
    return checked, ref_checked, self_paired


class _Pairs:
    """Rows (queries) against columns (references) with class labels: the reference set is the
    batch itself unless ref_emb is given, and with a process group the columns are every rank's."""

    def __init__(self, fn, embeddings, labels, ref_emb, ref_labels, process_group, normalize=True):
        self.labels, ref_checked, self_paired = _check_references(fn, embeddings, labels, ref_emb, ref_labels)
        x = _normalized(embeddings, normalize)
        if ref_emb is None:
            y, y_labels, self_offset = x, self.labels, 0
        else:
            y = _normalized(ref_emb, normalize)
            y_labels, self_offset = (self.labels, 0) if self_paired else (ref_checked, -1)
        self.empty = x.shape[0] == 0 or y.shape[0] == 0
        self.group = _distributed.Group(fn, process_group)
        if self.group.active:
            offset = self.group.rank_offset(x.shape[0])
            y = self.group.gather_with_grad(y)
            y_labels = self.group.gather(y_labels)
            self_offset = offset if self_offset >= 0 else -1
        self.x, self.y, self.y_labels, self.self_offset = x, y, y_labels, self_offset

    def run(self, kind: str, scale: float, p1=0.0, p2=0.0, p3=0.0, option=0, fused_ok: bool = True):
        """The kernel's (terms, counts, stats, ...). ``fused_ok``: the caller reduces the rows' first
        terms by a mean or a sum (a uniform upstream gradient), so the forward may compute the
        gradient (not for reduction="none")."""
        if self.empty:  # no rows or no references: no pairs; PML's zero loss
            zeros = self.x.new_zeros((self.x.shape[0], _ops.ROW_TERMS))
            return zeros + 0 * self.x.sum(), zeros.clone(), self.x.new_zeros((self.x.shape[0], _ops.ROW_STATS))
        scale_t = torch.tensor(scale, dtype=torch.float64)
        fused = fused_ok and kind != "contrastive" and _wants_grad(self.x, self.y)
        return _ops.forward(self.x, self.y, self.labels, self.y_labels, None, None, None, scale_t, self.self_offset,
                            _ops.KINDS[kind], float(p1), float(p2), float(p3), int(option), False, fused)  # fmt: skip

    def finish(self, rows: torch.Tensor, mean: torch.Tensor, reduction: str, dtype: torch.dtype) -> torch.Tensor:
        """The requested reduction of the per-row losses (``mean``: PML's reducer), NaN when an input
        holds a NaN (see _pml_options.nan_guard), in the embeddings' dtype."""
        out = _dense.reduce(rows, mean, reduction)
        return O.nan_guard(out, [self.x] if self.y is self.x else [self.x, self.y]).to(dtype)

    def pair_counts(self):
        """The numbers of positive and negative pairs: int64 tensors on the embeddings' device, counted
        there with no host read (per row, the references with its label, by binary search in the
        sorted reference labels); ints summed over every rank with a process group."""
        labels, ref = self.labels, self.y_labels
        if labels.numel() == 0 or ref.numel() == 0:
            return self.group.sum_int(0), self.group.sum_int(0)
        sorted_ref = ref.sort().values
        same = (torch.searchsorted(sorted_ref, labels, right=True) - torch.searchsorted(sorted_ref, labels)).sum()
        if self.self_offset >= 0:
            same = same - labels.shape[0]
        total = labels.shape[0] * ref.shape[0] - (labels.shape[0] if self.self_offset >= 0 else 0)
        if self.group.active:
            return self.group.sum_int(same), self.group.sum_int(total - same)
        return same, total - same

    def select(self, empty, terms: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """PML's zero loss where ``empty`` (a bool, or a bool tensor decided on the device), else ``value``
        (computed with denominators of at least 1, so the branch not taken has a finite gradient)."""
        if isinstance(empty, torch.Tensor):
            return torch.where(empty, self.zero(terms), value)
        return self.zero(terms) if empty else value

    def zero(self, terms: torch.Tensor) -> torch.Tensor:
        return terms.sum() * 0

    def mean_of_nonzero(self, values: torch.Tensor) -> torch.Tensor:
        """PML's AvgNonZeroReducer over values (rows): the mean over those > 0, 0 when none."""
        mask = (values > 0).to(values.dtype)
        return self.ratio((values * mask).sum(), mask.sum())

    def ratio(self, total: torch.Tensor, count) -> torch.Tensor:
        """total / count, 0 when count is 0; a tensor count is decided on the device (no host read)
        unless a process group sums it."""
        if self.group.active or not isinstance(count, torch.Tensor):
            count = self.group.sum_float(count)
            return total / count if count > 0 else self.zero(total)
        return self.select(count <= 0, total, total / count.clamp(min=1))


def _at_least_1(count):
    return count.clamp(min=1) if isinstance(count, torch.Tensor) else max(count, 1)


def _dense_loss(fn: str, embeddings: torch.Tensor, labels: Optional[torch.Tensor], ref_emb: Optional[torch.Tensor],
                ref_labels: Optional[torch.Tensor], process_group: Optional[ProcessGroup],
                indices_tuple: Optional[O.IndicesTuple], dist: O.Distance, reduction: str,
                compute: Callable[[torch.Tensor, _dense.PairSet], tuple[torch.Tensor, torch.Tensor]],
                ) -> torch.Tensor:  # fmt: skip
    """The loss in plain torch on the (n, m) matrix (_dense.py): for an indices_tuple and for the
    distances the kernels lack. ``compute(mat, pairs)`` returns (per-row losses, PML's reduced loss)."""
    labels_t, ref_t, self_paired = _check_references(fn, embeddings, labels, ref_emb, ref_labels,
                                                     labels_optional=indices_tuple is not None)  # fmt: skip
    if process_group is not None:
        raise ValueError(f"fastloss.{fn}: 'process_group' works with the fused kernels only: not with an "
                         f"indices_tuple or distance={dist.name!r}")  # fmt: skip
    y = embeddings if ref_emb is None else ref_emb
    indices = O.indices_tuple(fn, indices_tuple, embeddings.shape[0], y.shape[0], embeddings.device)
    mat = _dense.matrix(embeddings, y, dist)
    pairs = _dense.PairSet(mat.shape[0], mat.shape[1], mat.detach(), labels_t, ref_t, self_paired, indices)
    rows, mean = compute(mat, pairs)
    out = _dense.reduce(rows, mean, reduction)
    return O.nan_guard(out, [embeddings] if ref_emb is None else [embeddings, ref_emb]).to(embeddings.dtype)


_COSINE = O.Distance(similarity=True, normalize=True)


def nt_xent(embeddings: torch.Tensor, labels: Optional[torch.Tensor], *, temperature: float = 0.07,
            indices_tuple: Optional[O.IndicesTuple] = None, ref_emb: Optional[torch.Tensor] = None,
            ref_labels: Optional[torch.Tensor] = None, reduction: str = "mean",
            process_group: Optional[ProcessGroup] = None) -> torch.Tensor:  # fmt: skip
    """NT-Xent / InfoNCE on labels, as pytorch-metric-learning's ``NTXentLoss(temperature)``: cosine
    similarities over the temperature; each positive pair (a, p) contributes
    ``-log(e^{s_ap} / (e^{s_ap} + sum_{n in N_a} e^{s_an}))`` (other positives of the anchor are not in
    the denominator), averaged over all positive pairs (PML's MeanReducer). The self pair is
    excluded unless ``ref_emb`` is given; no positive or no negative pair in the batch gives 0.
    Memory O(B d), where PML's needs O(|P| |N|).

    ``indices_tuple``: a PML miner's pairs or triplets; the loss is then over exactly those pairs
    (``labels`` may be None). ``reduction``: "mean" (PML's), "sum" or "none": per anchor, the sum of
    its positive pairs' losses. A NaN in the embeddings gives a NaN loss and gradient."""
    fn = "nt_xent"
    t = _positive(fn, "temperature", temperature)
    O.reduction(fn, reduction)
    if indices_tuple is not None:
        return _dense_loss(fn, embeddings, labels, ref_emb, ref_labels, process_group, indices_tuple, _COSINE,
                           reduction, lambda mat, pairs: _dense.nt_xent(mat, pairs, t))  # fmt: skip
    pairs = _Pairs(fn, embeddings, labels, ref_emb, ref_labels, process_group)
    terms, counts, *_ = pairs.run("nt_xent", t, fused_ok=reduction != "none")
    positives, negatives = pairs.pair_counts()
    empty = (positives == 0) | (negatives == 0) | ((positives <= 1) & (negatives <= 1))
    rows = pairs.select(empty, terms, terms[:, 0]) if reduction != "mean" else terms[:, 0]
    mean = pairs.select(empty, terms, terms[:, 0].sum() / _at_least_1(positives))
    return pairs.finish(rows, mean, reduction, embeddings.dtype)


def supcon(embeddings: torch.Tensor, labels: Optional[torch.Tensor], *, temperature: float = 0.1,
           indices_tuple: Optional[O.IndicesTuple] = None, ref_emb: Optional[torch.Tensor] = None,
           ref_labels: Optional[torch.Tensor] = None, reduction: str = "mean",
           process_group: Optional[ProcessGroup] = None) -> torch.Tensor:  # fmt: skip
    """Supervised contrastive loss, as pytorch-metric-learning's ``SupConLoss(temperature)``: per
    anchor ``-(1/|P_i|) sum_p log(e^{s_ip} / sum_{a != i} e^{s_ia})`` on cosine similarities over the
    temperature; anchors without positives contribute 0 (not NaN), and the mean is over the anchors
    with a nonzero loss (PML's AvgNonZeroReducer).

    ``indices_tuple``: a PML miner's pairs or triplets (the listed pairs are the positives and
    negatives, as PML's masks). ``reduction``: "mean" (PML's), "sum" or "none" (the per-anchor losses,
    PML's elements). A NaN in the embeddings gives a NaN loss and gradient."""
    fn = "supcon"
    t = _positive(fn, "temperature", temperature)
    O.reduction(fn, reduction)
    if indices_tuple is not None:
        return _dense_loss(fn, embeddings, labels, ref_emb, ref_labels, process_group, indices_tuple, _COSINE,
                           reduction, lambda mat, pairs: _dense.supcon(mat, pairs, t))  # fmt: skip
    pairs = _Pairs(fn, embeddings, labels, ref_emb, ref_labels, process_group)
    terms, *_ = pairs.run("supcon", t, fused_ok=reduction != "none")
    positives, negatives = pairs.pair_counts()
    empty = (positives == 0) | (negatives == 0) | ((positives <= 1) & (negatives <= 1))
    rows = pairs.select(empty, terms, terms[:, 0]) if reduction != "mean" else terms[:, 0]
    mean = pairs.select(empty, terms, pairs.mean_of_nonzero(terms[:, 0]))
    return pairs.finish(rows, mean, reduction, embeddings.dtype)


def multi_similarity(embeddings: torch.Tensor, labels: Optional[torch.Tensor], *, alpha: float = 2.0,
                     beta: float = 50.0, base: float = 0.5, mining: bool = False, epsilon: float = 0.1,
                     indices_tuple: Optional[O.IndicesTuple] = None, ref_emb: Optional[torch.Tensor] = None,
                     ref_labels: Optional[torch.Tensor] = None, reduction: str = "mean",
                     process_group: Optional[ProcessGroup] = None) -> torch.Tensor:  # fmt: skip
    """Multi-Similarity loss, as pytorch-metric-learning's ``MultiSimilarityLoss(alpha, beta, base)``:
    per anchor ``(1/alpha) log(1 + sum_P e^{-alpha (s - base)}) + (1/beta) log(1 + sum_N e^{beta (s - base)})``
    on cosine similarities, averaged over all anchors (MeanReducer); 0, as PML, when the batch has at
    most one positive and one negative pair. By default over all pairs, as PML's loss without a miner.

    ``mining=True`` fuses PML's ``MultiSimilarityMiner(epsilon)``: a positive is kept when
    ``s_p - epsilon < max_n s_n`` and a negative when ``s_n + epsilon > min_p s_p`` (per anchor); it equals
    ``MultiSimilarityLoss(alpha, beta, base)(e, y, MultiSimilarityMiner(epsilon)(e, y))`` without the
    O(B^2) pair lists. ``indices_tuple``: any PML miner's pairs or triplets instead (not with mining).
    ``reduction``: "mean" (PML's), "sum" or "none" (the per-anchor losses, PML's elements). A NaN in
    the embeddings gives a NaN loss and gradient."""
    fn = "multi_similarity"
    a, b = _positive(fn, "alpha", alpha), _positive(fn, "beta", beta)
    base = V.real_number(fn, "base", base)
    eps = V.real_number(fn, "epsilon", epsilon)
    O.reduction(fn, reduction)
    if indices_tuple is not None:
        if mining:
            raise ValueError(f"fastloss.{fn}: 'indices_tuple' and mining=True both choose the pairs; pass one of them")
        return _dense_loss(fn, embeddings, labels, ref_emb, ref_labels, process_group, indices_tuple, _COSINE,
                           reduction, lambda mat, pairs: _dense.multi_similarity(mat, pairs, a, b, base))  # fmt: skip
    pairs = _Pairs(fn, embeddings, labels, ref_emb, ref_labels, process_group)
    terms, counts, *_ = pairs.run("multi_similarity", a, b, base, eps, option=1 if mining else 0,
                                  fused_ok=reduction != "none")  # fmt: skip
    positives, negatives = pairs.pair_counts()
    kept_pos, kept_neg = counts[:, 0].sum(), counts[:, 1].sum()
    if pairs.group.active:
        kept_pos, kept_neg = pairs.group.sum_int(int(kept_pos)), pairs.group.sum_int(int(kept_neg))
    empty = (kept_pos <= 1) & (kept_neg <= 1)
    if mining:  # the miner returns no pairs at all
        empty = empty | (positives == 0) | (negatives == 0)
    rows = pairs.select(empty, terms, terms[:, 0]) if reduction != "mean" else terms[:, 0]
    mean = pairs.select(empty, terms, pairs.ratio(terms[:, 0].sum(), terms.shape[0]))
    return pairs.finish(rows, mean, reduction, embeddings.dtype)


def circle(embeddings: torch.Tensor, labels: Optional[torch.Tensor], *, m: float = 0.4, gamma: float = 80.0,
           indices_tuple: Optional[O.IndicesTuple] = None, ref_emb: Optional[torch.Tensor] = None,
           ref_labels: Optional[torch.Tensor] = None, reduction: str = "mean",
           process_group: Optional[ProcessGroup] = None) -> torch.Tensor:  # fmt: skip
    """Circle loss, as pytorch-metric-learning's ``CircleLoss(m, gamma)`` (PML's defaults, those the
    paper gives for fine-grained retrieval; face recognition used m=0.25, gamma=256): per anchor
    ``softplus(LSE_p(-gamma [1 + m - s_p]_+ (s_p - 1 + m)) + LSE_n(gamma [s_n + m]_+ (s_n - m)))``
    with the relu weights detached, 0 for anchors without a positive or a negative, averaged over
    the nonzero anchors (AvgNonZeroReducer). Log-sum-exps throughout, so gamma = 256 is safe.

    ``indices_tuple``: a PML miner's pairs or triplets. ``reduction``: "mean" (PML's), "sum" or
    "none" (the per-anchor losses). A NaN in the embeddings gives a NaN loss and gradient."""
    fn = "circle"
    m_value = V.real_number(fn, "m", m)
    g = _positive(fn, "gamma", gamma)
    O.reduction(fn, reduction)
    if indices_tuple is not None:
        return _dense_loss(fn, embeddings, labels, ref_emb, ref_labels, process_group, indices_tuple, _COSINE,
                           reduction, lambda mat, pairs: _dense.circle(mat, pairs, m_value, g))  # fmt: skip
    pairs = _Pairs(fn, embeddings, labels, ref_emb, ref_labels, process_group)
    terms, *_ = pairs.run("circle", m_value, g, fused_ok=reduction != "none")
    positives, negatives = pairs.pair_counts()
    empty = (positives <= 1) & (negatives <= 1)
    rows = pairs.select(empty, terms, terms[:, 0]) if reduction != "mean" else terms[:, 0]
    mean = pairs.select(empty, terms, pairs.mean_of_nonzero(terms[:, 0]))
    return pairs.finish(rows, mean, reduction, embeddings.dtype)


def contrastive(embeddings: torch.Tensor, labels: Optional[torch.Tensor], *, pos_margin: float = 0.0,
                neg_margin: float = 1.0, distance: O.DistanceArg = "euclidean",
                normalize_embeddings: Optional[bool] = None, indices_tuple: Optional[O.IndicesTuple] = None,
                ref_emb: Optional[torch.Tensor] = None, ref_labels: Optional[torch.Tensor] = None,
                reduction: str = "mean", process_group: Optional[ProcessGroup] = None) -> torch.Tensor:  # fmt: skip
    """Contrastive loss, as pytorch-metric-learning's ``ContrastiveLoss(pos_margin, neg_margin)`` with
    its default ``LpDistance`` on normalized embeddings (``distance="euclidean"``): ``[d_p - pos_margin]_+``
    per positive pair and ``[neg_margin - d_n]_+`` per negative pair, or with a similarity
    (``"cosine"``: PML's ``CosineSimilarity``; ``"dot"``: ``DotProductSimilarity``) ``[pos_margin - s_p]_+``
    and ``[s_n - neg_margin]_+``. Each part is averaged over its nonzero pairs (AvgNonZeroReducer)
    and the two are added.

    ``distance`` also takes a PML distance object (``LpDistance(normalize_embeddings=False)``,
    ``CosineSimilarity()``, ``DotProductSimilarity()``; p=2 and power=1 only); ``normalize_embeddings``
    (None: the distance's own) overrides a name's. The fused kernel covers normalized euclidean and
    cosine; the rest, and ``indices_tuple`` (a PML miner's pairs or triplets), run in torch on the
    (n, m) matrix. ``reduction``: "mean" (PML's), "sum" or "none": per anchor, the sum of its pairs'
    losses. A NaN in the embeddings gives a NaN loss and gradient."""
    fn = "contrastive"
    dist = O.distance(fn, distance, normalize_embeddings)
    pm, nm = V.real_number(fn, "pos_margin", pos_margin), V.real_number(fn, "neg_margin", neg_margin)
    O.reduction(fn, reduction)
    if indices_tuple is not None or not dist.normalize or dist.name not in ("euclidean", "cosine"):
        return _dense_loss(fn, embeddings, labels, ref_emb, ref_labels, process_group, indices_tuple, dist,
                           reduction, lambda mat, pairs: _dense.contrastive(mat, pairs, pm, nm, dist))  # fmt: skip
    pairs = _Pairs(fn, embeddings, labels, ref_emb, ref_labels, process_group)
    terms, counts, *_ = pairs.run("contrastive", pm, nm, option=1 if dist.similarity else 0)
    positives, negatives = pairs.pair_counts()
    pos = pairs.select(positives <= 0, terms, pairs.ratio(terms[:, 0].sum(), counts[:, 0].sum()))
    neg = pairs.select(negatives <= 0, terms, pairs.ratio(terms[:, 1].sum(), counts[:, 1].sum()))
    empty = (positives <= 1) & (negatives <= 1)
    rows = terms[:, 0] + terms[:, 1]
    rows = pairs.select(empty, terms, rows) if reduction != "mean" else rows
    return pairs.finish(rows, pairs.select(empty, terms, pos + neg), reduction, embeddings.dtype)


TRIPLET_MINING = {"all": 0, "batch_hard": 1, "semi_hard": 2}


def triplet(embeddings: torch.Tensor, labels: Optional[torch.Tensor], *, margin: float = 0.05, mining: str = "all",
            mining_margin: Optional[float] = None, distance: O.DistanceArg = "euclidean",
            normalize_embeddings: Optional[bool] = None, indices_tuple: Optional[O.IndicesTuple] = None,
            ref_emb: Optional[torch.Tensor] = None, ref_labels: Optional[torch.Tensor] = None,
            reduction: str = "mean", process_group: Optional[ProcessGroup] = None) -> torch.Tensor:  # fmt: skip
    """Triplet margin loss, as pytorch-metric-learning's ``TripletMarginLoss(margin)`` with its default
    ``LpDistance`` (euclidean distances of normalized embeddings): ``[d_ap - d_an + margin]_+`` averaged
    over the nonzero triplets (AvgNonZeroReducer), over

    - ``mining="all"``: every (anchor, positive, negative), PML's default (no miner); computed from
      sorted distances per anchor, without the O(B^3) triplet list;
    - ``"batch_hard"``: the farthest positive and nearest negative of each anchor (``BatchHardMiner``);
    - ``"semi_hard"``: the triplets with ``0 < d_an - d_ap <= mining_margin`` (``TripletMarginMiner(
      margin=mining_margin, type_of_triplets="semihard")``; mining_margin defaults to margin);
    - or a PML miner's ``indices_tuple`` (triplets, or pairs combined per anchor as PML does; not with
      ``mining`` other than "all").

    ``distance``: "euclidean", "cosine" (``[s_an - s_ap + margin]_+``), "dot", or a PML distance object
    (p=2, power=1), with ``normalize_embeddings`` as for ``contrastive``. The fused kernel covers the
    normalized euclidean distance; the other distances and indices_tuple run in torch on the (n, m)
    matrix (O(n m^2) memory for all triplets, as PML). ``reduction``: "mean" (PML's), "sum" or "none":
    per anchor, the sum of its triplets' losses. A NaN in the embeddings gives a NaN loss and gradient."""
    fn = "triplet"
    if mining not in TRIPLET_MINING:
        raise ValueError(f"fastloss.{fn}: argument 'mining' must be one of {tuple(TRIPLET_MINING)}, got {mining!r}")
    dist = O.distance(fn, distance, normalize_embeddings)
    margin = V.real_number(fn, "margin", margin)
    mm = margin if mining_margin is None else V.real_number(fn, "mining_margin", mining_margin)
    O.reduction(fn, reduction)
    if indices_tuple is not None and mining != "all":
        raise ValueError(f"fastloss.{fn}: 'indices_tuple' and mining={mining!r} both choose the triplets; pass one")
    if indices_tuple is not None or dist.name != "euclidean":
        return _dense_loss(fn, embeddings, labels, ref_emb, ref_labels, process_group, indices_tuple, dist,
                           reduction, lambda mat, pairs: _dense.triplet(mat, pairs, margin, mining, mm, dist))
    pairs = _Pairs(fn, embeddings, labels, ref_emb, ref_labels, process_group)
    terms, counts, *_ = pairs.run("triplet", margin, mm, option=TRIPLET_MINING[mining], fused_ok=reduction != "none")
    mean = pairs.ratio(terms[:, 0].sum(), counts[:, 0].sum())
    return pairs.finish(terms[:, 0], mean, reduction, embeddings.dtype)


# ---- query / key losses ------------------------------------------------------------------------


def _query_key(fn: str, query: torch.Tensor, key: torch.Tensor,
               normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    _embeddings(fn, "query", query)
    _embeddings(fn, "key", key)
    V.same_device(fn, query=query, key=key)
    if query.shape[1] != key.shape[1] or query.dtype != key.dtype:
        raise ValueError(f"fastloss.{fn}: query {tuple(query.shape)} {query.dtype} and key {tuple(key.shape)} "
                         f"{key.dtype} must share dim and dtype")  # fmt: skip
    return _normalized(query, normalize), _normalized(key, normalize)


def _targets(fn: str, labels: torch.Tensor | None, n: int, m: int, device: torch.device) -> torch.Tensor | None:
    if labels is None:
        if n > m:
            raise ValueError(f"fastloss.{fn}: with labels=None row i's positive is key i, so key needs at least "
                             f"{n} rows, got {m}")  # fmt: skip
        return None
    targets = _labels(fn, "labels", labels, n, device)
    # On CUDA the check reads the labels back (a sync); with fastloss.set_target_checks(False), under
    # torch.compile or in graph capture it is skipped and a row whose label is out of range is NaN.
    if targets.numel() and L.may_inspect_values(targets) and (int(targets.min()) < 0 or int(targets.max()) >= m):
        raise ValueError(f"fastloss.{fn}: 'labels' (the positive key of each query) must be in [0, {m}), got "
                         f"[{int(targets.min())}, {int(targets.max())}]")  # fmt: skip
    return targets


def _reduce(per_row: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return per_row
    return per_row.sum() if reduction == "sum" else per_row.mean()


def info_nce(query: torch.Tensor, key: torch.Tensor, *, temperature: float | None = None,
             labels: torch.Tensor | None = None, symmetric: bool = False, scale: torch.Tensor | float | None = None,
             log_scale: torch.Tensor | float | None = None, logit_scale: torch.Tensor | float | None = None,
             max_scale: float | None = None, normalize: bool = True, reduction: str = "mean") -> torch.Tensor:
    """InfoNCE / CLIP loss without the n x m logits: ``cross_entropy(scale * q k^T, labels)``.

    The multiplier of the logits is given by one of:

    - ``temperature``: ``scale = 1 / temperature`` (None: 0.07, open_clip's initial value);
    - ``scale``: the multiplier, a number or a one-element tensor (it gets its gradient);
    - ``log_scale``: its log, as open_clip's ``model.logit_scale`` parameter holds it (exp taken here);
    - ``logit_scale``: the multiplier under the name of open_clip ``ClipLoss``'s argument
      (``model.logit_scale.exp()``); a warning when it is given an ``nn.Parameter``, which in open_clip
      holds the log.

    Giving ``temperature`` together with a scale warns (the temperature is ignored); two scales raise.
    ``max_scale`` clamps the multiplier (CLIP: 100). A tensor scale is folded into the queries on their
    device (no host read); a NaN one gives a NaN loss, a non-positive or infinite one raises on the CPU
    and gives NaN plus a device error on CUDA.

    ``labels=None``: query i's positive is key i; else ``labels[i]`` is query i's positive key.
    ``symmetric=True`` (CLIP, open_clip's ``ClipLoss``) averages the row and column cross entropies,
    both from the same similarities; it needs a square batch with the diagonal as positives. q and k
    are l2-normalized first unless ``normalize=False``. ``reduction``: "mean", "sum" or "none" (per
    query; with symmetric, the row and column losses of index i averaged). The loss is float32 for
    16-bit inputs (float64 for float64); the gradients have the inputs' dtype. NaN in the embeddings
    or the scale gives NaN (in the rows it reaches; a NaN key reaches every row)."""
    fn = "info_nce"
    V.reduction(fn, reduction)
    if isinstance(labels, torch.Tensor) and labels.is_floating_point() and labels.numel() == 1:
        raise TypeError(f"fastloss.{fn}: argument 'labels' got a floating-point scalar; open_clip's ClipLoss takes "
                        "logit_scale as its third argument: pass it as scale= (the multiplier) or log_scale= (its "
                        "log)")  # fmt: skip
    q, k = _query_key(fn, query, key, normalize)
    n, m = q.shape[0], k.shape[0]
    targets = _targets(fn, labels, n, m, q.device)
    if symmetric and (labels is not None or n != m):
        raise ValueError(f"fastloss.{fn}: symmetric=True needs a square batch (got {n} x {m}) with labels=None")
    multiplier = _logit_scale.resolve(fn, query.device, temperature=temperature, scale=scale, log_scale=log_scale,
                                      logit_scale=logit_scale, max_scale=max_scale)  # fmt: skip
    if multiplier.tensor is not None:
        q = q * multiplier.tensor  # the logits (scale q) k^T; autograd carries d(scale)
    kernel_scale = torch.tensor(multiplier.value, dtype=torch.float64)
    # The fused gradient needs a uniform upstream gradient on the rows: a mean or a sum, not "none".
    fused = not symmetric and reduction != "none" and n > 0 and _wants_grad(q, k)
    terms, _, _, col_terms, *_ = _ops.forward(q, k, None, None, targets, None, None, kernel_scale, -1,
                                              _ops.KINDS["info_nce"], 0.0, 0.0, 0.0, 0, bool(symmetric), fused)  # fmt: skip
    multiplier.report()
    rows = terms[:, 0]
    return _reduce(0.5 * (rows + col_terms) if symmetric else rows, reduction)


def auc_loss(query: torch.Tensor, key: torch.Tensor, *, labels: torch.Tensor | None = None, temperature: float = 1.0,
             normalize: bool = True, reduction: str = "mean") -> torch.Tensor:  # fmt: skip
    """The Mann-Whitney (MW) loss of "Optimizing What Matters" (AUC-driven retrieval): for each query,
    ``softplus((s_n - s_p) / temperature)`` averaged over its negatives n, with s the (cosine, unless
    ``normalize=False``) similarities and p the query's positive key (key i by default, or
    ``labels[i]``). ``reduction``: "mean" over queries, "sum", or "none" (the per-query averages).
    The loss is float32 for 16-bit inputs; the gradients have the inputs' dtype; NaN in gives NaN."""
    fn = "auc_loss"
    V.reduction(fn, reduction)
    t = _positive(fn, "temperature", temperature)
    q, k = _query_key(fn, query, key, normalize)
    targets = _targets(fn, labels, q.shape[0], k.shape[0], q.device)
    scale = torch.tensor(t, dtype=torch.float64)
    terms, *_ = _ops.forward(q, k, None, None, targets, None, None, scale, -1, _ops.KINDS["auc"], 0.0, 0.0, 0.0, 0,
                             False, reduction != "none" and _wants_grad(q, k))  # fmt: skip
    return _reduce(terms[:, 0], reduction)


def _positive_lists(fn: str, positives: torch.Tensor, n: int, m: int,
                    device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """CSR (pos_ptr, pos_idx) from a (n, m) bool mask or a (n, P) int tensor padded with -1."""
    V.tensor(fn, "positives", positives)
    if positives.device != device:
        raise ValueError(f"fastloss.{fn}: 'positives' is on {positives.device}, the embeddings on {device}")
    if positives.dtype == torch.bool:
        if tuple(positives.shape) != (n, m):
            raise ValueError(f"fastloss.{fn}: a boolean 'positives' mask must be ({n}, {m}), got {tuple(positives.shape)}")
        rows, cols = positives.nonzero(as_tuple=True)
    else:
        if positives.dim() != 2 or positives.shape[0] != n or positives.dtype.is_floating_point:
            raise ValueError(f"fastloss.{fn}: 'positives' must be a ({n}, m) bool mask or a ({n}, P) integer tensor of "
                             f"key indices padded with -1, got {positives.dtype} {tuple(positives.shape)}")  # fmt: skip
        valid = positives >= 0
        # On CUDA by default the forward checks the indices on the device instead (a deferred error).
        if (not L.is_cuda(positives) or L.may_inspect_values(positives)) and bool((positives >= m).any()):
            raise ValueError(f"fastloss.{fn}: 'positives' holds key indices >= {m}")
        rows = valid.nonzero(as_tuple=True)[0]
        cols = positives[valid].to(torch.int64)
    ptr = torch.zeros(n + 1, dtype=torch.int64, device=device)
    # (not bincount, which reads the largest row index back on CUDA; nonzero above still does: the
    # number of positives sizes pos_idx)
    ptr[1:].index_add_(0, rows, torch.ones_like(rows)).cumsum_(0)
    return ptr, cols.contiguous()


def decoupled_softmax(query: torch.Tensor, keys: torch.Tensor, positives: torch.Tensor, *, temperature: float = 0.05,
                      normalize: bool = True, reduction: str = "mean") -> torch.Tensor:  # fmt: skip
    """Decoupled softmax of DEXML (Gupta et al., ICLR 2024): each positive (i, l) against the negatives
    only, ``-log(e^{s_il} / (e^{s_il} + sum_{j not in P_i} e^{s_ij}))`` on similarities over the
    temperature, weighted 1/|P_i| per query (a query without positives gives 0).
    ``positives``: a (n, m) bool mask or a (n, P) integer tensor of key indices padded with -1.
    ``reduction``: "mean" over queries, "sum", or "none" (each query's weighted sum over its positives).
    The loss is float32 for 16-bit inputs; the gradients have the inputs' dtype; NaN in gives NaN."""
    fn = "decoupled_softmax"
    V.reduction(fn, reduction)
    t = _positive(fn, "temperature", temperature)
    q, k = _query_key(fn, query, keys, normalize)
    ptr, idx = _positive_lists(fn, positives, q.shape[0], k.shape[0], q.device)
    scale = torch.tensor(t, dtype=torch.float64)
    terms, *_ = _ops.forward(q, k, None, None, None, ptr, idx, scale, -1, _ops.KINDS["decoupled_softmax"], 0.0, 0.0,
                             0.0, 0, False, reduction != "none" and _wants_grad(q, k))  # fmt: skip
    return _reduce(terms[:, 0], reduction)
