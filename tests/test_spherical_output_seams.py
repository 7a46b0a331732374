"""SphericalOutputLayer at the seams: module-wide dtype casts and device moves (issue 18), and the
learning-rate behaviour of loss="spherical_softmax" (its gradient against a float64 reference written
here in plain PyTorch, and learning at the documented lr and eps)."""

import copy
import warnings

import pytest
import torch

import fastloss


def _layer(loss="zloss", **kwargs):
    torch.manual_seed(0)
    return fastloss.nn.SphericalOutputLayer(8, 20, loss=loss, lr=kwargs.pop("lr", 0.05), **kwargs)


def _batch(seed=1, m=6, d=8, D=20, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, d, generator=g).to(dtype), torch.randint(0, D, (m,), generator=g)


@pytest.mark.parametrize("cast", ["to", "half", "bfloat16"])
def test_16bit_cast_keeps_the_state_warns_and_training_still_steps(cast):
    layer = _layer()
    model = torch.nn.Sequential(torch.nn.Identity(), layer)
    target_dtype = torch.bfloat16 if cast != "half" else torch.float16
    with pytest.warns(UserWarning, match=r"fastloss\.SphericalOutputLayer: ignored the cast to torch\.(bfloat16|float16)"):
        model.to(target_dtype) if cast == "to" else getattr(model, cast)()
    assert layer.V.dtype == torch.float32 and layer.packed.dtype == torch.float64 and layer.u_inv_t.dtype == torch.float64
    before = layer.weight.clone()
    h, target = _batch(dtype=target_dtype)
    h.requires_grad_()
    loss = layer(h, target)
    loss.backward()
    assert h.grad.dtype == target_dtype and torch.isfinite(loss)
    assert not torch.equal(layer.weight, before), "the training step after the cast changed nothing"
    assert max(layer.check()[key] for key in ("q", "wbar", "inverse")) < 1e-6


def test_float64_cast_converts_v_only_and_matches_a_float64_layer():
    cast = _layer()
    dense = torch.nn.Linear(8, 20, bias=False, dtype=torch.float64)
    with torch.no_grad():
        dense.weight.copy_(cast.V)
    native = fastloss.nn.SphericalOutputLayer.from_linear(dense, lr=cast.lr, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a supported cast must not warn
        cast.double()
    assert cast.V.dtype == torch.float64 and cast.packed.dtype == torch.float64
    cast.float()
    assert cast.V.dtype == torch.float32 and cast.packed.dtype == torch.float64
    cast.double()
    for layer in (cast, native):
        h, target = _batch(dtype=torch.float64)
        layer(h, target).backward()
    # the same step as a layer built in float64 from the same weights
    torch.testing.assert_close(cast.weight, native.weight, rtol=1e-12, atol=1e-14)


def test_device_moves_keep_working_and_keep_the_state_bits():
    layer = _layer()
    h, target = _batch()
    layer(h, target).backward()
    state = copy.deepcopy(layer.state_dict())
    moved = layer.to(torch.device("cpu")).to("cpu", torch.float32)
    assert moved is layer
    for name, value in layer.state_dict().items():
        assert torch.equal(value, state[name]) and value.dtype == state[name].dtype, name
    layer(h, target).backward()
    assert int(layer.steps) == 2


def test_device_move_on_the_gpu_target(gpu):
    layer = _layer()
    reference = copy.deepcopy(layer)
    layer.to(gpu.device)
    h, target = _batch()
    with gpu.kernels():
        layer(gpu(h), gpu(target)).backward()
    reference(h, target).backward()
    assert torch.allclose(layer.weight.cpu(), reference.weight, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------- spherical softmax and its lr
def _plain_spherical_softmax(o, target, eps):
    """-log((o_c^2 + eps) / sum_k (o_k^2 + eps)), mean over samples: the loss written from its formula."""
    sq = o * o + eps
    return (-(sq.gather(1, target[:, None]).squeeze(1) / sq.sum(1)).log()).mean()


@pytest.mark.parametrize("eps", [1e-6, 1e-2])
def test_spherical_softmax_gradient_and_update_match_plain_float64(eps):
    lr = 0.3
    layer = _layer("spherical_softmax", lr=lr, eps=eps, dtype=torch.float64)
    w = layer.weight.clone().requires_grad_()
    h, target = _batch(seed=3, dtype=torch.float64)
    h1 = h.clone().requires_grad_()
    loss = layer(h1, target)
    loss.backward()
    h2 = h.clone().requires_grad_()
    expected = _plain_spherical_softmax(h2 @ w.t(), target, eps)
    expected.backward()
    torch.testing.assert_close(loss, expected.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(h1.grad, h2.grad, rtol=1e-10, atol=1e-12)
    # the layer's SGD step is W - lr dL/dW, dL/dW from autograd on the plain loss
    torch.testing.assert_close(layer.weight, w.detach() - lr * w.grad, rtol=1e-10, atol=1e-12)


def _separable_problem(d=32, classes=100, m=64, seed=1):
    g = torch.Generator().manual_seed(seed)
    prototypes = torch.randn(classes, d, generator=g, dtype=torch.float64)

    def batch():
        c = torch.randint(0, classes, (m,), generator=g)
        return prototypes[c] + 0.5 * torch.randn(m, d, generator=g, dtype=torch.float64), c

    return batch


def _train(lr, eps, steps=60):
    torch.manual_seed(0)
    layer = fastloss.nn.SphericalOutputLayer(32, 100, loss="spherical_softmax", lr=lr, eps=eps, dtype=torch.float64)
    batch = _separable_problem()
    losses = []
    for _ in range(steps):
        h, target = batch()
        loss = layer(h, target)
        loss.backward()
        losses.append(float(loss.detach()))
    return sum(losses[:5]) / 5, sum(losses[-5:]) / 5


def test_spherical_softmax_learns_at_the_documented_lr_and_eps():
    first, last = _train(lr=0.5, eps=1e-2)
    assert last < 0.45 * first, (first, last)
    first, last = _train(lr=0.05, eps=1e-6)  # the small-eps setting needs the small lr
    assert last < 0.6 * first, (first, last)
