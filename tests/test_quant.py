"""The 2-bit weight family: packing, dequantization, the fused matmul, QuantLinear and
quantize_model, against plain float64 references written from the format's definition."""

from __future__ import annotations

import pytest
import torch

import fastloss
import fastloss.quant as Q
from fastloss.quant import _ops
from fastloss.reference import quant as R
from conftest import is_gpu, sized

GRID_SHAPES = [  # (N, K, group_size): size 1, non-multiples of 8, 64, the group and the 64-row block
    (1, 1, 64),
    (5, 100, 64),
    (70, 300, 128),
    (130, 1000, 256),
    (64, 512, 64),
]


def _random_codes(n, k, g, bits_per_block, generator):
    levels = torch.tensor([4 if b == 2 else 16 for b in bits_per_block]).repeat_interleave(g)[:k]
    codes = (torch.rand(n, k, generator=generator) * levels).floor().to(torch.uint8)
    return codes


def _block_bits(groups, mode, generator):
    if mode == "2bit":
        return [2] * groups
    if mode == "4bit":
        return [4] * groups
    return [4 if bool(b) else 2 for b in torch.rand(groups, generator=generator) < 0.4]


def _random_qw(n, k, g, mode, device, scale_dtype=torch.float16, seed=0):
    generator = torch.Generator().manual_seed(seed)
    groups = -(-k // g)
    bits = _block_bits(groups, mode, generator)
    codes = _random_codes(n, k, g, bits, generator)
    levels = torch.tensor([4 if b == 2 else 16 for b in bits])
    zeros = (torch.rand(n, groups, generator=generator) * levels).floor().to(torch.uint8)
    scales = (torch.rand(n, groups, generator=generator) * 0.1 + 0.01).to(scale_dtype)
    qw = Q.QuantizedWeight.from_codes(codes.to(device), scales.to(device), zeros.to(device), torch.tensor(bits), g)
    return qw, codes, scales, zeros


# ---- the packed format ------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["2bit", "4bit", "mixed"])
@pytest.mark.parametrize("n,k,g", GRID_SHAPES)
def test_pack_unpack_round_trip_is_exact(device, mode, n, k, g):
    qw, codes, scales, zeros = _random_qw(n, k, g, mode, device, seed=n + k)
    assert torch.equal(qw.codes().cpu(), codes)
    assert torch.equal(qw.scale_matrix().cpu(), scales) and torch.equal(qw.zero_matrix().cpu(), zeros)
    assert qw.group_bits.tolist() == [4 if i >= 0 else 2 for i in qw.side_index.tolist()]


def test_packed_words_hold_the_mma_fragment_layout():
    """One hand-placed code: row 3, column 64 + 16*2 + 9 (chunk 2, j = 9 -> lane 3*4 + 0, bit 16 + 8 + 2)."""
    codes = torch.zeros(8, 128, dtype=torch.uint8)
    codes[3, 64 + 32 + 9] = 3
    qw = Q.QuantizedWeight.from_codes(codes, torch.ones(8, 2, dtype=torch.float16), torch.zeros(8, 2, dtype=torch.uint8), [2, 2], 64)
    words = qw.main.view(-1, 2, 32)  # (row tile, K word, lane); N is padded to 64 rows: 8 tiles
    nonzero = words.nonzero().tolist()
    assert nonzero == [[0, 1, 12]]
    assert int(words[0, 1, 12]) == 3 << 26


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.bfloat16])
def test_dequantize_is_bit_exact(device, out_dtype, scale_dtype):
    qw, codes, scales, zeros = _random_qw(70, 300, 64, "mixed", device, scale_dtype, seed=3)
    group = torch.arange(300) // 64
    expected = ((codes.float() - zeros.float()[:, group]) * scales.float()[:, group]).to(out_dtype)
    actual = Q.dequantize(qw, out_dtype).cpu()
    assert torch.equal(actual, expected)


def test_cuda_and_cpu_agree_bit_for_bit(gpu):
    qw, *_ = _random_qw(130, 1000, 128, "mixed", "cpu", seed=5)
    on_gpu = gpu(qw)
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        expected = qw.dequantize(dtype)
        with gpu.kernels():
            actual = on_gpu.dequantize(dtype)
        assert torch.equal(expected, actual.cpu())
    with gpu.kernels():
        codes = on_gpu.codes()
    assert torch.equal(qw.codes(), codes.cpu())


# ---- matmul -----------------------------------------------------------------------------------
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 4e-3}


def _check_matmul(qw, m, dtype, device, with_bias=True, seed=0, original=None):
    """original: the (codes, scales, zeros) qw was packed from; the float64 reference is built
    from them (else from qw's own unpacked arrays)."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(m, qw.in_features, generator=generator).to(device, dtype)
    bias = torch.randn(qw.out_features, generator=generator).to(device, dtype) if with_bias else None
    actual = Q.matmul(x, qw, bias)
    # The reference: x @ dequantize(qw).T in float32 on the same codes (plus bias).
    expected = x.float() @ qw.dequantize(torch.float32).t() + (bias.float() if with_bias else 0)
    assert actual.dtype == dtype and actual.shape == (m, qw.out_features)
    error = float((actual.float() - expected).norm() / expected.norm().clamp_min(1e-30))
    assert error <= TOLERANCE[dtype], f"relative error {error:.2e} at M={m}"
    # and against the float64 reference written from the codes
    codes, scales, zeros = original if original is not None else (qw.codes(), qw.scale_matrix(), qw.zero_matrix())
    exact = R.matmul(x.cpu(), codes.cpu(), scales.cpu(), zeros.cpu(), qw.group_size, bias.cpu() if with_bias else None)
    error64 = float((actual.cpu().double() - exact).norm() / exact.norm().clamp_min(1e-30))
    assert error64 <= TOLERANCE[dtype], f"relative error {error64:.2e} against float64 at M={m}"


@pytest.mark.parametrize("m", [1, 3, 8, 9, 16, 64, 257])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_matmul_matches_dequantized_weight(device, m, dtype):
    qw, *original = _random_qw(200, 512, 128, "mixed", device, dtype, seed=m)
    _check_matmul(qw, m, dtype, device, original=original)


@pytest.mark.parametrize("m", [1, 5, 17, 33, 100])
@pytest.mark.parametrize("mode", ["2bit", "4bit", "mixed"])
@pytest.mark.parametrize("n,k,g", GRID_SHAPES)
def test_matmul_awkward_shapes(device, m, mode, n, k, g):
    qw, *original = _random_qw(n, k, g, mode, device, torch.float16, seed=m * 7 + n)
    _check_matmul(qw, m, torch.float16, device, with_bias=(m % 2 == 1), seed=m, original=original)


def test_matmul_float32_on_cpu():
    qw, *_ = _random_qw(70, 300, 64, "mixed", "cpu", seed=2)
    _check_matmul(qw, 5, torch.float32, "cpu")


@pytest.mark.parametrize("k,g", [(8192, 128), (4096, 512), (1536, 64)])
def test_matmul_long_rows(device, k, g):
    """Long K: on CUDA, CTA ranges that split row blocks and groups that span pipeline stages."""
    qw, *original = _random_qw(96, k, g, "mixed", device, torch.bfloat16, seed=k)
    for m in (1, 7, 40):
        _check_matmul(qw, m, torch.bfloat16, device, seed=m, original=original)


def test_matmul_leading_dims_and_strided_x(device):
    qw, *_ = _random_qw(64, 200, 64, "mixed", device, torch.float16, seed=4)
    x = torch.randn(2, 3, 400, device=device).to(torch.float16)[..., ::2]  # non-contiguous, K = 200
    y = Q.matmul(x, qw)
    expected = x.float() @ qw.dequantize(torch.float32).t()
    assert y.shape == (2, 3, 64)
    assert float((y.float() - expected).norm() / expected.norm()) <= 2e-3


def test_matmul_empty_batch(device):
    qw, *_ = _random_qw(64, 128, 64, "2bit", device, seed=1)
    assert Q.matmul(torch.zeros(0, 128, device=device, dtype=torch.float16), qw).shape == (0, 64)


def test_matmul_gradients(device):
    qw, *_ = _random_qw(70, 300, 64, "mixed", device, torch.float16, seed=8)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(4, 300, generator=generator).to(device, torch.float16).requires_grad_()
    bias = torch.randn(70, generator=generator).to(device, torch.float16).requires_grad_()
    grad_y = torch.randn(4, 70, generator=generator).to(device, torch.float16)
    Q.matmul(x, qw, bias).backward(grad_y)
    weight = R.dense_weight(qw.codes().cpu(), qw.scale_matrix().cpu(), qw.zero_matrix().cpu(), 64)
    expected = grad_y.cpu().double() @ weight
    assert float((x.grad.cpu().double() - expected).norm() / expected.norm()) <= 2e-3
    assert torch.allclose(bias.grad.cpu().double(), grad_y.cpu().double().sum(0), rtol=2e-3, atol=1e-2)


def test_opcheck_every_op():
    qw, codes, *_ = _random_qw(70, 300, 64, "mixed", "cpu", seed=9)
    x = torch.randn(3, 300).to(torch.float16)
    arrays = (qw.main, qw.side, qw.side_index)
    full = arrays + (qw.scales, qw.zeros)
    cases = [
        (_ops.quant_pack, (codes, qw.side_index, 64, int((qw.side_index >= 0).sum()))),
        (_ops.quant_unpack, arrays + (70, 300, 64)),
        (_ops.quant_dequantize, full + (70, 300, 64, torch.float16)),
        (_ops.quant_matmul, (x.requires_grad_(),) + full + (None, 70, 300, 64)),
    ]
    for op, args in cases:
        torch.library.opcheck(op.overload, args)


def test_compile_fullgraph():
    layer = Q.QuantLinear.from_linear(torch.nn.Linear(256, 96), frac_4bit=0.5, group_size=64)
    x = torch.randn(5, 256)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(x), layer(x))


@pytest.mark.real_gpu(reason="CUDA graph capture and a side stream")
def test_cuda_graph_capture():
    qw, *_ = _random_qw(4096, 4096, 128, "mixed", "cuda", torch.float16, seed=11)
    x = torch.randn(1, 4096, device="cuda", dtype=torch.float16)
    eager = Q.matmul(x, qw)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        Q.matmul(x, qw)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = Q.matmul(x, qw)
    x.copy_(torch.randn_like(x))
    graph.replay()
    assert torch.equal(captured, Q.matmul(x, qw))
    assert not torch.equal(captured, eager)


# ---- quantize, QuantizedWeight, QuantLinear, quantize_model -----------------------------------
def _relative_error(weight, qw):
    return float((qw.dequantize(torch.float32) - weight).norm() / weight.norm())


def test_quantize_quality_and_format():
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(512, 1024, generator=generator)
    two = Q.quantize(weight, frac_4bit=0.0)
    mixed = Q.quantize(weight, frac_4bit=0.25)
    four = Q.quantize(weight, bits=4)
    errors = [_relative_error(weight, qw) for qw in (two, mixed, four)]
    assert errors[0] <= 0.52 and errors[1] <= 0.45 and errors[2] <= 0.11
    assert errors[0] > errors[1] > errors[2]
    assert int((mixed.side_index >= 0).sum()) == 2  # 25% of 8 K-blocks
    # 2 bits + an fp16 scale and a uint8 zero per 128 weights, plus the K-block map
    assert two.bits_per_weight == pytest.approx(2 + 24 / 128, abs=1e-3)
    assert four.bits_per_weight == pytest.approx(4 + 24 / 128, abs=1e-3)
    assert _relative_error(weight, Q.quantize(weight, frac_4bit=0.0, clip="mse")) < errors[0]


def test_state_dict_round_trip_and_moves(device):
    qw = Q.quantize(torch.randn(100, 300), frac_4bit=0.3, group_size=64).to(device)
    state = qw.state_dict()
    again = Q.QuantizedWeight.from_state_dict({k: v.clone() for k, v in state.items()})
    assert torch.equal(again.dequantize(), qw.dequantize())
    as_bf16 = qw.to(torch.bfloat16)
    assert as_bf16.dtype == torch.bfloat16 and as_bf16.scales.dtype == torch.bfloat16
    assert torch.equal(qw.cpu().codes(), qw.codes().cpu())
    bad = dict(state, meta=torch.tensor([99, 100, 300, 64]))
    with pytest.raises(ValueError, match="format version 99"):
        Q.QuantizedWeight.from_state_dict(bad)


def _mlp(seed: int = 0) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(256, 512), torch.nn.GELU(), torch.nn.LayerNorm(512), torch.nn.Linear(512, 512), torch.nn.GELU(),
        torch.nn.Linear(512, 10),
    )  # fmt: skip


def _trained_classifier():
    """A small MLP trained (150 Adam steps) on 10 noisy Gaussian clusters in 256-d, and held-out
    inputs: a model whose decisions mean something, as a language model's do, unlike a random one."""
    generator = torch.Generator().manual_seed(0)
    centers = torch.randn(10, 256, generator=generator)

    def batch(n, gen):
        y = torch.randint(0, 10, (n,), generator=gen)
        return centers[y] + 2.0 * torch.randn(n, 256, generator=gen), y

    model = _mlp()
    optimizer = torch.optim.Adam(model.parameters(), 1e-3)
    for _ in range(150):
        x, y = batch(256, generator)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model, batch(1024, torch.Generator().manual_seed(5))[0]


def test_quantized_mlp_keeps_its_top1(device):
    """The issue's model check: 2-bit weights with 25% 4-bit K-blocks, quantized vs dense logits."""
    dtype = torch.float16 if is_gpu(device) else torch.float32
    model, x = _trained_classifier()
    model, x = model.to(device), x.to(device)
    with torch.no_grad():
        reference = model(x).argmax(-1)
    quantized = _mlp().to(device)
    quantized.load_state_dict(model.state_dict())
    report = Q.quantize_model(quantized, frac_4bit=0.25, group_size=64, scale_dtype=torch.float16)
    assert set(report) == {"0", "3", "5"}
    assert isinstance(quantized[1], torch.nn.GELU) and isinstance(quantized[2], torch.nn.LayerNorm)
    assert all(isinstance(quantized[i], Q.QuantLinear) for i in (0, 3, 5))
    assert torch.equal(quantized[2].weight, model[2].weight)
    with torch.no_grad():
        agreement = float((quantized.to(dtype)(x.to(dtype)).argmax(-1) == reference).float().mean())
    assert agreement >= 0.9, agreement
    # 2-bit g64 with a quarter of the K-blocks in 4 bits: about 0.3 relative error per layer
    assert all(0.1 < entry["relative_output_error"] < 0.45 for entry in report.values())
    # (the 10-row head is padded to 64 rows, so its bits per weight are far higher)
    assert all(2.5 < report[name]["bits_per_weight"] < 3.5 for name in ("0", "3"))


def test_quantize_model_skip_and_calibration():
    generator = torch.Generator().manual_seed(1)
    model = _mlp(1)
    calibration = torch.randn(64, 256, generator=generator)
    report = Q.quantize_model(model, skip=["5"], calibration=calibration, select="hessian", frac_4bit=0.25, group_size=64)
    assert set(report) == {"0", "3"} and isinstance(model[5], torch.nn.Linear)
    assert all(entry["bits_per_weight"] < 3.5 for entry in report.values())


def test_quant_linear_state_dict_and_bias():
    linear = torch.nn.Linear(128, 64)
    layer = Q.QuantLinear.from_linear(linear, group_size=64)
    twin = Q.QuantLinear.from_linear(torch.nn.Linear(128, 64), group_size=64)
    twin.load_state_dict(layer.state_dict())
    x = torch.randn(3, 128)
    assert torch.equal(twin(x), layer(x))
    assert torch.equal(layer.bias.float(), linear.bias.detach().to(torch.float16).float())
    assert "bits_per_weight" in repr(layer)


def test_fastloss_namespace_keeps_quant_names_apart():
    assert not hasattr(fastloss, "matmul") and fastloss.nn.QuantLinear is Q.QuantLinear


# ---- bad input --------------------------------------------------------------------------------
def test_bad_input_raises_clear_errors(device):
    weight = torch.randn(64, 256)
    with pytest.raises(ValueError, match="frac_4bit"):
        Q.quantize(weight, frac_4bit=1.5)
    with pytest.raises(ValueError, match="group_size must be a power of two"):
        Q.quantize(weight, group_size=100)
    with pytest.raises(ValueError, match="bits"):
        Q.quantize(weight, bits=3)
    with pytest.raises(ValueError, match="double_quant"):
        Q.quantize(weight, double_quant=True)
    qw = Q.quantize(weight, group_size=64).to(device)
    with pytest.raises(ValueError, match="in_features=256"):
        Q.matmul(torch.randn(2, 255, device=device), qw)
    with pytest.raises(ValueError, match="'x' is torch.int64"):
        Q.matmul(torch.ones(2, 256, dtype=torch.int64, device=device), qw)
    with pytest.raises(ValueError, match="bias"):
        Q.matmul(torch.randn(2, 256, device=device, dtype=qw.dtype), qw, torch.randn(3, device=device, dtype=qw.dtype))
    codes = torch.full((4, 64), 5, dtype=torch.uint8)
    with pytest.raises(ValueError, match="does not fit the bit width"):
        Q.QuantizedWeight.from_codes(codes, torch.ones(4, 1, dtype=torch.float16), torch.zeros(4, 1, dtype=torch.uint8), [2], 64)


@pytest.mark.real_gpu(reason="a CPU weight with CUDA activations")
def test_cpu_weight_with_cuda_x_raises():
    qw = Q.quantize(torch.randn(64, 256), group_size=64)
    with pytest.raises(ValueError, match="QuantizedWeight is on cpu"):
        Q.matmul(torch.randn(2, 256, device="cuda", dtype=torch.float16), qw)


@pytest.mark.sim_no_launch
def test_x_of_another_dtype_than_the_scales_raises_on_the_gpu(gpu):
    qw = gpu(Q.quantize(torch.randn(64, 256), group_size=64))
    with gpu.kernels(), pytest.raises(ValueError, match=r"qw.to\(torch.bfloat16\)"):
        Q.matmul(torch.randn(2, 256, device=gpu.device, dtype=torch.bfloat16), qw)


@pytest.mark.parametrize("ctas", ["1", "3", "7", "50", "100000"])
def test_stream_k_ranges_of_any_length(monkeypatch, ctas, gpu):
    """The CUDA kernel cuts the (m block, row block, K-tile) units into one range per CTA; ranges
    that start or end inside a row block leave partial sums for the fixup kernel. Forcing the
    CTA count (FASTLOSS_QUANT_CTAS) covers whole, split and one-unit ranges; results are exact
    sums in a fixed order, so two runs agree bit for bit."""
    monkeypatch.setenv("FASTLOSS_QUANT_CTAS", ctas)
    with gpu.kernels():
        qw, *_ = _random_qw(200, 1000, 128, "mixed", gpu.device, torch.float16, seed=12)
        for m in (1, 9, 40, 100):
            _check_matmul(qw, m, torch.float16, gpu.device, seed=m)
            x = torch.randn(m, 1000, device=gpu.device, dtype=torch.float16)
            assert torch.equal(Q.matmul(x, qw), Q.matmul(x, qw))


def test_quantize_model_is_all_or_nothing():
    """A layer that cannot be quantized (hessian selection, but calibration never runs it) raises
    naming the layer, and no layer has been replaced."""
    model = torch.nn.ModuleDict({"a": torch.nn.Linear(128, 64), "unused": torch.nn.Linear(128, 64)})
    with pytest.raises(ValueError, match="layer 'unused'"):
        Q.quantize_model(model, calibration=lambda m: m["a"](input=torch.randn(4, 128)), select="hessian", group_size=64)
    assert all(isinstance(layer, torch.nn.Linear) for layer in model.values())


def test_corrupted_packed_arrays_are_refused(device):
    qw = Q.quantize(torch.randn(64, 512), frac_4bit=0.5, group_size=128).to(device)
    state = {k: v.clone() for k, v in qw.state_dict().items()}
    bad_rank = dict(state, side_index=torch.tensor([0, 7, 100000, -1], dtype=torch.int32, device=device))
    with pytest.raises(ValueError, match="'side_index' must number"):
        Q.QuantizedWeight.from_state_dict(bad_rank)
    bad_zero = dict(state, zeros=torch.full_like(state["zeros"], 200))
    with pytest.raises(ValueError, match="zero point does not fit"):
        Q.QuantizedWeight.from_state_dict(bad_zero)
    layer = Q.QuantLinear(qw)
    corrupted = dict(layer.state_dict(), side_index=bad_rank["side_index"])
    with pytest.raises(ValueError, match="'side_index' must number"):
        layer.load_state_dict(corrupted)


@pytest.mark.sim_no_launch
def test_misaligned_packed_arrays_are_refused_on_cuda(gpu):
    qw = gpu(Q.quantize(torch.randn(64, 256), group_size=64))
    shifted = torch.empty(qw.main.numel() + 1, dtype=torch.int32, device=gpu.device)[1:]
    shifted.copy_(qw.main)
    with gpu.kernels(), pytest.raises(ValueError, match="16-byte aligned"):
        Q.QuantizedWeight(main=shifted, side=qw.side, side_index=qw.side_index, scales=qw.scales, zeros=qw.zeros,
                          shape=qw.shape, group_size=qw.group_size)  # fmt: skip


def test_quant_linear_scale_conversions():
    layer = Q.QuantLinear.from_linear(torch.nn.Linear(128, 64), group_size=64)
    scales = layer.scales.clone()
    layer.float()  # the format keeps 16-bit scales
    assert layer.scales.dtype == torch.float16 and torch.equal(layer.scales, scales)
    layer.bfloat16()
    assert layer.scales.dtype == torch.bfloat16 and torch.equal(layer.scales, scales.to(torch.bfloat16))
    x = torch.randn(3, 128)
    expected = x @ layer.qweight.dequantize(torch.float32).t() + layer.bias.float()
    assert torch.allclose(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_more_bad_arguments():
    weight = torch.randn(64, 256)
    with pytest.raises(ValueError, match="frac_4bit"):
        Q.quantize(weight, frac_4bit=True)
    with pytest.raises(ValueError, match="select"):
        Q.quantize(weight, bits=4, select="bogus")
    codes, scales = torch.zeros(4, 64, dtype=torch.uint8), torch.ones(4, 1, dtype=torch.float16)
    with pytest.raises(ValueError, match="group_size must be a power of two"):
        Q.QuantizedWeight.from_codes(codes, scales, torch.zeros(4, 1, dtype=torch.uint8), [2], 0)
    with pytest.raises(ValueError, match="'zeros' must be an integer tensor"):
        Q.QuantizedWeight.from_codes(codes, scales, torch.full((4, 1), 1.7), [2], 64)
    with pytest.raises(ValueError, match=r"'bias' must have shape \(64,\), got \(3,\)"):
        Q.QuantLinear(Q.quantize(weight, group_size=64), torch.zeros(3))
