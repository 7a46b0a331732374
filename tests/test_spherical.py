"""Spherical-family losses on dense logits against float64 references written plainly in PyTorch."""

import math
import os
import zlib

import pytest
import torch

import fastloss
from fastloss.reference import spherical as ref

from conftest import SIMULATED, assert_close, gpu_sized, sized

LOSS_NAMES = list(ref.LOSSES)
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
# Awkward shapes: one class, one row, sizes that are not multiples of any tile, rows long enough to be
# split into several chunks (CPU chunk = 16384, CUDA forward chunk >= 16384, backward chunk 8192).
SHAPES = [(1, 1), (4, 1), (1, 7), (5, 7), (3, 257), (17, 1000), (2, 4097), (3, 40001)]
LOSS_RTOL = {torch.float64: 1e-11, torch.float32: 2e-5, torch.float16: 2e-5, torch.bfloat16: 2e-5}
GRAD_RTOL = {torch.float64: 1e-11, torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 8e-3}


def make_inputs(rows, classes, dtype, device, *, scale=2.0, offset=0.5, seed=0, ignore_every=0):
    generator = torch.Generator().manual_seed(seed)
    logits = (torch.randn(rows, classes, generator=generator, dtype=torch.float64) * scale + offset).to(dtype)
    target = torch.randint(0, classes, (rows,), generator=generator)
    if ignore_every:
        target[::ignore_every] = -100
    return logits.to(device), target.to(device)


def check_against_reference(name, logits, target, device, *, reduction="none", **extra):
    fast, reference, kwargs = ref.LOSSES[name]
    kwargs = {**kwargs, **extra}
    x = logits.detach().clone().requires_grad_()
    out = fast(x, target, reduction=reduction, **kwargs)
    x64 = logits.detach().double().cpu().requires_grad_()
    expected = reference(x64, target.cpu(), reduction=reduction, **kwargs)
    weights = torch.rand(expected.shape, dtype=torch.float64) + 0.5
    (out.double() * weights.to(out.device)).sum().backward()
    (expected * weights).sum().backward()
    dtype = logits.dtype
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert x.grad.dtype == dtype and x.grad.shape == logits.shape
    # With one class the spherical and Taylor losses are exactly 0, computed as log(den) - log(num) of
    # O(1) terms, and every loss is constant in o: the gradient is 0, computed as a difference of terms
    # up to 1/sqrt(eps) in size. Both are checked against the rounding of those terms.
    one_class = logits.shape[-1] == 1
    assert_close(out, expected, LOSS_RTOL[dtype], f"{name} loss", atol=LOSS_RTOL[dtype] if one_class else 0.0)
    atol = 1e-3 if one_class else 0.0
    assert_close(x.grad, x64.grad, GRAD_RTOL[dtype], f"{name} grad", atol=atol)


@pytest.mark.parametrize("name", LOSS_NAMES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_float64_reference(name, dtype, shape, device):
    logits, target = make_inputs(*shape, dtype, device, seed=zlib.crc32(repr((name, shape)).encode()), ignore_every=3)
    check_against_reference(name, logits, target, device)


@pytest.mark.parametrize("name", LOSS_NAMES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_reductions_and_leading_dims(name, reduction, device):
    logits, target = make_inputs(2 * 3 * 5, 11, torch.float32, device, ignore_every=4)
    check_against_reference(name, logits.reshape(2, 3, 5, 11), target.reshape(2, 3, 5), device, reduction=reduction)


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_all_rows_ignored(name, device):
    logits, target = make_inputs(6, 9, torch.float32, device)
    target[:] = -100
    fast = ref.LOSSES[name][0]
    x = logits.clone().requires_grad_()
    assert math.isnan(float(fast(x, target).detach()))  # mean over no rows, as torch.nn.functional.cross_entropy
    total = fast(x, target, reduction="sum")
    assert float(total.detach()) == 0.0
    total.backward()
    assert torch.equal(x.grad, torch.zeros_like(x))
    assert torch.equal(fast(logits, target, reduction="none"), torch.zeros(6, device=device))


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_custom_ignore_index_and_int32_target(name, device):
    logits, target = make_inputs(8, 5, torch.float32, device)
    target[1] = 3
    check_against_reference(name, logits, target.to(torch.int32), device, ignore_index=3)


@pytest.mark.sim_no_launch  # nothing to launch for 0 rows
@pytest.mark.parametrize("name", LOSS_NAMES)
def test_empty_batch(name, device):
    logits = torch.randn(0, 5, device=device, requires_grad=True)
    target = torch.zeros(0, dtype=torch.int64, device=device)
    fast = ref.LOSSES[name][0]
    assert fast(logits, target, reduction="none").shape == (0,)
    fast(logits, target, reduction="sum").backward()
    assert logits.grad.shape == (0, 5)


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_strided_logits(name, device):
    base, target = make_inputs(7, 301, torch.float32, device)
    rows_view = base[:, 3:260]  # unit stride along classes, row stride 301: used without a copy
    target = target % 257
    check_against_reference(name, rows_view, target, device)
    every_other = base[:, ::2]  # non-unit stride along classes: copied first
    check_against_reference(name, every_other, target % every_other.shape[1], device)


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_views_that_cannot_be_read_in_place(name, device):
    """A single strided row, broadcast (stride 0) rows and a strided 1-D input are copied, not misread."""
    base, target = make_inputs(10, 3, torch.float32, device)
    column = base[:, 0]  # one row of 10 classes with stride 3
    check_against_reference(name, column, target[0] % 10, device)
    broadcast = base[:1].expand(6, 3)  # row stride 0
    check_against_reference(name, broadcast, target[:6], device)
    expanded = torch.tensor([2.0], device=device).expand(6)  # stride 0 along the classes
    check_against_reference(name, expanded, torch.tensor(1, device=device), device)


def test_backward_op_checks_devices():
    logits, target = make_inputs(3, 4, torch.float32, "cpu")
    _, coef = torch.ops.fastloss.zloss(logits, target, 1.0, 0.0, 1e-12, -100)
    with pytest.raises(ValueError, match="fastloss.spherical_loss_backward: all tensors must be on one device"):
        fastloss.spherical._backward("cpu", torch.ones(3), logits, target, coef.to("meta"), -100)


def test_cpu_kernels_follow_torch_thread_count():
    logits, target = make_inputs(64, 40_000, torch.float32, "cpu")
    expected = fastloss.zloss(logits, target, reduction="none")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = fastloss.zloss(logits, target, reduction="none")
        assert fastloss._C.build_info()["cpu_threads"] == 1
    finally:
        torch.set_num_threads(threads)
    fastloss.zloss(logits, target, reduction="none")
    assert fastloss._C.build_info()["cpu_threads"] == min(threads, len(os.sched_getaffinity(0)))
    assert_close(single, expected, 1e-6, "one thread vs several")


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_gradcheck_float64(name, device):
    logits, target = make_inputs(4, 6, torch.float64, device, ignore_every=3)
    fast, _, kwargs = ref.LOSSES[name]
    x = logits.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda t: fast(t, target, reduction="none", **kwargs), (x,))
    assert torch.autograd.gradcheck(lambda t: fast(t, target, reduction="mean", **kwargs), (x,))


OPS = {
    "zloss": lambda x, t: (torch.ops.fastloss.zloss.default, (x, t, 1.5, 0.5, 1e-12, -100)),
    "spherical_softmax_loss": lambda x, t: (torch.ops.fastloss.spherical_softmax_loss.default, (x, t, 1e-6, -100)),
    "taylor_softmax_loss": lambda x, t: (torch.ops.fastloss.taylor_softmax_loss.default, (x, t, -100)),
}


@pytest.mark.parametrize("name", LOSS_NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_opcheck_forward(name, dtype, device):
    logits, target = make_inputs(5, 13, dtype, device, ignore_every=2)
    op, args = OPS[name](logits.requires_grad_(), target)
    torch.library.opcheck(op, args)


def test_opcheck_backward(device):
    logits, target = make_inputs(5, 13, torch.float32, device, ignore_every=2)
    _, coef = torch.ops.fastloss.zloss(logits, target, 1.0, 0.0, 1e-12, -100)
    grad_loss = torch.rand(5, device=device)
    torch.library.opcheck(torch.ops.fastloss.spherical_loss_backward.default, (grad_loss, logits, target, coef, -100))


COMPILE_CASES = [(name, "aot_eager") for name in LOSS_NAMES] + [("zloss", "inductor")]


@pytest.mark.parametrize("name,backend", COMPILE_CASES)
def test_torch_compile_fullgraph(name, backend, device):
    """aot_eager exercises the fake kernels and autograd under tracing; inductor the whole pipeline."""
    fast, reference, kwargs = ref.LOSSES[name]
    logits, target = make_inputs(6, 33, torch.float32, device, ignore_every=3)

    def step(x, t):
        return fast(x * 2.0, t, **kwargs)

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend=backend)
    x = logits.clone().requires_grad_()
    out = compiled(x, target)
    out.backward()
    x64 = logits.double().cpu().requires_grad_()
    expected = reference(x64 * 2.0, target.cpu(), **kwargs)
    expected.backward()
    assert_close(out, expected, 1e-5, "compiled loss")
    assert_close(x.grad, x64.grad, 1e-5, "compiled grad")


@pytest.mark.parametrize("alpha,beta", [(1.0, 1000.0), (0.25, -300.0), (40.0, 5.0)])
def test_zloss_shift_and_scale_invariance(alpha, beta, device):
    """A long row with a large offset: a naive q/D - mean^2 in float32 would lose the variance. (On the
    simulated GPU a shorter row, still several forward chunks long.)"""
    classes = sized(device, 100_003, 40_001)
    logits, target = make_inputs(3, classes, torch.float64, device, scale=1.0, offset=0.0)
    base = fastloss.zloss(logits, target, reduction="none")
    moved64 = fastloss.zloss(alpha * logits + beta, target, reduction="none")
    assert_close(moved64, base, 1e-9, "float64 invariance")
    moved32 = fastloss.zloss((alpha * logits + beta).float(), target, reduction="none")
    # float32 rounds the moved logits themselves by about 6e-8 * |beta| / (alpha * sigma)
    assert_close(moved32, base, 2e-3, "float32 invariance")


def test_zloss_is_not_palm_zloss(device):
    """Documented distinction: for uniform logits the Z-loss is softplus(a*b)/a, whatever log Z is."""
    logits = torch.full((2, 10), 7.0, dtype=torch.float64, device=device)
    target = torch.tensor([1, 2], device=device)
    out = fastloss.zloss(logits, target, a=2.0, b=0.25, reduction="none")
    assert_close(out, torch.full((2,), math.log1p(math.exp(0.5)) / 2.0, dtype=torch.float64), 1e-12, "uniform row")


def test_modules_match_functional(device):
    logits, target = make_inputs(9, 21, torch.float32, device)
    target[::4] = -100
    target[1] = 7
    pairs = [
        (fastloss.nn.ZLoss(a=2.0, b=0.1, reduction="sum"), lambda x, t: fastloss.zloss(x, t, a=2.0, b=0.1, reduction="sum")),
        (fastloss.nn.SphericalSoftmaxLoss(eps=1e-3), lambda x, t: fastloss.spherical_softmax_loss(x, t, eps=1e-3)),
        (fastloss.nn.TaylorSoftmaxLoss(reduction="none", ignore_index=7), lambda x, t: fastloss.taylor_softmax_loss(x, t, reduction="none", ignore_index=7)),
    ]
    for module, functional in pairs:
        if module.ignore_index == 7:
            target = torch.where(target == -100, 7, target)
        assert torch.equal(module(logits, target), functional(logits, target))
        assert "reduction=" in repr(module)


# ---------------------------------------------------------------------------- bad input
BAD_INPUTS = [
    (lambda x, t: fastloss.zloss(x.long(), t), TypeError, "fastloss.zloss: argument 'logits' must have dtype"),
    (lambda x, t: fastloss.zloss(x, t.float()), TypeError, "fastloss.zloss: argument 'target' must have dtype"),
    (lambda x, t: fastloss.zloss(x.tolist(), t), TypeError, "fastloss.zloss: argument 'logits' must be a torch.Tensor"),
    (lambda x, t: fastloss.zloss(x, t[:-1]), ValueError, "fastloss.zloss: argument 'target' must have shape (4,)"),
    (lambda x, t: fastloss.zloss(x[0, 0], t), ValueError, "argument 'logits' must be of shape (..., D)"),
    (lambda x, t: fastloss.zloss(x[:, :0], t), ValueError, "must have at least one class"),
    (lambda x, t: fastloss.zloss(x, t.to("meta")), ValueError, "fastloss.zloss: all tensors must be on one device"),
    (lambda x, t: fastloss.zloss(x, t, reduction="avg"), ValueError, "argument 'reduction' must be one of"),
    (lambda x, t: fastloss.zloss(x, t, a=0.0), ValueError, "fastloss.zloss: argument 'a' must be > 0, got 0.0"),
    (lambda x, t: fastloss.zloss(x, t, a=-1), ValueError, "fastloss.zloss: argument 'a' must be > 0"),
    (lambda x, t: fastloss.zloss(x, t, b=float("nan")), ValueError, "fastloss.zloss: argument 'b' must be finite"),
    (lambda x, t: fastloss.zloss(x, t, eps=-1e-3), ValueError, "fastloss.zloss: argument 'eps' must be >= 0"),
    (lambda x, t: fastloss.zloss(x, t, a="1"), TypeError, "fastloss.zloss: argument 'a' must be a real number"),
    (lambda x, t: fastloss.zloss(x, t, ignore_index=1.5), TypeError, "argument 'ignore_index' must be an int"),
    (lambda x, t: fastloss.spherical_softmax_loss(x, t, eps=0.0), ValueError, "fastloss.spherical_softmax_loss: argument 'eps' must be > 0"),
    (lambda x, t: fastloss.taylor_softmax_loss(x, t, reduction=None), ValueError, "fastloss.taylor_softmax_loss: argument 'reduction'"),
    (lambda x, t: fastloss.zloss(x, torch.tensor([0, 1, 5, 2])), ValueError, "fastloss.zloss: argument 'target' has out-of-range class index 5 at flat position 2"),
    (lambda x, t: fastloss.taylor_softmax_loss(x, torch.tensor([0, -3, 1, 2])), ValueError, "out-of-range class index -3"),
    (lambda x, t: torch.ops.fastloss.zloss(x.t(), t, 1.0, 0.0, 0.0, -100), ValueError, "fastloss.zloss: argument 'logits' must be 2-D"),
    (lambda x, t: torch.ops.fastloss.taylor_softmax_loss(x, t.int(), -100), TypeError, "fastloss.taylor_softmax_loss: argument 'target' must have dtype"),
]


@pytest.mark.parametrize("call,error,message", BAD_INPUTS, ids=[m for _, _, m in BAD_INPUTS])
def test_bad_input_is_rejected_before_any_work(call, error, message):
    x = torch.randn(4, 5, requires_grad=True)
    t = torch.tensor([0, 1, 4, 2])
    with pytest.raises(error) as info:
        call(x, t)
    assert message in str(info.value)
    assert x.grad is None


def test_cuda_tensors_on_a_build_without_cuda_get_a_rebuild_hint():
    impl = fastloss._library._missing_cuda_impl("zloss")
    hint = (r"runs its CUDA kernels on a simulated device.*fastloss.simulated_cuda\(\).*FASTLOSS_CUDA=ON" if SIMULATED
            else r"this fastloss build has no CUDA kernels.*FASTLOSS_CUDA=ON pip install")  # fmt: skip
    with pytest.raises(RuntimeError, match=r"fastloss.zloss: got CUDA tensors, but " + hint):
        impl(torch.zeros(1))


# ---------------------------------------------------------------------------- GPU only
# csrc/spherical/dense_loss_cuda.cu: forward one warp per row up to 4096 classes, else blocks over
# (row, chunk) with chunks of >= 16384 classes (several per row when the grid would be small) and a
# finalize kernel; backward flat up to 2048 classes, else blocks over (row, 8192-class chunk).
CUDA_SHAPES = gpu_sized(
    [(2, 1_048_579), (300, 2048), (64, 3000), (5, 131_075), (33, 4096)],
    # simulated GPU: the same plans at CPU sizes: multi-chunk forward (2 and 3 chunks of 16384+, a
    # short last one) with a chunked backward; block per row of one chunk; warp per row at the flat
    # backward's edge (2048) and past it (3000, row backward); warp per row at its limit (4096).
    [(2, 40_001), (1, 50_000), (3, 4097), (37, 2048), (9, 3000), (5, 4096)],
)


@pytest.mark.parametrize("name", LOSS_NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", CUDA_SHAPES, ids=str)
def test_cuda_paths_match_reference(name, dtype, shape, gpu):
    """Warp-per-row, block-per-row and multi-chunk forward; flat and row backward; unaligned rows."""
    logits, target = make_inputs(*shape, dtype, gpu.device, ignore_every=5)
    misaligned = torch.randn(shape[0], shape[1] + 1, device=gpu.device).to(dtype)[:, 1:]
    with gpu.kernels():
        check_against_reference(name, logits, target, gpu.device)
        check_against_reference(name, misaligned, target, gpu.device)


def test_cuda_bad_target_gives_nan_row_and_a_deferred_device_error(gpu):
    """By default (no host read) a bad target gives its row NaN and is reported by the kernel on the
    device: raised by the next fastloss call on the device, or by fastloss.check_device_errors().
    fastloss.set_target_checks(True) raises at once, from an eager host read."""
    logits, target = make_inputs(4, 50, torch.float32, gpu.device)
    target[2] = 50
    good = gpu(torch.tensor([1, 2, 3, 4]))
    with gpu.kernels():
        out = fastloss.zloss(logits, target, reduction="none")
        assert torch.isnan(out[2]) and bool(torch.isfinite(out[[0, 1, 3]]).all())  # (a sync on a GPU)
        with pytest.raises(ValueError, match=r"fastloss.zloss \(an earlier call, found on the device\): argument "
                           r"'target' has out-of-range class index 50 at flat position 2; expected 0 <= target < 50"):
            fastloss.taylor_softmax_loss(logits, good)  # the next call raises what the previous one left
        fastloss.taylor_softmax_loss(logits, good)  # raised once: the slot is free again
        fastloss.check_device_errors()
        fastloss.spherical_softmax_loss(logits, target)
        with pytest.raises(ValueError, match=r"fastloss.spherical_softmax_loss .*class index 50 at flat position 2"):
            fastloss.check_device_errors()
        fastloss.check_device_errors()  # nothing left
        fastloss.set_target_checks(True)
        try:
            with pytest.raises(ValueError, match="out-of-range class index 50 at flat position 2"):
                fastloss.zloss(logits, target)
        finally:
            fastloss.set_target_checks(False)
        fastloss.check_device_errors()  # the host check raised before any kernel ran


@pytest.mark.real_gpu(reason="CUDA graph capture on a side stream")
def test_cuda_graph_capture_and_side_stream():
    logits, target = make_inputs(8, 70_000, torch.float32, "cuda")
    x = logits.clone().requires_grad_()
    expected = fastloss.zloss(x, target)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            captured = fastloss.zloss(logits, target)
    graph.replay()
    torch.cuda.synchronize()
    assert_close(captured, expected, 1e-6, "graph replay")
