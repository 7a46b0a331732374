"""fastloss.quant._quantizer: mixed 2/4-bit asymmetric group quantization, checked against a plain
per-group loop and against the error levels the scheme should reach on Gaussian weights."""

import re
import time

import pytest
import torch

from fastloss.quant import _quantizer as Q

N, K, GS = 1024, 1024, 128
G = K // GS


def gaussian(rows=N, cols=K, seed=0):
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))


def bits_of(mask):
    return torch.where(mask, 4, 2)


def roundtrip(weight, bits, *, group_size=GS, clip="minmax", scale_dtype=torch.float16):
    codes, scales, zeros = Q.quantize_groups(
        weight, group_size=group_size, group_bits=bits, clip=clip, scale_dtype=scale_dtype
    )
    return Q.dequantize_groups(codes, scales, zeros, group_size=group_size, K=weight.shape[1])


def rel_error(weight, w_hat):
    return float((weight - w_hat).norm() / weight.norm())


def uniform(bits, groups=G):
    return torch.full((groups,), bits, dtype=torch.int64)


# ------------------------------------------------------------------------------------------------
# error levels


def test_error_levels_on_gaussian():
    w = gaussian()
    e2 = rel_error(w, roundtrip(w, uniform(2)))
    e4 = rel_error(w, roundtrip(w, uniform(4)))
    mask = Q.choose_4bit_blocks(Q.block_scores(w, group_size=GS, select="range"), 0.25)
    assert int(mask.sum()) == 2
    emix = rel_error(w, roundtrip(w, bits_of(mask)))
    print(f"gaussian g{GS}: 2-bit {e2:.4f}, 4-bit {e4:.4f}, 25% 4-bit by range {emix:.4f}")
    assert e2 <= 0.52  # about 0.50
    assert e4 <= 0.11  # about 0.10
    assert emix <= 0.45
    assert e2 > emix > e4


@pytest.mark.parametrize("sigma", [0.5, 1.0])
def test_range_selection_beats_random_on_block_scaled_weights(sigma):
    # Column stripes with lognormal scales: the error budget sits in the wide stripes, which
    # range-aware selection gives 4 bits and random selection mostly misses. The G = 8 scales are
    # the lognormal's (j + 0.5) / G quantiles in a seeded random order rather than 8 draws, so the
    # test sees the distribution's spread and not the luck of 8 samples.
    generator = torch.Generator().manual_seed(0)
    quantiles = (torch.arange(G, dtype=torch.float64) + 0.5) / G
    block_scale = torch.exp(sigma * torch.special.ndtri(quantiles)).float()[torch.randperm(G, generator=generator)]
    w = torch.randn(N, K, generator=generator) * block_scale.repeat_interleave(GS)[None, :]
    by_range = Q.choose_4bit_blocks(Q.block_scores(w, group_size=GS, select="range"), 0.25)
    e_range = rel_error(w, roundtrip(w, bits_of(by_range)))
    e_random = []
    for seed in range(8):
        scores = Q.block_scores(w, group_size=GS, select="random", generator=torch.Generator().manual_seed(seed))
        e_random.append(rel_error(w, roundtrip(w, bits_of(Q.choose_4bit_blocks(scores, 0.25)))))
    e_random = sum(e_random) / len(e_random)
    print(f"lognormal sigma {sigma}: range {e_range:.4f}, random (mean of 8) {e_random:.4f}")
    assert e_range <= 0.85 * e_random


def test_mse_clip_lowers_2bit_error():
    w = gaussian()
    e_minmax = rel_error(w, roundtrip(w, uniform(2)))
    e_mse = rel_error(w, roundtrip(w, uniform(2), clip="mse"))
    print(f"2-bit g{GS}: minmax {e_minmax:.4f}, mse clip {e_mse:.4f}")
    assert e_mse <= 0.40  # about 0.37
    assert e_mse < e_minmax - 0.1


def test_mse_clip_never_worse_per_group():
    # alpha = 1 is in the grid, so each group's chosen error is at most its min-max error.
    w = gaussian(64, 1000, seed=3)
    bits = torch.tensor([2, 4, 2, 4, 4, 2, 2, 4])
    per_group = lambda w_hat: Q._groups(w - w_hat, GS).square().sum(-1)
    assert bool((per_group(roundtrip(w, bits, clip="mse")) <= per_group(roundtrip(w, bits))).all())


def test_hessian_selection_follows_activation_energy():
    w = gaussian()
    range_scores = Q.block_scores(w, group_size=GS, select="range")
    by_range = Q.choose_4bit_blocks(range_scores, 0.25)
    # Give 100x energy to the block that range selection ranks last, so the two rules must differ.
    hot = int(range_scores.argmin())
    x = torch.randn(2048, K, generator=torch.Generator().manual_seed(4))
    x[:, hot * GS : (hot + 1) * GS] *= 10.0
    by_hessian = Q.choose_4bit_blocks(Q.block_scores(w, group_size=GS, select="hessian", hessian=x), 0.25)
    assert bool(by_hessian[hot]) and not bool(by_range[hot])
    out_error = lambda mask: float((x @ (w - roundtrip(w, bits_of(mask))).T).norm())
    e_hessian, e_range = out_error(by_hessian), out_error(by_range)
    print(f"output error ||X (W - W_hat)^T||: hessian {e_hessian:.1f}, range {e_range:.1f}")
    assert e_hessian < 0.8 * e_range


def test_hessian_forms_agree():
    w = gaussian(16, 200, seed=5)
    x = torch.randn(3, 7, 200, generator=torch.Generator().manual_seed(6))
    h = x.reshape(-1, 200).T @ x.reshape(-1, 200)
    from_x = Q.block_scores(w, group_size=64, select="hessian", hessian=x)
    from_h = Q.block_scores(w, group_size=64, select="hessian", hessian=h)
    from_diag = Q.block_scores(w, group_size=64, select="hessian", hessian=torch.diagonal(h).clone())
    assert from_x.shape == (4,) and from_x.dtype == torch.float32
    torch.testing.assert_close(from_h, from_diag, rtol=0, atol=0)
    torch.testing.assert_close(from_x, from_h, rtol=1e-5, atol=0)


# ------------------------------------------------------------------------------------------------
# exact properties against a plain loop


def loop_reference(w, group_size, bits, clip, scale_dtype):
    """One group at a time, exactly as the spec reads, in float32 torch scalars."""
    rows, cols = w.shape
    groups = -(-cols // group_size)
    codes = torch.empty(rows, groups * group_size, dtype=torch.uint8)
    scales = torch.empty(rows, groups, dtype=scale_dtype)
    zeros = torch.empty(rows, groups, dtype=torch.uint8)
    for n in range(rows):
        for j in range(groups):
            start, stop = j * group_size, min((j + 1) * group_size, cols)
            v = w[n, start:stop].float()
            levels = 2 ** int(bits[j]) - 1
            lo, hi = torch.clamp(v.min(), max=0.0), torch.clamp(v.max(), min=0.0)

            def fit(alpha):
                s = ((hi * alpha - lo * alpha) / levels).to(scale_dtype).float()
                s = torch.ones_like(s) if s == 0 else s
                z = torch.clamp(torch.round(-(lo * alpha) / s), 0, levels)
                q = torch.clamp(torch.round(v / s) + z, 0, levels)
                return s, z, q, float(((q - z) * s - v).square().sum())

            best = fit(1.0)
            if clip == "mse":
                for alpha in Q.MSE_ALPHAS[1:]:
                    candidate = fit(alpha)
                    if candidate[3] < best[3]:
                        best = candidate
            s, z, q, _ = best
            scales[n, j], zeros[n, j] = s.to(scale_dtype), z.to(torch.uint8)
            codes[n, start : start + group_size] = z.to(torch.uint8)  # padded columns: q = z
            codes[n, start:stop] = q.to(torch.uint8)
    return codes, scales, zeros


def awkward_weight():
    # N=3, K=200 at g=64: G=4, the last group has 8 valid columns of 64.
    w = torch.randn(3, 200, generator=torch.Generator().manual_seed(7)) * 2.0
    w[0, 0:64] = 0.0  # all-zero group: s = 1, every code z, dequantizes to 0
    w[1, 64:128] = 0.7  # constant positive group: lo = 0, so z = 0
    w[2, 128:192] = -w[2, 128:192].abs()  # all-negative group: hi = 0, so z = L
    w[2, 192:200] = 50.0  # outliers in the padded group, to catch padding in the statistics
    return w


@pytest.mark.parametrize("clip", ["minmax", "mse"])
@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.bfloat16])
def test_matches_loop_reference(clip, scale_dtype):
    w, gs, bits = awkward_weight(), 64, torch.tensor([2, 4, 4, 2])
    codes, scales, zeros = Q.quantize_groups(w, group_size=gs, group_bits=bits, clip=clip, scale_dtype=scale_dtype)
    ref_codes, ref_scales, ref_zeros = loop_reference(w, gs, bits, clip, scale_dtype)
    assert codes.dtype == torch.uint8 and codes.shape == (3, 256)
    assert scales.dtype == scale_dtype and scales.shape == (3, 4)
    assert zeros.dtype == torch.uint8 and zeros.shape == (3, 4)
    assert torch.equal(codes, ref_codes)
    assert torch.equal(scales, ref_scales)
    assert torch.equal(zeros, ref_zeros)

    levels = (2 ** bits - 1).repeat_interleave(gs)
    assert bool((codes.long() <= levels).all())
    assert torch.equal(codes[:, 200:], zeros[:, 3:4].expand(3, 56))  # padded columns: q == z
    assert scales[0, 0] == 1 and bool((codes[0, :64] == zeros[0, 0]).all())
    assert zeros[1, 1] == 0 and zeros[2, 2] == 15

    padded = Q.dequantize_groups(codes, scales, zeros, group_size=gs, K=256)
    assert bool((padded[:, 200:] == 0).all())
    w_hat = Q.dequantize_groups(codes, scales, zeros, group_size=gs, K=200)
    assert w_hat.shape == (3, 200) and w_hat.dtype == torch.float32
    assert torch.equal(w_hat, padded[:, :200])
    assert bool((w_hat[0, :64] == 0).all())
    expected = (ref_codes.float().view(3, 4, gs) - ref_zeros.float()[..., None]) * ref_scales.float()[..., None]
    assert torch.equal(w_hat, expected.view(3, 256)[:, :200])


def test_bfloat16_codes_use_rounded_scale():
    w = gaussian(256, 512, seed=8)
    bits = torch.tensor([2, 4, 2, 4])
    codes, scales, zeros = Q.quantize_groups(w, group_size=GS, group_bits=bits, scale_dtype=torch.bfloat16)
    assert scales.dtype == torch.bfloat16
    levels = (2.0 ** bits - 1)[None, :, None]
    wg = w.view(256, 4, GS)

    def codes_with(s):
        lo = wg.amin(-1).clamp(max=0)
        z = torch.round(-lo / s).clamp(min=0).minimum(levels[..., 0])
        q = (torch.round(wg / s[..., None]) + z[..., None]).clamp(min=0).minimum(levels)
        return q.to(torch.uint8).view(256, 512)

    s_rounded = scales.float()
    lo, hi = wg.amin(-1).clamp(max=0), wg.amax(-1).clamp(min=0)
    s_exact = (hi - lo) / levels[..., 0]
    assert torch.equal(codes, codes_with(s_rounded))
    assert not torch.equal(codes, codes_with(s_exact))  # bf16 rounding is coarse enough to matter here
    w_hat = Q.dequantize_groups(codes, scales, zeros, group_size=GS, K=512)
    expected = (codes.float().view(256, 4, GS) - zeros.float()[..., None]) * s_rounded[..., None]
    assert torch.equal(w_hat, expected.view(256, 512))
    assert rel_error(w, w_hat) < 0.4


@pytest.mark.parametrize("shape", [(1, 1), (1, 64), (2, 65), (5, 127), (1, 300)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_small_shapes_and_dtypes(shape, dtype):
    w = (torch.randn(*shape, generator=torch.Generator().manual_seed(9)) + 0.3).to(dtype)
    groups = -(-shape[1] // 64)
    bits = torch.tensor([4, 2] * groups)[:groups]
    codes, scales, zeros = Q.quantize_groups(w, group_size=64, group_bits=bits)
    assert codes.shape == (shape[0], groups * 64) and scales.shape == zeros.shape == (shape[0], groups)
    ref = loop_reference(w.float(), 64, bits, "minmax", torch.float16)
    assert torch.equal(codes, ref[0]) and torch.equal(scales, ref[1]) and torch.equal(zeros, ref[2])
    w_hat = Q.dequantize_groups(codes, scales, zeros, group_size=64, K=shape[1])
    assert w_hat.shape == shape
    for name in ("range", "hessian", "random"):
        hessian = torch.ones(shape[1]) if name == "hessian" else None
        assert Q.block_scores(w, group_size=64, select=name, hessian=hessian).shape == (groups,)


def test_large_weight_is_fast():
    w = gaussian(4096, 4096, seed=10)
    start = time.perf_counter()
    codes, scales, zeros = Q.quantize_groups(w, group_size=GS, group_bits=uniform(2, 32))
    seconds = time.perf_counter() - start
    assert codes.shape == (4096, 4096) and scales.shape == (4096, 32)
    assert seconds < 5.0, f"4096 x 4096 min-max quantization took {seconds:.2f} s"  # about 0.2 s


def test_choose_4bit_blocks_counts_and_ties():
    scores = torch.tensor([1.0, 3.0, 3.0, 0.5, 3.0, 2.0])
    assert Q.choose_4bit_blocks(scores, 0.0).tolist() == [False] * 6
    assert Q.choose_4bit_blocks(scores, 1.0).tolist() == [True] * 6
    # top 2 of the three tied 3.0 scores: the lower indices 1 and 2
    assert Q.choose_4bit_blocks(scores, 2 / 6).tolist() == [False, True, True, False, False, False]
    assert Q.choose_4bit_blocks(scores, 0.5).tolist() == [False, True, True, False, True, False]
    assert Q.choose_4bit_blocks(torch.zeros(4), 0.5).tolist() == [True, True, False, False]
    assert Q.choose_4bit_blocks(torch.tensor([1.0, 2.0]), 0.25).tolist() == [False, True]  # 0.5 rounds up


# ------------------------------------------------------------------------------------------------
# argument errors


def raises(text):
    return pytest.raises(ValueError, match=re.escape("fastloss.quant.quantize: ") + ".*" + text)


def quantize(w=None, **kwargs):
    w = gaussian(4, 256) if w is None else w
    args = dict(group_size=64, group_bits=uniform(2, 4))
    args.update(kwargs)
    return Q.quantize_groups(w, **args)


@pytest.mark.parametrize("group_size", [100, 32, 0, -64, 192, 96, 64.0, True])
def test_group_size_errors(group_size):
    expected = f"group_size must be a power of two >= 64 (the packed word tile is 64 columns), got {group_size!r}"
    with raises(re.escape(expected)):
        quantize(group_size=group_size)
    with raises("group_size must be a power of two"):
        Q.block_scores(gaussian(4, 256), group_size=group_size)


@pytest.mark.parametrize(
    "weight, text",
    [
        (torch.randn(256), "weight must be a 2-D floating point tensor"),
        (torch.randn(2, 3, 256), "weight must be a 2-D floating point tensor"),
        (torch.ones(4, 256, dtype=torch.int32), "weight must be a 2-D floating point tensor"),
        ([[1.0, 2.0]], "weight must be a 2-D floating point tensor"),
        (torch.zeros(0, 256), "weight must not be empty"),
        (torch.tensor([[1.0, float("nan")]]), "weight must have finite values"),
        (torch.tensor([[1.0, float("inf")]]), "weight must have finite values"),
    ],
)
def test_weight_errors(weight, text):
    with raises(text):
        quantize(weight, group_bits=uniform(2, 1) if isinstance(weight, list) else uniform(2, 4))
    with raises(text):
        Q.block_scores(weight, group_size=64)


@pytest.mark.parametrize(
    "kwargs, text",
    [
        (dict(clip="max"), "clip must be one of 'minmax', 'mse', got 'max'"),
        (dict(clip=None), "clip must be one of"),
        (dict(scale_dtype=torch.float32), "scale_dtype must be torch.float16 or torch.bfloat16"),
        (dict(group_bits=uniform(2, 3)), re.escape("group_bits must be an integer tensor of shape (G,) = (4,)")),
        (dict(group_bits=torch.full((4,), 2.0)), "group_bits must be an integer tensor"),
        (dict(group_bits=torch.tensor([2, 4, 3, 8])), re.escape("group_bits values must be 2 or 4, got [3, 8]")),
        (dict(weight_range=70000.0 * 3), "exceeds what a torch.float16 scale can hold"),
    ],
)
def test_quantize_argument_errors(kwargs, text):
    w = gaussian(4, 256)
    if "weight_range" in kwargs:
        w[0, 0] = kwargs.pop("weight_range")
    with raises(text):
        quantize(w, **kwargs)


@pytest.mark.parametrize(
    "kwargs, text",
    [
        (dict(select="hessian"), "select='hessian' needs hessian"),
        (dict(select="hessian", hessian=torch.ones(255)), r"needs hessian: .*a torch.float32 tensor of shape \(255,\)"),
        (dict(select="hessian", hessian=torch.ones(256, 255)), "needs hessian"),
        (dict(select="hessian", hessian=torch.ones(8, 256, dtype=torch.int64)), "needs hessian"),
        (dict(select="hessian", hessian=torch.full((256,), float("nan"))), "hessian must have finite values"),
        (dict(select="range", hessian=torch.ones(256)), "hessian is only used with select='hessian'"),
        (dict(select="grad"), "select must be one of 'range', 'hessian', 'random', got 'grad'"),
    ],
)
def test_block_scores_errors(kwargs, text):
    with raises(text):
        Q.block_scores(gaussian(4, 256), group_size=64, **kwargs)


@pytest.mark.parametrize("frac", [-0.1, 1.5, float("nan"), "half", None, True])
def test_frac_4bit_errors(frac):
    with raises(re.escape(f"frac_4bit must be a number in [0, 1], got {frac!r}")):
        Q.choose_4bit_blocks(torch.ones(8), frac)


def test_scores_errors():
    with raises("scores must be a 1-D floating point tensor"):
        Q.choose_4bit_blocks(torch.ones(2, 4), 0.5)
    with raises("scores must have finite values"):
        Q.choose_4bit_blocks(torch.tensor([1.0, float("nan")]), 0.5)


def test_dequantize_errors():
    codes, scales, zeros = quantize()
    with pytest.raises(ValueError, match=re.escape("fastloss.quant.dequantize: K must be an int in (192, 256]")):
        Q.dequantize_groups(codes, scales, zeros, group_size=64, K=192)
    with pytest.raises(ValueError, match="fastloss.quant.dequantize: with group_size=128"):
        Q.dequantize_groups(codes, scales, zeros, group_size=128, K=256)
    with pytest.raises(ValueError, match="fastloss.quant.dequantize: group_size must be a power of two"):
        Q.dequantize_groups(codes, scales, zeros, group_size=100, K=256)
