"""The functional API of the metric family: argument checks, normalization (in torch, so autograd
differentiates it), the fused op, and the reduction each peer loss applies (pytorch-metric-learning
semantics, named per function)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import _library as L
from .. import _validate as V
from . import _distributed
from . import _ops



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


class _Pairs:
    """Rows (queries) against columns (references) with class labels: the reference set is the
    batch itself unless ref_emb is given, and with a process group the columns are every rank's."""

    def __init__(self, fn, embeddings, labels, ref_emb, ref_labels, process_group, normalize=True):
        _embeddings(fn, "embeddings", embeddings)
        self.labels = _labels(fn, "labels", labels, embeddings.shape[0], embeddings.device)
        if ref_emb is None:
            if ref_labels is not None:
                raise ValueError(f"fastloss.{fn}: 'ref_labels' needs 'ref_emb'")
        else:
            _embeddings(fn, "ref_emb", ref_emb)
            V.same_device(fn, embeddings=embeddings, ref_emb=ref_emb)
            if ref_emb.shape[1] != embeddings.shape[1] or ref_emb.dtype != embeddings.dtype:
                raise ValueError(f"fastloss.{fn}: 'ref_emb' {tuple(ref_emb.shape)} {ref_emb.dtype} does not match the "
                                 f"embeddings {tuple(embeddings.shape)} {embeddings.dtype}")  # fmt: skip
        # PML leaves out the pair (i, i) whenever the reference labels are the labels themselves (no
        # ref_labels, or the same tensor): the two-view call loss(v1, y, ref_emb=v2, ref_labels=y).
        self_paired = ref_emb is not None and (ref_labels is None or ref_labels is labels)
        if self_paired and ref_emb.shape[0] != embeddings.shape[0]:
            raise ValueError(f"fastloss.{fn}: with ref_labels None or the labels themselves, 'ref_emb' must have as "
                             f"many rows as the embeddings ({embeddings.shape[0]}), got {ref_emb.shape[0]}")  # fmt: skip
        if ref_emb is not None and not self_paired:
            ref_labels = _labels(fn, "ref_labels", ref_labels, ref_emb.shape[0], ref_emb.device)
        x = _normalized(embeddings, normalize)
        if ref_emb is None:
            y, y_labels, self_offset = x, self.labels, 0
        else:
            y = _normalized(ref_emb, normalize)
            y_labels, self_offset = (self.labels, 0) if self_paired else (ref_labels, -1)
        self.empty = x.shape[0] == 0 or y.shape[0] == 0
        self.group = _distributed.Group(fn, process_group)
        if self.group.active:
            offset = self.group.rank_offset(x.shape[0])
            y = self.group.gather_with_grad(y)
            y_labels = self.group.gather(y_labels)
            self_offset = offset if self_offset >= 0 else -1
        self.x, self.y, self.y_labels, self.self_offset = x, y, y_labels, self_offset

    def run(self, kind: str, scale: float, p1=0.0, p2=0.0, p3=0.0, option=0):
        if self.empty:  # no rows or no references: no pairs; PML's zero loss
            zeros = self.x.new_zeros((self.x.shape[0], _ops.ROW_TERMS))
            return zeros + 0 * self.x.sum(), zeros.clone(), self.x.new_zeros((self.x.shape[0], _ops.ROW_STATS))
        scale_t = torch.tensor(scale, dtype=torch.float64)
        fused = kind != "contrastive" and _wants_grad(self.x, self.y)
        return _ops.forward(self.x, self.y, self.labels, self.y_labels, None, None, None, scale_t, self.self_offset,
                            _ops.KINDS[kind], float(p1), float(p2), float(p3), int(option), False, fused)  # fmt: skip

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


def nt_xent(embeddings, labels, *, temperature: float = 0.07, ref_emb=None, ref_labels=None, process_group=None):
    """NT-Xent / InfoNCE on labels, as pytorch-metric-learning's ``NTXentLoss(temperature)``: cosine
    similarities over the temperature; each positive pair (a, p) contributes
    ``-log(e^{s_ap} / (e^{s_ap} + sum_{n in N_a} e^{s_an}))`` (other positives of the anchor are not in
    the denominator), averaged over all positive pairs (PML's MeanReducer). The self pair is
    excluded unless ``ref_emb`` is given; no positive or no negative pair in the batch gives 0.
    Memory O(B d), where PML's needs O(|P| |N|)."""
    fn = "nt_xent"
    t = _positive(fn, "temperature", temperature)
    pairs = _Pairs(fn, embeddings, labels, ref_emb, ref_labels, process_group)
    terms, counts, *_ = pairs.run("nt_xent", t)
    positives, negatives = pairs.pair_counts()
    empty = (positives == 0) | (negatives == 0) | ((positives <= 1) & (negatives <= 1))
    return pairs.select(empty, terms, terms[:, 0].sum() / _at_least_1(positives)).to(embeddings.dtype)


def supcon(embeddings, labels, *, temperature: float = 0.1, ref_emb=None, ref_labels=None, process_group=None):
    """Supervised contrastive loss, as pytorch-metric-learning's ``SupConLoss(temperature)``: per
    anchor ``-(1/|P_i|) sum_p log(e^{s_ip} / sum_{a != i} e^{s_ia})`` on cosine similarities over the
    temperature; anchors without positives contribute 0 (not NaN), and the mean is over the anchors
    with a nonzero loss (PML's AvgNonZeroReducer)."""
    fn = "supcon"
    t = _positive(fn, "temperature", temperature)
    pairs = _Pairs(fn, embeddings, labels, ref_emb, ref_labels, process_group)
    terms, *_ = pairs.run("supcon", t)
    positives, negatives = pairs.pair_counts()
    empty = (positives == 0) | (negatives == 0) | ((positives <= 1) & (negatives <= 1))
    return pairs.select(empty, terms, pairs.mean_of_nonzero(terms[:, 0])).to(embeddings.dtype)


def multi_similarity(embeddings, labels, *, alpha: float = 2.0, beta: float = 50.0, base: float = 0.5,
                     epsilon: float = 0.1, mining: bool = True, ref_emb=None, ref_labels=None,
                     process_group=None):  # fmt: skip
    """Multi-Similarity loss with its mining step fused. With ``mining=True`` it equals
    pytorch-metric-learning's ``MultiSimilarityLoss(alpha, beta, base)(e, y, MultiSimilarityMiner(epsilon)(e, y))``:
    a positive is kept when ``s_p - epsilon < max_n s_n`` and a negative when ``s_n + epsilon > min_p s_p``
    (per anchor), then per anchor ``(1/alpha) log(1 + sum_P e^{-alpha (s - base)}) +
    (1/beta) log(1 + sum_N e^{beta (s - base)})``, averaged over all anchors (MeanReducer). With
    ``mining=False`` it equals ``MultiSimilarityLoss(alpha, beta, base)(e, y)`` (all pairs). Both
    give 0, as PML does, when the batch has at most one positive and one negative pair."""
    fn = "multi_similarity"
    a, b = _positive(fn, "alpha", alpha), _positive(fn, "beta", beta)
    base = V.real_number(fn, "base", base)
    eps = V.real_number(fn, "epsilon", epsilon)
    pairs = _Pairs(fn, embeddings, labels, ref_emb, ref_labels, process_group)
    terms, counts, *_ = pairs.run("multi_similarity", a, b, base, eps, option=1 if mining else 0)
    positives, negatives = pairs.pair_counts()
    kept_pos, kept_neg = counts[:, 0].sum(), counts[:, 1].sum()
    if pairs.group.active:
        kept_pos, kept_neg = pairs.group.sum_int(int(kept_pos)), pairs.group.sum_int(int(kept_neg))
    empty = (kept_pos <= 1) & (kept_neg <= 1)
    if mining:  # the miner returns no pairs at all
        empty = empty | (positives == 0) | (negatives == 0)
    return pairs.select(empty, terms, pairs.ratio(terms[:, 0].sum(), terms.shape[0])).to(embeddings.dtype)


def circle(embeddings, labels, *, m: float = 0.25, gamma: float = 256.0, ref_emb=None, ref_labels=None,
           process_group=None):  # fmt: skip
    """Circle loss, as pytorch-metric-learning's ``CircleLoss(m, gamma)``: per anchor
    ``softplus(LSE_p(-gamma [1 + m - s_p]_+ (s_p - 1 + m)) + LSE_n(gamma [s_n + m]_+ (s_n - m)))``
    with the relu weights detached, 0 for anchors without a positive or a negative, averaged over
    the nonzero anchors (AvgNonZeroReducer). Log-sum-exps throughout, so gamma = 256 is safe."""
    fn = "circle"
    m_value = V.real_number(fn, "m", m)
    g = _positive(fn, "gamma", gamma)
    pairs = _Pairs(fn, embeddings, labels, ref_emb, ref_labels, process_group)
    terms, *_ = pairs.run("circle", m_value, g)
    positives, negatives = pairs.pair_counts()
    empty = (positives <= 1) & (negatives <= 1)
    return pairs.select(empty, terms, pairs.mean_of_nonzero(terms[:, 0])).to(embeddings.dtype)


def contrastive(embeddings, labels, *, pos_margin: float = 0.0, neg_margin: float = 1.0,
                distance: str = "euclidean", ref_emb=None, ref_labels=None, process_group=None):  # fmt: skip
    """Contrastive loss, as pytorch-metric-learning's ``ContrastiveLoss(pos_margin, neg_margin)`` with
    its default ``LpDistance`` on normalized embeddings (``distance="euclidean"``): ``[d_p - pos_margin]_+``
    per positive pair and ``[neg_margin - d_n]_+`` per negative pair, or with ``distance="cosine"``
    (PML's ``CosineSimilarity``) ``[pos_margin - s_p]_+`` and ``[s_n - neg_margin]_+``. Each part is
    averaged over its nonzero pairs (AvgNonZeroReducer) and the two are added."""
    fn = "contrastive"
    if distance not in ("euclidean", "cosine"):
        raise ValueError(f"fastloss.{fn}: argument 'distance' must be 'euclidean' or 'cosine', got {distance!r}")
    pm, nm = V.real_number(fn, "pos_margin", pos_margin), V.real_number(fn, "neg_margin", neg_margin)
    pairs = _Pairs(fn, embeddings, labels, ref_emb, ref_labels, process_group)
    terms, counts, *_ = pairs.run("contrastive", pm, nm, option=1 if distance == "cosine" else 0)
    positives, negatives = pairs.pair_counts()
    pos = pairs.select(positives <= 0, terms, pairs.ratio(terms[:, 0].sum(), counts[:, 0].sum()))
    neg = pairs.select(negatives <= 0, terms, pairs.ratio(terms[:, 1].sum(), counts[:, 1].sum()))
    return pairs.select((positives <= 1) & (negatives <= 1), terms, pos + neg).to(embeddings.dtype)


TRIPLET_MINING = {"all": 0, "batch_hard": 1, "semi_hard": 2}


def triplet(embeddings, labels, *, margin: float = 0.05, mining: str = "all", mining_margin: float | None = None,
            ref_emb=None, ref_labels=None, process_group=None):  # fmt: skip
    """Triplet margin loss on euclidean distances of normalized embeddings, as pytorch-metric-learning's
    ``TripletMarginLoss(margin)``: ``[d_ap - d_an + margin]_+`` averaged over the nonzero triplets
    (AvgNonZeroReducer), over

    - ``mining="all"``: every (anchor, positive, negative), PML's default (no miner); computed from
      sorted distances per anchor, without the O(B^3) triplet list;
    - ``"batch_hard"``: the farthest positive and nearest negative of each anchor (``BatchHardMiner``);
    - ``"semi_hard"``: the triplets with ``0 < d_an - d_ap <= mining_margin`` (``TripletMarginMiner(
      margin=mining_margin, type_of_triplets="semihard")``; mining_margin defaults to margin)."""
    fn = "triplet"
    if mining not in TRIPLET_MINING:
        raise ValueError(f"fastloss.{fn}: argument 'mining' must be one of {tuple(TRIPLET_MINING)}, got {mining!r}")
    margin = V.real_number(fn, "margin", margin)
    mm = margin if mining_margin is None else V.real_number(fn, "mining_margin", mining_margin)
    pairs = _Pairs(fn, embeddings, labels, ref_emb, ref_labels, process_group)
    terms, counts, *_ = pairs.run("triplet", margin, mm, option=TRIPLET_MINING[mining])
    return pairs.ratio(terms[:, 0].sum(), counts[:, 0].sum()).to(embeddings.dtype)


# ---- query / key losses ------------------------------------------------------------------------


def _query_key(fn, query, key, normalize):
    _embeddings(fn, "query", query)
    _embeddings(fn, "key", key)
    V.same_device(fn, query=query, key=key)
    if query.shape[1] != key.shape[1] or query.dtype != key.dtype:
        raise ValueError(f"fastloss.{fn}: query {tuple(query.shape)} {query.dtype} and key {tuple(key.shape)} "
                         f"{key.dtype} must share dim and dtype")  # fmt: skip
    return _normalized(query, normalize), _normalized(key, normalize)
    return query, key


def _targets(fn, labels, n, m, device):
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


def info_nce(query, key, *, temperature: float = 0.07, labels=None, symmetric: bool = False, logit_scale=None,
             normalize: bool = True, reduction: str = "mean"):  # fmt: skip
    """InfoNCE / CLIP loss without the B x B logits: ``cross_entropy(scale * q k^T, labels)`` with
    ``scale = 1 / temperature`` or the learnable ``logit_scale`` tensor (the multiplier itself, e.g.
    open_clip's ``logit_scale.exp()``; it gets its gradient). ``labels=None``: query i's positive is
    key i. ``symmetric=True`` (CLIP) averages the row and the column cross entropies, both from the
    same similarity rows; it needs a square batch with the diagonal as positives. q and k are
    l2-normalized first unless ``normalize=False``. ``reduction``: "mean", "sum" or "none" (per row;
    with symmetric, row and column losses averaged pairwise)."""
    fn = "info_nce"
    V.reduction(fn, reduction)
    q, k = _query_key(fn, query, key, normalize)
    n, m = q.shape[0], k.shape[0]
    targets = _targets(fn, labels, n, m, q.device)
    if symmetric and (labels is not None or n != m):
        raise ValueError(f"fastloss.{fn}: symmetric=True needs a square batch (got {n} x {m}) with labels=None")
    if logit_scale is None:
        scale = torch.tensor(1.0 / _positive(fn, "temperature", temperature), dtype=torch.float64)
    else:
        V.tensor(fn, "logit_scale", logit_scale)
        if logit_scale.numel() != 1 or not logit_scale.is_floating_point():
            raise ValueError(f"fastloss.{fn}: 'logit_scale' must be one floating-point value, got "
                             f"{logit_scale.dtype} of shape {tuple(logit_scale.shape)}")  # fmt: skip
        if logit_scale.device != q.device:
            raise ValueError(f"fastloss.{fn}: 'logit_scale' is on {logit_scale.device}, the embeddings on {q.device}")
        if not (float(logit_scale.detach()) > 0 and bool(torch.isfinite(logit_scale.detach()).all())):
            raise ValueError(f"fastloss.{fn}: 'logit_scale' (the multiplier of the logits) must be finite and > 0, "
                             f"got {float(logit_scale.detach())}")  # fmt: skip
        scale = logit_scale.reshape(())
    # The fused gradient needs a uniform upstream gradient on the rows: a mean or a sum, not "none".
    fused = not symmetric and reduction != "none" and q.shape[0] > 0 and _wants_grad(q, k, scale)
    terms, _, _, col_terms, *_ = _ops.forward(q, k, None, None, targets, None, None, scale, -1, _ops.KINDS["info_nce"],
                                              0.0, 0.0, 0.0, 0, bool(symmetric), fused)  # fmt: skip
    rows = terms[:, 0]
    per_row = 0.5 * (rows + col_terms) if symmetric else rows
    per_row = per_row.to(query.dtype)
    if reduction == "none":
        return per_row
    return per_row.sum() if reduction == "sum" else per_row.mean()


def auc_loss(query, key, *, labels=None, temperature: float = 1.0, normalize: bool = True):
    """The Mann-Whitney (MW) loss of "Optimizing What Matters" (AUC-driven retrieval): for each query,
    ``softplus((s_n - s_p) / temperature)`` averaged over its negatives n, with s the (cosine, unless
    ``normalize=False``) similarities and p the query's positive key (key i by default, or
    ``labels[i]``); then the mean over queries."""
    fn = "auc_loss"
    t = _positive(fn, "temperature", temperature)
    q, k = _query_key(fn, query, key, normalize)
    targets = _targets(fn, labels, q.shape[0], k.shape[0], q.device)
    scale = torch.tensor(t, dtype=torch.float64)
    terms, *_ = _ops.forward(q, k, None, None, targets, None, None, scale, -1, _ops.KINDS["auc"], 0.0, 0.0, 0.0, 0,
                             False, _wants_grad(q, k))  # fmt: skip
    return terms[:, 0].mean().to(query.dtype)


def _positive_lists(fn, positives, n, m, device):
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


def decoupled_softmax(query, keys, positives, *, temperature: float = 0.05, normalize: bool = True):
    """Decoupled softmax of DEXML (Gupta et al., ICLR 2024): each positive (i, l) against the negatives
    only, ``-log(e^{s_il} / (e^{s_il} + sum_{j not in P_i} e^{s_ij}))`` on similarities over the
    temperature, weighted 1/|P_i| and averaged over queries (queries without positives give 0).
    ``positives``: a (n, m) bool mask or a (n, P) integer tensor of key indices padded with -1."""
    fn = "decoupled_softmax"
    t = _positive(fn, "temperature", temperature)
    q, k = _query_key(fn, query, keys, normalize)
    ptr, idx = _positive_lists(fn, positives, q.shape[0], k.shape[0], q.device)
    scale = torch.tensor(t, dtype=torch.float64)
    terms, *_ = _ops.forward(q, k, None, None, None, ptr, idx, scale, -1, _ops.KINDS["decoupled_softmax"], 0.0, 0.0,
                             0.0, 0, False, _wants_grad(q, k))  # fmt: skip
    return terms[:, 0].mean().to(query.dtype)
