"""SphericalOutputLayer: the exact factored SGD update against dense SGD in float64, its invariants,
the stability control, bad inputs, the ops, CUDA and data parallelism."""

import contextlib
import copy
import os
import re
import zlib

import pytest
import torch

import fastloss
from fastloss import spherical_factored as ops
from fastloss.reference.spherical_output import DenseSGD, sample_losses
from conftest import assert_close

LOSSES = ["zloss", "mse", "spherical_softmax", "taylor_softmax"]
LOSS_KWARGS = {"zloss": {"a": 1.5, "b": 0.5}, "mse": {}, "spherical_softmax": {}, "taylor_softmax": {}}


def make_layer(d, D, loss, device="cpu", dtype=torch.float64, state_dtype=torch.float64, seed=0, **kwargs):
    torch.manual_seed(seed)
    kwargs = {"lr": 0.05, **LOSS_KWARGS[loss], **kwargs}
    return fastloss.nn.SphericalOutputLayer(d, D, loss=loss, dtype=dtype, state_dtype=state_dtype, device=device, **kwargs)


def make_batch(generator, m, d, D, K=None, repeat=False, ignore=False, weights=False, scale=1.0):
    h = torch.randn(m, d, generator=generator, dtype=torch.float64) * scale
    shape = (m,) if K is None else (m, K)
    target = torch.randint(0, D, shape, generator=generator)
    if repeat:  # the same class in several samples, and within a sample when K > 1
        target.view(-1)[::3] = target.view(-1)[0]
        if K is not None and K > 1:
            target[1::2, 1] = target[1::2, 0]
    if ignore:
        target.view(-1)[1::4] = -100
    w = torch.rand(shape, generator=generator, dtype=torch.float64) + 0.5 if weights else None
    return h, target, w


def dense_twin(layer, loss, reduction="mean", weight_decay=0.0):
    return DenseSGD(layer.weight, lr=layer.lr, weight_decay=weight_decay, reduction=reduction, loss=loss,
                    ignore_index=layer.ignore_index, **LOSS_KWARGS[loss])  # fmt: skip


def run_against_dense(layer, dense, steps, m, K=None, device="cpu", seed=1, check_every_step=True, tol=1e-10, **batch):
    generator = torch.Generator().manual_seed(seed)
    d, D = layer.in_features, layer.num_classes
    for step in range(steps):
        h, target, w = make_batch(generator, m, d, D, K, **batch)
        grad_weights = torch.rand(m, generator=generator, dtype=torch.float64) + 0.5
        x = h.to(device).requires_grad_()
        out = layer(x, target.to(device), None if w is None else w.to(device))
        (out * grad_weights.to(device, out.dtype)).sum().backward() if out.dim() else out.backward()
        t2 = target if K is not None else target.unsqueeze(1)
        expected, expected_grad = dense.step(h, t2, None if w is None else w.reshape(t2.shape), grad_weights)
        assert_close(out, expected, tol, f"loss at step {step}", atol=tol)
        assert_close(x.grad, expected_grad, tol, f"h.grad at step {step}", atol=tol)
        if check_every_step:
            drift = layer.check()
            assert max(drift.values()) < tol * 10, f"invariants drift at step {step}: {drift}"
    assert_close(layer.weight, dense.weight, tol, "W after the last step")


# ---------------------------------------------------------------------------- dense equivalence
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize(
    "m,K,extra",
    [(5, None, {}), (1, None, {}), (23, None, {}), (40, 2, {"repeat": True}), (6, 3, {"repeat": True, "ignore": True}),
     (7, 2, {"weights": True, "repeat": True})],
    ids=["woodbury", "sherman-morrison", "m>d", "m>4d-gram-free", "K3-repeat-ignore", "K2-weights"],
)
def test_matches_dense_sgd_float64(loss, m, K, extra, device):
    d, D = 9, 37
    layer = make_layer(d, D, loss, device, lr=0.05 if loss != "mse" else 0.01)
    dense = dense_twin(layer, loss)
    seed = zlib.crc32(repr((loss, m, K)).encode())
    run_against_dense(layer, dense, steps=12, m=m, K=K, device=device, seed=seed, **extra)


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_reductions_and_weight_decay_match_dense_sgd(reduction, device):
    layer = make_layer(8, 29, "zloss", device, reduction=reduction, weight_decay=0.3, lr=0.1)
    dense = dense_twin(layer, "zloss", reduction=reduction, weight_decay=0.3)
    run_against_dense(layer, dense, steps=10, m=4, device=device, ignore=True)


def test_float32_stays_within_1e4_of_dense_for_100_steps(device):
    layer = make_layer(16, 211, "zloss", device, dtype=torch.float32, state_dtype=torch.float32, lr=0.5)
    dense = dense_twin(layer, "zloss")
    run_against_dense(layer, dense, steps=100, m=8, device=device, check_every_step=False, tol=1e-4)


def test_inverse_update_paths_agree():
    """Woodbury (m x m) and the d x d form, each by LU and by Newton-Schulz, and Sherman-Morrison
    (m = 1) give the same state, also at an lr where ||X|| is large enough to need many iterations."""
    generator = torch.Generator().manual_seed(3)
    for m, lr in ((1, 0.01), (4, 0.01), (15, 0.01), (6, 0.03)):
        h, target, _ = make_batch(generator, m, 8, 40)
        states = []
        for path in ("woodbury", "solve"):
            for method in ("auto", "lu"):
                layer = make_layer(8, 40, "mse", lr=lr)
                layer._inverse_path, layer._inverse_method = path, method
                layer(h, target).backward()
                states.append({k: v.clone() for k, v in layer.state_dict().items()})
        for state in states[1:]:
            for key in states[0]:
                assert_close(state[key], states[0][key], 1e-12, f"{key} (m={m}, lr={lr})", atol=1e-15)


@pytest.mark.parametrize("m,K", [(5, 1), (30, 3)])
def test_q_update_forms_agree(m, K, device):
    """The m x m Gram form and the m x m-free form of the Q update give the same state."""
    generator = torch.Generator().manual_seed(m)
    h, target, w = make_batch(generator, m, 7, 19, K, repeat=True, ignore=True, weights=True)
    states = []
    for form in ("gram", "gram_free"):
        layer = make_layer(7, 19, "zloss", device)
        layer._q_update = form
        for _ in range(3):
            layer(h.to(device), target.to(device), w.to(device)).backward()
        states.append({k: v.cpu().clone() for k, v in layer.state_dict().items()})
    for key in states[0]:
        assert_close(states[1][key], states[0][key], 1e-12, key, atol=1e-15)


def test_newton_schulz_iteration_count_reaches_rounding():
    from fastloss.nn import _factored_inverse as inverse

    for bound in (1e-9, 1e-3, 0.1, 0.49):
        for dtype in (torch.float32, torch.float64):
            k = inverse.iterations_for(bound, dtype)
            assert bound ** (2 ** (k + 1)) <= torch.finfo(dtype).eps / 4
            assert k == 0 or bound ** (2**k) > torch.finfo(dtype).eps / 4  # and no more than needed
    x = torch.randn(9, 9, dtype=torch.float64)
    x *= 0.3 / torch.linalg.matrix_norm(x)
    k = inverse.iterations_for(0.3, torch.float64)
    expected = torch.linalg.inv(torch.eye(9, dtype=torch.float64) - x)
    rhs = torch.randn(9, 4, dtype=torch.float64)
    assert_close(inverse.solve_near_identity(x, rhs, k), expected @ rhs, 1e-14, "Newton-Schulz solve")


# ---------------------------------------------------------------------------- reparametrisations
def scramble_factorization(layer, spread=8.0):
    """U <- A U, V <- V A^-1 with A of singular values in [1/spread, spread]: W is unchanged."""
    d = layer.in_features
    q1, _ = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64))
    q2, _ = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64))
    sigma = torch.logspace(-1, 1, d, base=spread, dtype=torch.float64)
    a = q1 @ torch.diag(sigma) @ q2.T
    with torch.no_grad():
        layer.U.copy_(a @ layer.U)
        layer.V.copy_((layer.V.double() @ torch.linalg.inv(a)).to(layer.V.dtype))
        layer.u_inv_t.copy_(torch.linalg.inv(layer.U).T)


@pytest.mark.parametrize("spread,unfactorized", [(2.5, False), (8.0, True)])
def test_stabilize_and_unfactorize_leave_w_unchanged(spread, unfactorized):
    layer = make_layer(12, 50, "zloss")
    h, target, _ = make_batch(torch.Generator().manual_seed(5), 6, 12, 50)
    layer(h, target).backward()
    torch.manual_seed(1)
    scramble_factorization(layer, spread)
    before = layer.weight.clone()
    q, wbar = layer.Q.clone(), layer.wbar.clone()
    report = layer.stabilize()
    assert report["unfactorized"] == unfactorized
    assert unfactorized or report["reset"] > 0
    assert_close(layer.weight, before, 1e-12, "W")
    assert_close(layer.Q, q, 1e-12, "Q")
    assert_close(layer.wbar, wbar, 1e-12, "wbar")
    sigma = torch.linalg.svdvals(layer.U)
    assert sigma.min() >= 0.5 - 1e-12 and sigma.max() <= 2 + 1e-12
    assert max(layer.check().values()) < 1e-12


def test_weight_decay_is_the_dense_rescaling():
    layer = make_layer(6, 20, "taylor_softmax", weight_decay=0.5, lr=0.2)
    before = layer.weight.clone()
    h = torch.zeros(2, 6, dtype=torch.float64)  # zero input: the loss gradient on W is zero
    layer(h, torch.tensor([1, 2])).backward()
    assert_close(layer.weight, before * (1 - 0.2 * 0.5), 1e-14, "W")
    assert max(layer.check().values()) < 1e-13


def test_stress_mse_large_lr_stays_finite_with_stabilization():
    """Plain SGD on MSE shrinks U every step (2 lr lambda_max ~ 0.6 here): in float32, 1000 steps
    without the control overflow (the step refuses non-finite values); with it the layer stays
    within 1e-5 of dense SGD."""
    errors = {}
    for every in (10, 0):
        layer = make_layer(32, 2000, "mse", dtype=torch.float32, state_dtype=torch.float32, lr=0.05,
                           stabilize_every=every, refresh_every=100 if every else 0)  # fmt: skip
        dense = dense_twin(layer, "mse")
        generator = torch.Generator().manual_seed(1)
        try:
            for _ in range(1000):
                h, target, _ = make_batch(generator, 16, 32, 2000)
                layer(h.float(), target).backward()
                dense.step(h, target.unsqueeze(1))
            errors[every] = float((layer.weight.double() - dense.weight).norm() / dense.weight.norm())
        except RuntimeError as error:
            assert "non-finite values in this step" in str(error)
            errors[every] = float("inf")
    assert errors[10] < 1e-5, errors
    assert not errors[0] < 1e-3, errors  # NaN or far off: the control is what keeps the run exact


def test_guard_raises_before_u_turns_singular_and_keeps_state():
    layer = make_layer(4, 10, "mse", lr=0.5)
    h = torch.full((1, 4), 1.0, dtype=torch.float64)  # 2 lr ||h||^2 = 4 >= 1
    before = copy.deepcopy(layer.state_dict())
    loss = layer(h, torch.tensor([3]))
    with pytest.raises(RuntimeError, match=r"could make U singular: 2 \* lr \* lambda_max.* = 4 >= 1"):
        loss.backward()
    for key, value in layer.state_dict().items():
        assert torch.equal(value, before[key]), key


# ---------------------------------------------------------------------------- API
def test_from_linear_state_dict_logits_topk_and_eval_mode():
    linear = torch.nn.Linear(7, 30, bias=False, dtype=torch.float64)
    layer = fastloss.nn.SphericalOutputLayer.from_linear(linear, loss="spherical_softmax", lr=0.1)
    assert layer.V.dtype == torch.float64
    assert_close(layer.weight, linear.weight, 1e-15, "W")
    h, target, _ = make_batch(torch.Generator().manual_seed(2), 5, 7, 30)
    layer(h, target).backward()
    clone = fastloss.nn.SphericalOutputLayer(7, 30, loss="spherical_softmax", lr=0.1, dtype=torch.float64)
    clone.load_state_dict(layer.state_dict())
    assert int(clone.steps) == 1
    for a, b in zip(layer.state_dict().values(), clone.state_dict().values()):
        assert torch.equal(a, b)
    expected = h @ layer.weight.T
    assert_close(layer.logits(h), expected, 1e-13, "logits")
    values, indices = layer.topk(h, 4, chunk=2)
    top = expected.topk(4, dim=-1)
    assert torch.equal(indices, top.indices)
    assert_close(values, top.values, 1e-13, "topk values")
    layer.eval()
    before = layer.weight.clone()
    x = h.clone().requires_grad_()
    layer(x, target).backward()
    assert x.grad is not None and torch.equal(layer.weight, before)
    with pytest.raises(ValueError, match="from_linear: the layer has no bias"):
        fastloss.nn.SphericalOutputLayer.from_linear(torch.nn.Linear(3, 4), lr=0.1)
    assert "num_classes=30" in repr(layer) and "SphericalOutputLayer" in dir(fastloss.nn)


def test_backward_after_an_update_is_refused():
    layer = make_layer(5, 12, "zloss")
    h, target, _ = make_batch(torch.Generator().manual_seed(4), 3, 5, 12)
    loss = layer(h, target)
    layer.refresh()  # any change of the state after the forward (here a no-op recomputation of Q)
    with pytest.raises(RuntimeError, match="backward of a forward computed before the layer's last update"):
        loss.backward()


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_all_ignored_batch_gives_no_gradient_and_changes_nothing(reduction, device):
    """As torch's cross-entropy: the mean over no target is NaN (0/0), the gradient is 0, nothing moves."""
    layer = make_layer(5, 12, "zloss", device, reduction=reduction)
    before = copy.deepcopy(layer.state_dict())
    x = torch.randn(3, 5, dtype=torch.float64, device=device, requires_grad=True)
    out = layer(x, torch.full((3, 2), -100, device=device))
    out.backward()
    assert bool(torch.isnan(out)) if reduction == "mean" else float(out.detach()) == 0.0
    assert torch.equal(x.grad, torch.zeros_like(x))
    for key, value in layer.state_dict().items():
        if key != "steps":
            assert torch.equal(value, before[key]), key


def test_non_finite_inputs_are_refused_before_any_state_change():
    layer = make_layer(5, 12, "mse")
    before = copy.deepcopy(layer.state_dict())
    h = torch.randn(3, 5, dtype=torch.float64)
    h[1, 2] = float("nan")
    for make_loss in (lambda: layer(h, torch.tensor([0, 1, 2])), lambda: layer(h.nan_to_num(), torch.tensor([0, 1, 2])) * float("inf")):
        with pytest.raises(RuntimeError, match="non-finite values in this step"):
            make_loss().backward()
        for key, value in layer.state_dict().items():
            assert torch.equal(value, before[key]), key


def test_two_training_forwards_in_one_backward_are_refused_before_any_change():
    layer = make_layer(5, 12, "zloss")
    before = copy.deepcopy(layer.state_dict())
    h, target, _ = make_batch(torch.Generator().manual_seed(4), 3, 5, 12)
    with pytest.raises(RuntimeError, match="2 training forwards of the same state are waiting for backward"):
        (layer(h, target) + layer(h, target)).backward()
    for key, value in layer.state_dict().items():
        assert torch.equal(value, before[key]), key
    dropped = layer(h, target)  # a forward whose graph is dropped does not count
    del dropped
    layer(h, target).backward()
    assert int(layer.steps) == 1


def test_torch_compile_of_a_training_step_matches_eager():
    layers = [make_layer(6, 20, "taylor_softmax") for _ in range(2)]
    compiled = torch.compile(layers[1])
    generator = torch.Generator().manual_seed(13)
    for _ in range(2):
        h, target, _ = make_batch(generator, 4, 6, 20)
        xs = [h.clone().requires_grad_() for _ in range(2)]
        outs = [layers[0](xs[0], target), compiled(xs[1], target)]
        for out in outs:
            out.backward()
        assert_close(outs[1], outs[0], 1e-12, "loss")
        assert_close(xs[1].grad, xs[0].grad, 1e-12, "h.grad")
    assert_close(layers[1].weight, layers[0].weight, 1e-12, "W")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_low_precision_and_batched_inputs(dtype, device):
    """h of any float dtype and any leading shape: the loss is float32, h.grad has h's dtype and shape."""
    layer = make_layer(8, 31, "spherical_softmax", device, reduction="none")
    dense = dense_twin(layer, "spherical_softmax", reduction="none")
    generator = torch.Generator().manual_seed(12)
    h = torch.randn(2, 3, 8, generator=generator, dtype=torch.float64).to(dtype)
    target = torch.randint(0, 31, (2, 3), generator=generator)
    x = h.to(device).requires_grad_()
    out = layer(x, target.to(device))
    out.sum().backward()
    assert out.shape == (2, 3) and out.dtype == torch.float32
    assert x.grad.dtype == dtype and x.grad.shape == h.shape
    expected, expected_grad = dense.step(h.double().reshape(6, 8), target.reshape(6, 1), grad_weights=torch.ones(6))
    assert_close(out.reshape(6), expected, 1e-6, "loss")
    assert_close(x.grad.reshape(6, 8), expected_grad, 1e-2 if dtype != torch.float32 else 1e-6, "h.grad")
    assert_close(layer.weight, dense.weight, 1e-12, "W")


@pytest.mark.sim_no_launch  # nothing to launch for 0 samples
def test_empty_batch_changes_nothing(device):
    layer = make_layer(5, 12, "zloss", device, reduction="sum")
    before = copy.deepcopy(layer.state_dict())
    x = torch.zeros(0, 5, dtype=torch.float64, device=device, requires_grad=True)
    out = layer(x, torch.zeros(0, dtype=torch.int64, device=device))
    out.backward()
    assert float(out.detach()) == 0.0 and x.grad.shape == (0, 5)
    for key, value in layer.state_dict().items():
        assert torch.equal(value, before[key]), key


BAD_INPUTS = [
    (lambda h, t: (h, torch.tensor([0, 1, 12])), ValueError, "argument 'target' has out-of-range class index 12 at flat position 2"),
    (lambda h, t: (h, torch.tensor([0, -5, 1])), ValueError, "out-of-range class index -5"),
    (lambda h, t: (h, t.int()), TypeError, "argument 'target' must have dtype in (int64)"),
    (lambda h, t: (h.long(), t), TypeError, "argument 'h' must have dtype in"),
    (lambda h, t: (h[:, :4], t), ValueError, "argument 'h' must have shape (..., 5)"),
    (lambda h, t: (h, t[:2]), ValueError, "argument 'target' must have shape (3,) or (3,) + (K,)"),
    (lambda h, t: (h.tolist(), t), TypeError, "argument 'h' must be a torch.Tensor"),
    (lambda h, t: (h, t.to("meta")), ValueError, "all tensors must be on one device"),
]


@pytest.mark.parametrize("make,error,message", BAD_INPUTS, ids=[m for _, _, m in BAD_INPUTS])
def test_bad_input_is_rejected_and_state_is_bit_identical(make, error, message):
    layer = make_layer(5, 12, "zloss")
    before = copy.deepcopy(layer.state_dict())
    h = torch.randn(3, 5, dtype=torch.float64)
    with pytest.raises(error) as info:
        layer(*make(h, torch.tensor([0, 1, 2])))
    assert "fastloss.SphericalOutputLayer" in str(info.value) and message in str(info.value)
    for key, value in layer.state_dict().items():
        assert torch.equal(value, before[key]), key


@pytest.mark.parametrize(
    "kwargs,error,message",
    [
        ({"loss": "ce"}, ValueError, "argument 'loss' must be one of"),
        ({"lr": 0.0}, ValueError, "argument 'lr' must be > 0"),
        ({"dtype": torch.bfloat16}, TypeError, "argument 'dtype' must be torch.float32 or torch.float64"),
        ({"weight_decay": 20.0}, ValueError, "lr * weight_decay must be < 1"),
        ({"init": "xavier"}, ValueError, "argument 'init'"),
        ({"ignore_index": 3}, ValueError, "argument 'ignore_index' must be < 0 or >= num_classes (12), got 3"),
        ({"stabilize_every": -1}, ValueError, "argument 'stabilize_every' must be >= 0"),
    ],
)
def test_bad_constructor_arguments(kwargs, error, message):
    with pytest.raises(error, match=r"fastloss\.SphericalOutputLayer: .*" + re.escape(message)):
        fastloss.nn.SphericalOutputLayer(5, 12, **{"lr": 0.1, **kwargs})


def test_ops_pass_opcheck():
    generator = torch.Generator().manual_seed(8)
    d, m, K, D = 6, 5, 2, 17
    h = torch.randn(m, d, generator=generator, dtype=torch.float64)
    packed = torch.randn(ops.packed_width(d), d, generator=generator, dtype=torch.float64)
    sh = h @ packed.T
    V = torch.randn(D, d, generator=generator)
    target = torch.randint(0, D, (m, K), generator=generator)
    args = (h, sh, V, target, None, 0, 1.0, 0.0, 1e-12, -100)
    torch.library.opcheck(torch.ops.fastloss.spherical_factored_head.default, args)
    _, partials = ops.head(*args)
    grad = torch.rand(m, generator=generator, dtype=torch.float64)
    torch.library.opcheck(torch.ops.fastloss.spherical_factored_prepare.default, (h, sh, V, target, partials, grad))
    _, scaled, _ = ops.prepare(h, sh, V, target, partials, grad)
    square = torch.randn(m, m, generator=generator, dtype=torch.float64)
    torch.library.opcheck(torch.ops.fastloss.spherical_factored_gram.default, (h, sh, V, target, scaled, square, square))
    torch.library.opcheck(torch.ops.fastloss.spherical_factored_scatter_.default, (V.clone(), h, sh, target, scaled, h, 0.1, None))
    order = torch.sort(target.reshape(-1), stable=True).indices
    torch.library.opcheck(torch.ops.fastloss.spherical_factored_group.default, (h, sh, V, target, scaled, order))
    grouped = ops.group(h, sh, V, target, scaled, order)
    ydot = torch.zeros(D, m, dtype=torch.float64).index_put_((target.reshape(-1), torch.arange(m).repeat_interleave(K)),
                                                              scaled[:, :K].reshape(-1), accumulate=True)
    assert_close(grouped.T @ grouped, (ydot @ h).T @ (ydot @ h), 1e-13, "R^T R from the grouped rows")


def test_head_matches_dense_losses_for_every_kind():
    """The op alone: the target outputs and losses from the packed rows equal the dense computation."""
    generator = torch.Generator().manual_seed(9)
    d, m, K, D = 7, 6, 3, 23
    for loss, kind in ops.LOSS_KINDS.items():
        layer = make_layer(d, D, loss)
        scramble_factorization(layer, 2.0)
        layer.packed[d].normal_(generator=generator)  # a nonzero omega
        layer.refresh()
        h = torch.randn(m, d, generator=generator, dtype=torch.float64)
        target = torch.randint(0, D, (m, K), generator=generator)
        target[0, 1] = -100
        weight = torch.rand(m, K, generator=generator, dtype=torch.float64)
        params = fastloss.nn.spherical_output._LOSS_PARAMS[loss](*({"a": 1.5, "b": 0.5} if loss == "zloss" else {"a": 1.0, "b": 0.0}).values(), None)
        out, _ = ops.head(h, h @ layer.packed.T, layer.V, target, weight, kind, *params, -100)
        kwargs = {"a": params[0], "b": params[1], "eps": params[2]} if loss == "zloss" else {}
        expected = sample_losses(h @ layer.weight.T, target, weight, loss=loss, **kwargs)
        assert_close(out, expected, 1e-11, loss)


# ---------------------------------------------------------------------------- CUDA
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("dtype,state_dtype", [(torch.float32, torch.float64), (torch.float64, torch.float64), (torch.float32, torch.float32)])
def test_cuda_matches_cpu(deterministic, dtype, state_dtype, gpu):
    layers = [make_layer(33, 301, "zloss", dev, dtype, state_dtype, lr=0.5, deterministic=deterministic)
              for dev in ("cpu", gpu.device)]  # fmt: skip
    layers[1].load_state_dict(layers[0].state_dict())  # the same initial W (the CPU and CUDA generators differ)
    generator = torch.Generator().manual_seed(6)
    tol = 1e-10 if dtype == state_dtype == torch.float64 else 1e-4
    for step in range(10):
        h, target, w = make_batch(generator, 40, 33, 301, 2, repeat=True, ignore=True, weights=True)
        grads = []
        for on_gpu, layer in enumerate(layers):
            move = gpu if on_gpu else (lambda t: t)
            with gpu.kernels() if on_gpu else contextlib.nullcontext():
                x = move(h.to(torch.float32)).requires_grad_()
                layer(x, move(target), move(w)).backward()
            grads.append(x.grad.cpu())
        assert_close(grads[1], grads[0], tol, f"h.grad at step {step}")
    assert_close(layers[1].weight, layers[0].weight, tol, "W")


@pytest.mark.real_gpu(reason="CUDA graph capture")
@pytest.mark.parametrize("d,m", [(64, 32), (8, 40)], ids=["gram", "gram-free"])
def test_cuda_step_is_capturable_in_a_cuda_graph(d, m):
    layer = make_layer(d, 1000, "zloss", "cuda", lr=0.1, check_stability=False)
    twin = copy.deepcopy(layer)
    h = torch.randn(m, d, device="cuda", requires_grad=True)
    target = torch.randint(0, 1000, (m,), device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up outside the graph (allocations, cuBLAS handles)
        for _ in range(2):
            h.grad = None
            layer(h, target).backward()
            twin(h, target).backward()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    h.grad = None
    with torch.cuda.graph(graph):
        layer(h, target).backward()
    layer._version += 1  # the captured step also counts as the eager twin's next one
    for _ in range(3):
        graph.replay()
        twin(h, target).backward()
    torch.cuda.synchronize()
    assert_close(layer.weight, twin.weight, 1e-12, "W after graph replays")
    assert layer.check()["unchecked_inverse_residual"] < 1e-16


# ---------------------------------------------------------------------------- data parallel
def _ddp_worker(rank, world, port, result_path):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    layer = make_layer(6, 25, "zloss", process_group=dist.group.WORLD, weight_decay=0.1)
    generator = torch.Generator().manual_seed(11)
    for _ in range(5):
        h, target, _ = make_batch(generator, 4 * world, 6, 25, repeat=True)
        mine = slice(4 * rank, 4 * (rank + 1))
        layer(h[mine], target[mine]).backward()
    torch.save({k: v for k, v in layer.state_dict().items()}, f"{result_path}.{rank}")
    dist.destroy_process_group()


def test_data_parallel_replicas_stay_identical_and_match_the_mean_gradient(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    world = 2
    mp.spawn(_ddp_worker, args=(world, port, str(tmp_path / "state")), nprocs=world, join=True)
    states = [torch.load(tmp_path / f"state.{r}") for r in range(world)]
    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key]), key
    # DDP semantics: the mean over ranks of each rank's mean loss gradient.
    layer = make_layer(6, 25, "zloss", weight_decay=0.1)
    dense = dense_twin(layer, "zloss", weight_decay=0.1)
    generator = torch.Generator().manual_seed(11)
    for _ in range(5):
        h, target, _ = make_batch(generator, 4 * world, 6, 25, repeat=True)
        w = dense.linear.weight
        h64 = h.double()
        per_rank = [sample_losses(h64[4 * r : 4 * (r + 1)] @ w.T, target[4 * r : 4 * (r + 1)].unsqueeze(1), loss="zloss", **LOSS_KWARGS["zloss"]).mean() for r in range(world)]
        dense.optimizer.zero_grad()
        (sum(per_rank) / world).backward()
        dense.optimizer.step()
    layer.load_state_dict(states[0])
    assert_close(layer.weight, dense.weight, 1e-10, "W of the replicas")


# ---------------------------------------------------------------------------- the guard on the device (CUDA default)
def _state(layer):
    return {k: v.clone() for k, v in layer.state_dict().items()}


@pytest.mark.parametrize("case", ["singular", "non-finite", "bad-target"])
def test_cuda_guard_skips_the_update_on_the_device_and_reports_it(case, gpu):
    """With no host read (the CUDA default), a step the guard refuses is skipped on the device: every
    buffer stays bit-identical, the step does not count, and the error is raised by the next fastloss
    call on the device or by fastloss.check_device_errors()."""
    layer = make_layer(4, 10, "mse", gpu.device, lr=0.5 if case == "singular" else 0.05)
    before = _state(layer)
    h = torch.full((2, 4), 1.0, dtype=torch.float64) if case == "singular" else torch.randn(2, 4, dtype=torch.float64)
    target = torch.tensor([3, 10 if case == "bad-target" else 5])
    if case == "non-finite":
        h[1, 2] = float("nan")
    message = {"singular": r"could make U singular: 2 \* lr \* lambda_max.* <= [0-9.e+]+ >= 1",
               "non-finite": "non-finite values in the step", "bad-target": "out-of-range class index 10 at flat position 1"}[case]  # fmt: skip
    kind = ValueError if case == "bad-target" else RuntimeError
    with gpu.kernels():
        layer(gpu(h).requires_grad_(), gpu(target)).backward()  # no error here: nothing was read back
        for key, value in layer.state_dict().items():
            assert torch.equal(value, before[key]), key
        with pytest.raises(kind, match=r"fastloss.SphericalOutputLayer \(an earlier call, found on the device\): .*"
                           + message):  # fmt: skip
            fastloss.check_device_errors()
        fastloss.check_device_errors()  # raised once
        # The next good step is applied, and a failed step left no pending error to raise in it.
        layer(gpu(torch.randn(2, 4, dtype=torch.float64) * 0.1).requires_grad_(), gpu(torch.tensor([1, 2]))).backward()
        fastloss.check_device_errors()
    assert int(layer.steps) == 1 and not torch.equal(layer.packed, before["packed"])


def test_cuda_device_guard_matches_the_host_guard(gpu):
    """The device-guarded step (default) and the host-checked one (set_target_checks(True)) apply the same
    update: the fixed Newton-Schulz count reaches rounding where the host picks a smaller one."""
    layers = [make_layer(6, 50, "zloss", gpu.device, lr=0.3) for _ in range(2)]
    generator = torch.Generator().manual_seed(3)
    for step in range(4):
        h, target, _ = make_batch(generator, 5, 6, 50, 2, repeat=True, ignore=True)
        for host_checks, layer in zip((False, True), layers):
            fastloss.set_target_checks(host_checks)
            try:
                with gpu.kernels():
                    layer(gpu(h).requires_grad_(), gpu(target)).backward()
            finally:
                fastloss.set_target_checks(False)
    assert_close(layers[0].weight, layers[1].weight, 1e-12, "W")
    assert_close(layers[0].u_inv_t, layers[1].u_inv_t, 1e-12, "U^-T")
    assert int(layers[0].steps) == int(layers[1].steps) == 4
