"""Softplus attention (fastloss.softplus_attention, LSSA and LSSAR) against the float64 reference
written from the formulas with the full matrix (fastloss.reference.attention), FlexAttention's
log-space score_mod, and plain decompositions (documents one by one, the last row of a full pass)."""

import math
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

import fastloss
from fastloss.attention import _ops
from fastloss.reference import attention as R

from conftest import assert_close, gpu_sized, is_gpu

# (tolerance on out, on the gradients) against float64, per dtype
TOL = {torch.float64: (1e-11, 1e-9), torch.float32: (2e-6, 2e-5), torch.bfloat16: (2e-2, 5e-2),
       torch.float16: (5e-3, 2e-2)}  # fmt: skip


def dtypes_for(device):
    return (torch.bfloat16, torch.float16) if is_gpu(device) else (torch.float32, torch.float64)


def make(shape_q, shape_kv, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(*shape_q, generator=g, dtype=torch.float64)
    k = torch.randn(*shape_kv, generator=g, dtype=torch.float64)
    v = torch.randn(*shape_kv, generator=g, dtype=torch.float64)
    return [t.to(device=device, dtype=dtype).requires_grad_() for t in (q, k, v)]


def check_against_reference(q, k, v, tol=None, **options):
    out = fastloss.softplus_attention(q, k, v, **options)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grads = torch.autograd.grad(out, (q, k, v), grad_out.to(out.device, out.dtype))
    expected = R.softplus_attention(q, k, v, **options)
    expected_grads = torch.autograd.grad(expected, (q, k, v), grad_out.to(out.device))
    tol_out, tol_grad = tol or TOL[q.dtype]
    assert out.dtype == q.dtype and out.shape == q.shape
    assert_close(out, expected, tol_out, f"out {options}")
    assert_rows_close(out, expected, tol_out, f"out {options}")
    for name, got, want in zip("qkv", grads, expected_grads):
        assert got.dtype == q.dtype
        assert_close(got, want, tol_grad, f"grad {name} {options}")
        assert_rows_close(got, want, tol_grad, f"grad {name} {options}")
    return out


def assert_rows_close(actual, expected, rtol, what):
    """No single row far off: the worst row's error, against the typical row norm (a 2-norm over the
    whole tensor would let one wrong row of a thousand through)."""
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    if expected.numel() == 0:
        return
    row_error = (actual - expected).norm(dim=-1).flatten()
    typical = expected.norm(dim=-1).flatten().square().mean().sqrt()  # RMS row norm
    worst = float(row_error.max() / typical) if float(typical) > 0 else float(row_error.max())
    assert worst <= 10 * rtol, f"{what}: worst row error {worst:.3e} > {10 * rtol:.1e}"


SHAPES = [  # (B, Hq, Hkv, Nq, Nk, d): size 1, GQA, MQA, rows fewer than keys, several tiles with a remainder
    (1, 1, 1, 1, 1, 8),
    (2, 4, 2, 70, 70, 16),
    (1, 3, 1, 33, 100, 24),
    (2, 2, 2, 130, 130, 64),
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("reweight", [None, 15, 2.5], ids=["lssa", "lssar15", "lssar2.5"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_matches_float64_reference(device, shape, reweight, causal):
    b, hq, hkv, nq, nk, d = shape
    if is_gpu(device) and d not in (32, 64):
        d = 32 if d < 32 else 64
    for dtype in dtypes_for(device):
        q, k, v = make((b, hq, nq, d), (b, hkv, nk, d), dtype, device)
        check_against_reference(q, k, v, causal=causal, reweight=reweight)


@pytest.mark.parametrize("scale", [None, 2.5], ids=["inv_sqrt_d", "fixed"])
def test_fixed_scales_and_unnormalized_scores(device, scale):
    for dtype in dtypes_for(device):
        q, k, v = make((2, 2, 45, 32), (2, 1, 45, 32), dtype, device)
        check_against_reference(q, k, v, scale=scale, normalize_qk=scale is None)
        # At c = 1/sqrt(d) the rows are nearly uniform and x = N A - 1 cancels to a few digits: the
        # float32 inputs' rounding is amplified about 30x there, in any implementation.
        loose = {torch.float32: (1e-4, 5e-4), torch.float64: (1e-9, 1e-8)}.get(dtype)
        check_against_reference(q, k, v, tol=loose, scale=scale, normalize_qk=scale is None, reweight=3)


@pytest.mark.parametrize("reweight", [None, 15])
@pytest.mark.parametrize("causal", [True, False])
def test_varlen_documents_equal_each_document_alone(device, reweight, causal):
    bounds = [0, 1, 5, 70, 200]  # a document of one token, and documents across tile edges
    for dtype in dtypes_for(device):
        q, k, v = make((1, 4, 200, 32), (1, 2, 200, 32), dtype, device)
        cu = torch.tensor(bounds, dtype=torch.int32, device=device)
        out = check_against_reference(q, k, v, cu_seqlens=cu, causal=causal, reweight=reweight)
        for s, e in zip(bounds[:-1], bounds[1:]):
            alone = fastloss.softplus_attention(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], causal=causal,
                                                reweight=reweight)  # fmt: skip
            assert_close(out[:, :, s:e], alone, TOL[dtype][0] * 4, f"document {s}:{e}")


@pytest.mark.parametrize("causal", [True, False])
def test_sliding_window(device, causal):
    for dtype in dtypes_for(device):
        q, k, v = make((1, 2, 150, 32), (1, 2, 150, 32), dtype, device)
        for window in (1, 7, 64, 1000):
            # A short LSSAR window can be badly conditioned in q: with 7 keys, two score gradients of
            # about +-500 cancel in row 185 here, so rounding the normalized q and k to bf16 (as the API
            # does before the kernel) alone moves the exact dQ row by 0.48 of the typical row norm, just
            # under the 10x row bound; the kernel itself agrees with float64 at its rounded inputs to 0.023.
            short = window <= 7 and dtype in (torch.float16, torch.bfloat16)
            tol = (TOL[dtype][0], 2 * TOL[dtype][1]) if short else None
            check_against_reference(q, k, v, tol=tol, causal=causal, window=window, reweight=15)
        cu = torch.tensor([0, 20, 150], dtype=torch.int32, device=device)
        check_against_reference(q, k, v, causal=causal, window=9, cu_seqlens=cu, reweight=None)


def test_decode_step_equals_the_last_row_of_the_full_pass(device):
    for dtype in dtypes_for(device):
        q, k, v = make((2, 4, 90, 64), (2, 2, 90, 64), dtype, device)
        for reweight in (None, 15):
            full = fastloss.softplus_attention(q, k, v, reweight=reweight)
            step = fastloss.softplus_attention(q[:, :, -1:], k, v, reweight=reweight)
            assert_close(step, full[:, :, -1:], TOL[dtype][0] * 4, "decode step")
            check_against_reference(q[:, :, -1:].detach().requires_grad_(), k, v, reweight=reweight)


@pytest.mark.parametrize("window", [None, 1000])
def test_decode_step_against_a_long_cache(device, window):
    """One row against 3000 keys: on CUDA the split-KV decode kernel with many splits."""
    for dtype in dtypes_for(device):
        q, k, v = make((1, 2, 1, 64), (1, 1, 3000, 64), dtype, device)
        for reweight in (None, 15):
            for causal in (True, False):
                check_against_reference(q, k, v, causal=causal, window=window, reweight=reweight)


def test_offset_rows_rule_and_first_row(device):
    for dtype in dtypes_for(device):
        q, k, v = make((1, 2, 40, 32), (1, 2, 40, 32), dtype, device)
        for rows in (0, 3, 50):
            check_against_reference(q, k, v, reweight=15, reweight_offset_rows=rows)
        # Row 0 sees only key 0 (scale log(d) log(1) = 0): its output is v_0 exactly, LSSA and LSSAR.
        for reweight in (None, 15):
            out = fastloss.softplus_attention(q, k, v, reweight=reweight)
            assert_close(out[:, :, 0], v[:, :, 0], TOL[dtype][0], "row 0")


def test_peaked_rows_with_p15_stay_finite_where_the_naive_formula_overflows():
    """Rows put almost all their mass on three of 4096 keys (cosines 1, 0.9, 0.8): N A - 1 is about
    1500, 1360 and 1210, and x^15 (~5e47) overflows float32, so the formula as written gives inf/NaN.
    The kernel normalizes by the row's largest x first; W is (1, 0.21, 0.035) / sum, so the output,
    and the gradients, depend on all three keys."""
    n, d = 4096, 64
    g = torch.Generator().manual_seed(3)
    u = F.normalize(torch.randn(d, generator=g, dtype=torch.float64), dim=0)
    w = F.normalize(torch.randn(d, generator=g, dtype=torch.float64), dim=0)
    w = F.normalize(w - (w @ u) * u, dim=0)  # orthogonal to u
    q = (u + 0.01 * torch.randn(1, 1, 8, d, generator=g, dtype=torch.float64))
    k = -u.expand(1, 1, n, d).clone() + 0.01 * torch.randn(1, 1, n, d, generator=g, dtype=torch.float64)
    for key, cosine in ((1234, 1.0), (2000, 0.9), (3000, 0.8)):
        k[0, 0, key] = cosine * u + math.sqrt(1 - cosine**2) * w
    v = torch.randn(1, 1, n, d, generator=g, dtype=torch.float64)
    q32, k32, v32 = (t.float().requires_grad_() for t in (q, k, v))
    naive = R.softplus_attention(q32.detach(), k32.detach(), v32.detach(), causal=False, reweight=15,
                                 dtype=torch.float32)  # fmt: skip
    assert not bool(torch.isfinite(naive).all()), "the naive float32 formula was expected to overflow here"
    # float32 rounding of the inputs, amplified by p = 15 in the gradients of the three keys
    check_against_reference(q32, k32, v32, tol=(1e-5, 1e-3), causal=False, reweight=15)
    expected = R.softplus_attention(q, k, v, causal=False, reweight=15)
    lssa = R.softplus_attention(q, k, v, causal=False)
    assert float((expected - lssa).norm() / expected.norm()) > 0.1  # the re-weighting matters here


def test_lssa_equals_flex_attention_with_a_log_softplus_score_mod():
    flex = pytest.importorskip("torch.nn.attention.flex_attention")
    n, d = 80, 32
    q, k, v = (t.detach() for t in make((1, 2, n, d), (1, 2, n, d), torch.float32, "cpu"))
    qn, kn = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    log_d = math.log(d)

    def lssa_mod(score, b, h, q_idx, kv_idx):
        c = log_d * torch.log((q_idx + 1).to(torch.float32))
        s = c * score
        log_sp = torch.where(s < -15.0, s, torch.log(F.softplus(s)))
        return torch.where(kv_idx <= q_idx, log_sp, -float("inf"))

    expected = flex.flex_attention(qn, kn, v, score_mod=lssa_mod, scale=1.0)
    assert_close(fastloss.softplus_attention(q, k, v), expected, 1e-5, "flex LSSA")


def test_backward_is_deterministic(device):
    dtype = dtypes_for(device)[0]
    q, k, v = make((1, 4, 300, 64), (1, 1, 300, 64), dtype, device)
    runs = []
    threads = torch.get_num_threads()
    try:
        for count in (threads, 1):  # on the CPU, also with another split of the work
            torch.set_num_threads(count)
            out = fastloss.softplus_attention(q, k, v, reweight=15)
            runs.append(torch.autograd.grad(out.square().sum(), (q, k, v)))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_double_backward_is_refused(device):
    q, k, v = make((1, 2, 20, 32), (1, 2, 20, 32), dtypes_for(device)[0], device)
    out = fastloss.softplus_attention(q, k, v)
    grad_q = torch.autograd.grad(out.square().sum(), q, create_graph=True)[0]
    with pytest.raises(RuntimeError, match="double backward"):
        grad_q.sum().backward()


def test_strided_expanded_inputs_and_int64_offsets(device):
    """Transposed q (as a projection gives), stride-0 expanded k/v (MQA written as MHA), int64
    cu_seqlens, and a window in a decode step."""
    dtype = dtypes_for(device)[0]
    q, k, v = make((1, 30, 3, 32), (1, 1, 30, 32), dtype, device)
    qt = q.transpose(1, 2)  # (1, 3, 30, 32), not contiguous
    ke, ve = k.expand(1, 3, 30, 32), v.expand(1, 3, 30, 32)
    check_against_reference(qt, ke, ve, reweight=15)
    check_against_reference(qt, ke, ve, cu_seqlens=torch.tensor([0, 11, 30], device=device), reweight=15)
    check_against_reference(qt[:, :, -1:], ke, ve, window=5, reweight=15)


def test_sixteen_bit_inputs_on_cpu_compute_in_float32():
    for dtype in (torch.bfloat16, torch.float16):
        q, k, v = make((1, 2, 50, 32), (1, 2, 50, 32), dtype, "cpu")
        check_against_reference(q, k, v, reweight=15, tol=(1e-2, 3e-2))


@pytest.mark.sim_no_launch  # nothing to launch for empty inputs
def test_empty_and_zero_length_inputs(device):
    dtype = dtypes_for(device)[0]
    q, k, v = make((0, 2, 5, 32), (0, 2, 5, 32), dtype, device)
    out = fastloss.softplus_attention(q, k, v)
    assert out.shape == (0, 2, 5, 32)
    q, k, v = make((1, 2, 0, 32), (1, 2, 7, 32), dtype, device)
    out = fastloss.softplus_attention(q, k, v)
    out.sum().backward()
    assert out.shape == (1, 2, 0, 32) and bool((k.grad == 0).all()) and bool((v.grad == 0).all())


def test_ops_pass_opcheck_and_compile_without_graph_breaks():
    q, k, v = (t.detach() for t in make((1, 2, 20, 16), (1, 1, 20, 16), torch.float32, "cpu"))
    q, k, v = F.normalize(q, dim=-1), F.normalize(k, dim=-1), v
    for args in [(None, True, 0, True, 0.0, 15.0, 3), (None, False, 5, False, 0.5, 0.0, 3),
                 (torch.tensor([0, 4, 20], dtype=torch.int32), True, 0, True, 0.0, 0.0, 3)]:  # fmt: skip
        torch.library.opcheck(torch.ops.fastloss.softplus_attention_fwd.default,
                              (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), *args))  # fmt: skip
    qt = q.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()  # same values, other strides
    torch.library.opcheck(torch.ops.fastloss.softplus_attention_fwd.default,
                          (qt, k, v, None, True, 0, True, 0.0, 15.0, 3))  # fmt: skip
    compiled = torch.compile(lambda a, b, c: fastloss.softplus_attention(a, b, c, reweight=15), fullgraph=True,
                             backend="aot_eager")  # fmt: skip
    q, k, v = make((1, 2, 20, 16), (1, 1, 20, 16), torch.float32, "cpu")
    out = compiled(q, k, v)
    out.sum().backward()
    assert_close(out, fastloss.softplus_attention(q, k, v, reweight=15), 1e-6, "compiled")
    assert q.grad is not None and bool(torch.isfinite(q.grad).all())


def test_cpu_memory_stays_linear_in_sequence_length():
    """N = 8192 causal forward + backward: the score matrix alone would be 256 MiB in float32."""
    script = textwrap.dedent("""
        import resource, torch, fastloss
        q, k, v = (torch.randn(1, 1, 8192, 32, requires_grad=True) for _ in range(3))
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        fastloss.softplus_attention(q, k, v).sum().backward()
        print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    grown_mib = float(result.stdout.strip().splitlines()[-1])
    assert grown_mib < 64, f"peak memory grew by {grown_mib:.0f} MiB"


def rope(q, k, positions):
    """Rotary embedding of the (first half, second half) pairs at the given absolute positions."""
    half = q.shape[-1] // 2
    freq = 1.0 / (10000 ** (torch.arange(half, dtype=torch.float64) / half))
    angle = positions.to(torch.float64)[:, None] * freq[None, :]
    cos, sin = angle.cos().to(q.dtype), angle.sin().to(q.dtype)

    def rotate(x):
        a, b = x[..., :half], x[..., half:]
        return torch.cat([a * cos - b * sin, a * sin + b * cos], dim=-1)

    return rotate(q), rotate(k)


def test_module_projections_gqa_rotary_and_kv_cache():
    torch.manual_seed(0)
    calls = []

    def rotary(q, k, positions):
        calls.append(positions.clone())
        return rope(q, k, positions)

    layer = fastloss.nn.SoftplusAttention(64, 4, num_kv_heads=2, rotary=rotary, reweight=15, dtype=torch.float64)
    x = torch.randn(2, 30, 64, dtype=torch.float64)
    out = layer(x)
    q = layer.q_proj(x).view(2, 30, 4, 16).transpose(1, 2)
    k = layer.k_proj(x).view(2, 30, 2, 16).transpose(1, 2)
    v = layer.v_proj(x).view(2, 30, 2, 16).transpose(1, 2)
    q, k = rope(q, k, torch.arange(30))
    expected = layer.out_proj(R.softplus_attention(q, k, v, reweight=15).transpose(1, 2).reshape(2, 30, 64))
    assert_close(out, expected, 1e-10, "module")
    assert torch.equal(calls[0], torch.arange(30))
    # Decoding: the prefix through the cache, then one token, equals the full pass (RoPE positions
    # continue from the cache).
    prefix, cache = layer(x[:, :29], use_cache=True)
    last, cache = layer(x[:, 29:], past_key_value=cache, use_cache=True)
    assert torch.equal(calls[-1], torch.tensor([29])) and cache[0].shape == (2, 2, 30, 16)
    assert_close(torch.cat([prefix, last], 1), out, 1e-10, "decode through the cache")
    # Explicit positions (a trimmed cache): the same token at the same position gives the same output.
    trimmed = (cache[0][:, :, 10:29], cache[1][:, :, 10:29])
    windowed = fastloss.nn.SoftplusAttention(64, 4, num_kv_heads=2, rotary=rotary, reweight=15, window=19,
                                             dtype=torch.float64)  # fmt: skip
    windowed.load_state_dict(layer.state_dict())
    full_window = windowed(x)
    step = windowed(x[:, 29:], past_key_value=trimmed, positions=torch.tensor([29]))
    assert torch.equal(calls[-1], torch.tensor([29]))
    assert_close(step, full_window[:, 29:], 1e-10, "trimmed cache with explicit positions")
    with pytest.raises(ValueError, match="num_kv_heads"):
        fastloss.nn.SoftplusAttention(64, 4, num_kv_heads=3)


def test_bad_input_is_refused_with_a_clear_error():
    q, k, v = (t.detach() for t in make((1, 4, 10, 16), (1, 2, 10, 16), torch.float32, "cpu"))
    sa = fastloss.softplus_attention
    cases = [
        (lambda: sa(q, k[:, :1].expand(1, 3, 10, 16), v[:, :1].expand(1, 3, 10, 16)), ValueError, "multiple"),
        (lambda: sa(q, k, v[..., :8]), ValueError, "one shape"),
        (lambda: sa(q, k[..., :8], v[..., :8]), ValueError, "head_dim"),
        (lambda: sa(q, k.double(), v.double()), TypeError, "share a dtype"),
        (lambda: sa(q[0], k, v), ValueError, "'q' must be"),
        (lambda: sa(torch.randn(1, 4, 11, 16), k, v), ValueError, "<= k's"),
        (lambda: sa(q, k, v, scale=-1.0), ValueError, "'scale'"),
        (lambda: sa(q, k, v, scale="log"), ValueError, "'scale'"),
        (lambda: sa(q, k, v, reweight=0.5), ValueError, "'reweight'"),
        (lambda: sa(q, k, v, window=0), ValueError, "'window'"),
        (lambda: sa(q, k, v, reweight_offset_rows=-1), ValueError, "reweight_offset_rows"),
        (lambda: sa(q, k, v, cu_seqlens=torch.tensor([0, 6, 4, 10])), ValueError, "increase strictly"),
        (lambda: sa(q, k, v, cu_seqlens=torch.tensor([0, 4, 9])), ValueError, "increase strictly"),
        (lambda: sa(q, k, v, cu_seqlens=torch.tensor([0.0, 10.0])), ValueError, "cu_seqlens"),
        (lambda: sa(q.expand(2, 4, 10, 16), k.expand(2, 2, 10, 16), v.expand(2, 2, 10, 16),
                    cu_seqlens=torch.tensor([0, 10])), ValueError, "batch of 1"),  # fmt: skip
        (lambda: sa(q.int(), k, v), TypeError, "'q' must have dtype"),
        (lambda: sa(q[:, :0], k, v), ValueError, "query heads"),
    ]
    for call, error, words in cases:
        with pytest.raises(error, match=words) as info:
            call()
        assert "softplus_attention" in str(info.value)
    with pytest.raises(ValueError, match="head dims"):
        _ops._require_cuda_shape(torch.empty(1, 1, 1, 80, dtype=torch.bfloat16))
    with pytest.raises(TypeError, match="float16 or bfloat16"):
        _ops._require_cuda_shape(torch.empty(1, 1, 1, 64))


# (B, Hq, Hkv, N) of the GQA runs and (N, cu_seqlens) of the varlen run: the kernels work in 64-row
# tiles (csrc/attention/attention_cuda.cu). Simulated GPU: 130 rows (two full tiles and a 2-row
# remainder), a document of 64 rows ending on a tile edge, one of a single row, one across tiles.
HEAD_DIM_CASE = gpu_sized(((2, 4, 1, 200), (300, [0, 64, 65, 300])), ((1, 4, 1, 130), (150, [0, 64, 65, 150])))


@pytest.mark.parametrize("dim", [32, 64, 96, 128])
def test_cuda_head_dims_and_lssar_varlen(dim, gpu):
    (b, hq, hkv, n), (n_varlen, bounds) = HEAD_DIM_CASE
    for dtype in (torch.bfloat16, torch.float16):
        q, k, v = make((b, hq, n, dim), (b, hkv, n, dim), dtype, gpu.device)
        with gpu.kernels():
            check_against_reference(q, k, v, reweight=15)
            check_against_reference(q, k, v, causal=False, window=33)
        q, k, v = make((1, 2, n_varlen, dim), (1, 2, n_varlen, dim), dtype, gpu.device)
        cu = torch.tensor(bounds, dtype=torch.int32, device=gpu.device)
        with gpu.kernels():
            check_against_reference(q, k, v, cu_seqlens=cu, reweight=15)


@pytest.mark.sim_no_launch
def test_cuda_refuses_float32_and_other_head_dims(gpu):
    q, k, v = (t.detach() for t in make((1, 1, 8, 80), (1, 1, 8, 80), torch.bfloat16, gpu.device))
    with gpu.kernels():
        with pytest.raises(ValueError, match="head dims"):
            fastloss.softplus_attention(q, k, v)
        with pytest.raises(TypeError, match="float16 or bfloat16"):
            fastloss.softplus_attention(q[..., :64].float(), k[..., :64].float(), v[..., :64].float())


@pytest.mark.real_gpu(reason="torch.cuda memory statistics")
def test_cuda_memory_has_no_quadratic_term():
    q, k, v = make((1, 8, 8192, 128), (1, 8, 8192, 128), torch.bfloat16, "cuda")
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fastloss.softplus_attention(q, k, v, reweight=15).sum().backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra < 8 * 8192 * 128 * 2 * 12, f"{extra / 2**20:.0f} MiB"  # a dozen q-sized buffers, not N^2
