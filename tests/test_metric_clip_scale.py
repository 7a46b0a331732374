"""open_clip's conventions for info_nce's logit scale without a trap (scale=, log_scale=, logit_scale=,
max_scale=, the warnings and errors), float32 losses for 16-bit inputs in the query/key losses, and
reduction="none"/"sum"/"mean" of auc_loss and decoupled_softmax: against float64 references written
plainly in PyTorch."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

import fastloss
from fastloss import metric as M

from conftest import assert_close, is_gpu


def _data(n=9, m=9, d=12, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, d, generator=g, dtype=dtype).requires_grad_(),
            torch.randn(m, d, generator=g, dtype=dtype).requires_grad_())  # fmt: skip


def clip_loss(q, k, scale, symmetric=True):
    """open_clip's ClipLoss, written plainly: logits = scale * q k^T, cross entropy both ways."""
    logits = scale * F.normalize(q, dim=1) @ F.normalize(k, dim=1).T
    target = torch.arange(q.shape[0])
    rows = F.cross_entropy(logits, target)
    return 0.5 * (rows + F.cross_entropy(logits.T, target)) if symmetric else rows


@pytest.mark.parametrize("symmetric", [False, True])
def test_scale_log_scale_and_logit_scale_mean_what_open_clip_means(symmetric):
    q, k = _data()
    log_s = torch.tensor(math.log(1 / 0.07), dtype=torch.float64, requires_grad=True)
    expected = clip_loss(q, k, log_s.exp(), symmetric)
    want = torch.autograd.grad(expected, (q, k, log_s))
    for kwargs in ({"log_scale": log_s}, {"scale": log_s.exp()}, {"logit_scale": log_s.exp()}):
        ours = M.info_nce(q, k, symmetric=symmetric, **kwargs)
        assert_close(ours, expected, 1e-12, str(list(kwargs)))
        for got, w in zip(torch.autograd.grad(ours, (q, k, log_s)), want):
            assert_close(got, w, 1e-10, f"gradient with {list(kwargs)}")
    number = float(log_s.detach())
    assert_close(M.info_nce(q, k, symmetric=symmetric, log_scale=number), expected, 1e-12, "log_scale number")
    assert_close(M.info_nce(q, k, symmetric=symmetric, scale=math.exp(number)), expected, 1e-12, "scale number")
    assert_close(M.info_nce(q, k, symmetric=symmetric), expected, 1e-12, "the default temperature 0.07")


def test_max_scale_clamps_the_multiplier_as_clip_does():
    q, k = _data(seed=1)
    log_s = torch.tensor(math.log(400.0), dtype=torch.float64, requires_grad=True)
    ours = M.info_nce(q, k, symmetric=True, log_scale=log_s, max_scale=100.0)
    expected = clip_loss(q, k, log_s.exp().clamp(max=100.0))
    assert_close(ours, expected, 1e-12, "clamped")
    (grad,) = torch.autograd.grad(ours, log_s)
    assert float(grad) == 0.0  # clamped: no gradient to the scale, as torch.clamp
    assert_close(M.info_nce(q, k, temperature=0.001, max_scale=100.0), clip_loss(q, k, 100.0, False), 1e-12, "number")


def test_temperature_with_a_scale_warns_and_the_scale_wins():
    q, k = _data(seed=2)
    with pytest.warns(UserWarning, match="fastloss.info_nce: 'temperature' is ignored because 'scale'") as record:
        ours = M.info_nce(q, k, temperature=0.5, scale=20.0)
    assert record[0].filename == __file__  # stacklevel: the user's line
    assert_close(ours, clip_loss(q, k, 20.0, False), 1e-12, "scale wins")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        M.info_nce(q, k, scale=20.0)  # no temperature given: no warning
        M.info_nce(q, k, temperature=0.07)


def test_a_parameter_given_as_logit_scale_warns_that_it_is_the_multiplier():
    q, k = _data(seed=3)
    parameter = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07), dtype=torch.float64))
    with pytest.warns(UserWarning, match="pass log_scale=model.logit_scale"):
        M.info_nce(q, k, logit_scale=parameter)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        M.info_nce(q, k, logit_scale=parameter.exp())  # open_clip's call: no warning


def test_two_scales_or_a_bad_scale_are_refused_with_a_clear_error():
    q, k = _data(seed=4)
    s = torch.tensor(10.0, dtype=torch.float64)
    cases = [
        (dict(scale=s, log_scale=s), ValueError, "give one of 'scale'.*got scale and log_scale"),
        (dict(logit_scale=s, scale=1.0), ValueError, "got scale and logit_scale"),
        (dict(scale=torch.ones(2)), ValueError, "argument 'scale' must be one floating-point value"),
        (dict(log_scale=torch.tensor(2)), ValueError, "argument 'log_scale' must be one floating-point value"),
        (dict(scale="10"), TypeError, "argument 'scale' must be a real number"),
        (dict(scale=s, max_scale=0.0), ValueError, "argument 'max_scale' must be > 0"),
        (dict(temperature=0.0), ValueError, "argument 'temperature' must be > 0"),
        (dict(labels=torch.tensor(14.3)), TypeError, "open_clip's ClipLoss takes logit_scale"),
    ]
    for kwargs, error, words in cases:
        with pytest.raises(error, match=f"^fastloss.info_nce: .*{words}"):
            M.info_nce(q, k, **kwargs)


LOSSES_16 = {
    "info_nce": lambda q, k, **kw: M.info_nce(q, k, temperature=0.1, **kw),
    "clip": lambda q, k, **kw: M.info_nce(q, k, symmetric=True, log_scale=torch.tensor(2.3, device=q.device), **kw),
    "auc": lambda q, k, **kw: M.auc_loss(q, k, temperature=0.5, **kw),
    "decoupled": lambda q, k, **kw: M.decoupled_softmax(q, k, torch.eye(q.shape[0], k.shape[0], dtype=torch.bool,
                                                                           device=q.device), **kw),
}  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["f16", "bf16", "f32"])
@pytest.mark.parametrize("loss", sorted(LOSSES_16))
def test_the_loss_is_float32_for_16_bit_inputs_and_the_gradient_keeps_their_dtype(loss, dtype, device):
    q64, k64 = _data(n=10, m=10, d=16, seed=5)
    q = q64.detach().to(dtype).to(device).requires_grad_()
    k = k64.detach().to(dtype).to(device).requires_grad_()
    fn = LOSSES_16[loss]
    for reduction in ("mean", "sum", "none"):
        value = fn(q, k, reduction=reduction)
        assert value.dtype == torch.float32, f"{loss} {reduction}: {value.dtype}"
    value = fn(q, k)
    grads = torch.autograd.grad(value, (q, k))
    assert [g.dtype for g in grads] == [dtype, dtype]
    # the same loss on the 16-bit values widened to float64 (the rounding of the inputs is not the error)
    expected = fn(q.detach().double().cpu(), k.detach().double().cpu()) if not is_gpu(device) else None
    if expected is not None:
        assert_close(value, expected, 1e-2 if dtype == torch.bfloat16 else 2e-3, f"{loss} {dtype}")


def ref_auc_rows(q, k, labels, temperature):
    s = F.normalize(q, dim=1) @ F.normalize(k, dim=1).T
    positive = s.gather(1, labels[:, None])
    negative = torch.ones_like(s, dtype=torch.bool).scatter(1, labels[:, None], False)
    return torch.where(negative, F.softplus((s - positive) / temperature), 0).sum(1) / negative.sum(1)


def ref_decoupled_rows(q, k, mask, temperature):
    logits = F.normalize(q, dim=1) @ F.normalize(k, dim=1).T / temperature
    lse_neg = logits.masked_fill(mask, -math.inf).logsumexp(1, keepdim=True)
    return torch.where(mask, F.softplus(lse_neg - logits), 0).sum(1) / mask.sum(1).clamp(min=1)


def test_reductions_of_auc_loss_and_decoupled_softmax(device):
    q, k = _data(n=11, m=17, d=8, seed=6, dtype=torch.float32)
    g = torch.Generator().manual_seed(7)
    labels = torch.randint(0, 17, (11,), generator=g)
    mask = torch.rand(11, 17, generator=g) < 0.2
    mask[0] = False  # a query without positives: 0
    weights = torch.rand(11, generator=g, dtype=torch.float64)
    cases = (
        ("auc", lambda a, b, **kw: M.auc_loss(a, b, labels=labels.to(device), temperature=0.4, **kw),
         lambda a, b: ref_auc_rows(a, b, labels, 0.4)),
        ("decoupled", lambda a, b, **kw: M.decoupled_softmax(a, b, mask.to(device), temperature=0.2, **kw),
         lambda a, b: ref_decoupled_rows(a, b, mask, 0.2)),
    )  # fmt: skip
    for name, ours, ref in cases:
        qd, kd = q.detach().to(device).requires_grad_(), k.detach().to(device).requires_grad_()
        q64, k64 = q.detach().double().requires_grad_(), k.detach().double().requires_grad_()
        rows = ref(q64, k64)
        for reduction, combine in (("none", lambda v: (v * weights.to(v)).sum()), ("sum", lambda v: v),
                                   ("mean", lambda v: v)):  # fmt: skip
            value = ours(qd, kd, reduction=reduction)
            expected = {"none": rows, "sum": rows.sum(), "mean": rows.mean()}[reduction]
            assert_close(value, expected, 2e-5, f"{name} {reduction}")
            got = torch.autograd.grad(combine(value), (qd, kd))
            want = torch.autograd.grad(combine(expected), (q64, k64), retain_graph=True)
            for a, b in zip(got, want):
                assert_close(a, b, 5e-5, f"{name} {reduction} gradient")


def test_a_tensor_scale_compiles_with_fullgraph():
    """No host read and no graph break: the scale check is torch ops (NaN for a bad value) under compile."""
    q, k = _data(n=8, m=8, d=6, seed=8, dtype=torch.float32)
    module = fastloss.nn.InfoNCELoss(symmetric=True, learnable_scale=True)
    compiled = torch.compile(module, fullgraph=True, backend="eager")
    assert_close(compiled(q, k), module(q, k), 1e-6, "compiled module")
    fn = torch.compile(lambda a, b, s: M.info_nce(a, b, log_scale=s), fullgraph=True, backend="eager")
    assert_close(fn(q, k, torch.tensor(2.0)), M.info_nce(q, k, log_scale=torch.tensor(2.0)), 1e-6, "compiled fn")
    assert bool(fn(q, k, torch.tensor(math.nan)).isnan())
