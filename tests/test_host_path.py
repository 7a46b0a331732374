"""The thin host path (issue 17): plain eager calls that need no gradient skip torch's dispatcher
(``_library.FastOp``) and, for quantized weights, reuse the checks made once; every other call takes the
dispatcher. These tests check that the shortcut is taken exactly when it may be, and that it computes
what the dispatcher path computes, bit for bit."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from conftest import is_gpu
from torch.utils._python_dispatch import TorchDispatchMode

import fastloss
import fastloss.metric as metric
import fastloss.ot as ot
import fastloss.quant as quant
from fastloss import _library as L


class CountingOverload:
    """Stands in for a FastOp's OpOverload and counts the calls that reach the dispatcher."""

    def __init__(self, overload):
        self.overload, self.calls = overload, 0

    def __call__(self, *args):
        self.calls += 1
        return self.overload(*args)


@pytest.fixture
def zloss_dispatches():
    op = L.OPS["zloss"]
    original = op.overload
    counter = CountingOverload(original)
    op.overload = counter
    try:
        yield counter
    finally:
        op.overload = original


def _zloss_inputs(requires_grad=False):
    g = torch.Generator().manual_seed(3)
    return torch.randn(5, 7, generator=g).requires_grad_(requires_grad), torch.randint(0, 7, (5,), generator=g)


def test_the_shortcut_is_taken_for_no_grad_eager_calls(zloss_dispatches):
    x, t = _zloss_inputs()
    fastloss.zloss(x, t)
    with torch.no_grad():
        fastloss.zloss(x.requires_grad_(), t)
    assert zloss_dispatches.calls == 0


def test_calls_that_need_a_gradient_run_the_ops_formula_without_the_dispatcher(zloss_dispatches):
    x, t = _zloss_inputs(requires_grad=True)
    loss = fastloss.zloss(x, t, reduction="none")
    assert zloss_dispatches.calls == 0
    assert "zloss_function" in type(loss.grad_fn).__name__ or "zloss_function" in str(loss.grad_fn.next_functions)
    loss = loss.sum()
    loss.backward()
    x2 = x.detach().clone().requires_grad_()
    with L.always_dispatch():
        expected = fastloss.zloss(x2, t, reduction="none").sum()
        expected.backward()
    assert zloss_dispatches.calls == 1
    assert torch.equal(loss, expected) and torch.equal(x.grad, x2.grad)


def test_missing_arguments_still_get_the_dispatchers_error():
    x, t = _zloss_inputs(requires_grad=True)
    with pytest.raises((TypeError, RuntimeError)):
        L.OPS["zloss"](x, t, 1.0)


class NoOpMode(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


class NoOpFunctionMode(torch.overrides.TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("scope", ["always_dispatch", "dispatch_mode", "function_mode", "vmap"])
def test_modes_and_transforms_take_the_dispatcher(zloss_dispatches, scope):
    x, t = _zloss_inputs()
    if scope == "vmap":
        out = torch.func.vmap(lambda row, c: fastloss.zloss(row[None], c[None]))(x, t)
        assert out.shape == (5,)
    else:
        context = {"always_dispatch": L.always_dispatch, "dispatch_mode": NoOpMode,
                   "function_mode": NoOpFunctionMode}[scope]()  # fmt: skip
        with context:
            fastloss.zloss(x, t)
    assert zloss_dispatches.calls >= 1


def test_fake_and_meta_tensors_take_the_dispatcher():
    x = torch.empty(6, 9, device="meta")
    t = torch.empty(6, dtype=torch.int64, device="meta")
    assert fastloss.zloss(x, t, reduction="none").shape == (6,)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fx = mode.from_tensor(torch.randn(4, 3))
        ft = mode.from_tensor(torch.zeros(4, dtype=torch.int64))
        assert fastloss.zloss(fx, ft, reduction="none").shape == (4,)


def _public_calls(device):
    """A call of every family's main functions on small awkward shapes."""
    g = torch.Generator().manual_seed(11)

    def rand(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    labels = torch.randint(0, 3, (9,), generator=g).to(device)
    x, y = rand(9, 12), rand(9, 12)
    logits, target = rand(6, 11), torch.randint(0, 11, (6,), generator=g).to(device)
    half = torch.float16 if is_gpu(device) else torch.float32
    q, k, v = (rand(1, 2, 9, 32, dtype=half) for _ in range(3))
    cost = rand(2, 5, 7).abs()
    qw = quant.quantize(torch.randn(70, 150, generator=g), group_size=64).to(device)
    xq = rand(3, 150, dtype=torch.float16)
    return {
        "zloss": lambda: fastloss.zloss(logits, target, reduction="none"),
        "taylor_softmax_loss": lambda: fastloss.taylor_softmax_loss(logits, target),
        "info_nce": lambda: metric.info_nce(x, y),
        "multi_similarity": lambda: metric.multi_similarity(x, labels),
        "triplet": lambda: metric.triplet(x, labels),
        "softplus_attention": lambda: fastloss.softplus_attention(q, k, v),
        "sinkhorn": lambda: ot.sinkhorn(cost, eps=0.2, max_iter=20).f,
        "balanced_assignment": lambda: ot.balanced_assignment(cost[0]),
        "quant.matmul": lambda: quant.matmul(xq, qw),
    }


def test_shortcut_and_dispatcher_agree_bit_for_bit(device):
    for name, call in _public_calls(device).items():
        with torch.no_grad():
            direct = call()
            with L.always_dispatch():
                dispatched = call()
        assert direct.dtype == dispatched.dtype and direct.shape == dispatched.shape, name
        assert torch.equal(direct.nan_to_num(1.5), dispatched.nan_to_num(1.5)), name


def test_quantized_weight_checks_are_reused_and_follow_the_arrays():
    g = torch.Generator().manual_seed(5)
    qw = quant.quantize(torch.randn(64, 128, generator=g), group_size=64)
    x = torch.randn(2, 128, generator=g)
    first = quant.matmul(x, qw)
    prepared = qw._fastloss_prepared
    assert torch.equal(quant.matmul(x, qw), first)
    assert qw._fastloss_prepared is prepared  # reused, not rebuilt
    # New arrays (e.g. scales converted) are checked again: the cache follows the objects.
    qw.scales = qw.scales.to(torch.bfloat16)
    out = quant.matmul(x, qw)
    assert qw._fastloss_prepared is not prepared
    expected = x.double() @ qw.dequantize(torch.float32).double().t()
    assert torch.allclose(out.double(), expected, rtol=1e-5, atol=1e-4)
    # A wrong array is still refused with a clear error, before anything runs.
    qw.zeros = qw.zeros[:, :-1]
    with pytest.raises(ValueError, match="zeros"):
        quant.matmul(x, qw)


def test_quant_linear_cache_does_not_keep_old_arrays_alive():
    layer = quant.QuantLinear.from_linear(torch.nn.Linear(128, 64), group_size=64)
    x = torch.randn(3, 128, dtype=layer.scales.dtype)
    layer(x)
    old_main = layer.main
    ref = weakref.ref(old_main)
    layer.main = old_main.clone()
    del old_main
    gc.collect()
    assert ref() is None, "the prepared-weight cache kept a replaced array alive"
    layer(x)


def test_gradients_agree_with_the_dispatcher_path(device):
    """Forward + backward through the shortcut's autograd.Function equals the dispatcher's, bit for bit."""
    g = torch.Generator().manual_seed(23)
    half = torch.float16 if is_gpu(device) else torch.float32

    def rand(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    inputs = {
        "zloss": ((rand(6, 11),), lambda x: fastloss.zloss(x, torch.arange(6, device=device) % 11)),
        "info_nce": ((rand(9, 12), rand(9, 12)), lambda x, y: metric.info_nce(x, y, symmetric=True)),
        "multi_similarity": ((rand(9, 12),), lambda x: metric.multi_similarity(x, torch.arange(9, device=device) % 3)),
        "softplus_attention": ((rand(1, 2, 9, 32, dtype=half), rand(1, 2, 9, 32, dtype=half),
                                rand(1, 2, 9, 32, dtype=half)), lambda q, k, v: fastloss.softplus_attention(q, k, v)),
        "sinkhorn_points": ((rand(2, 5, 3), rand(2, 7, 3)), lambda x, y: ot.sinkhorn_points(x, y, eps=0.3).cost),
    }  # fmt: skip
    for name, (tensors, call) in inputs.items():
        grads = []
        for dispatch in (False, True):
            leaves = [t.detach().clone().requires_grad_() for t in tensors]
            with L.always_dispatch(dispatch):
                out = call(*leaves)
                out.float().sum().backward()
            grads.append((out.detach(), [leaf.grad for leaf in leaves]))
        (out_a, grads_a), (out_b, grads_b) = grads
        assert torch.equal(out_a, out_b), name
        for a, b in zip(grads_a, grads_b):
            assert a is not None and torch.equal(a, b), name
