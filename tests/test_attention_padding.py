"""softplus_attention with a key-padding mask (issue 18, SDPA users): each padded batch row must give
what its unpadded sequence gives alone (forward and backward), against the kernels run per sequence and a
float64 reference written from the formulas; CPU and the GPU target (the simulator under ``-m gpu``)."""

import pytest
import torch

import fastloss
from fastloss.reference.attention import softplus_attention as reference
from conftest import cpu_reference, is_gpu

# (lengths of the valid runs, where they start): right padding, left padding, full and empty rows.
SEQ = 9
RUNS = {"right": [(9, 0), (5, 0), (1, 0)], "left": [(9, 0), (4, 5), (2, 7)], "mixed": [(6, 0), (3, 6), (0, 0)]}


def _inputs(device, dtype, batch=3, seq_q=SEQ, seq_k=SEQ, hq=4, hkv=2, dim=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, hq, seq_q, dim, generator=g, dtype=torch.float64)
    k = torch.randn(batch, hkv, seq_k, dim, generator=g, dtype=torch.float64)
    v = torch.randn(batch, hkv, seq_k, dim, generator=g, dtype=torch.float64)
    return [t.to(device=device, dtype=dtype).requires_grad_() for t in (q, k, v)]


def _mask(runs, seq, device):
    mask = torch.zeros(len(runs), seq, dtype=torch.bool)
    for b, (length, start) in enumerate(runs):
        mask[b, start : start + length] = True
    return mask.to(device)


OPTIONS = [dict(causal=True), dict(causal=False), dict(causal=True, reweight=3.0, window=4), dict(causal=False, scale=None)]


def _tolerance(dtype):
    return dict(rtol=1e-9, atol=1e-10) if dtype == torch.float64 else dict(rtol=2e-2, atol=2e-2)


def _close_to_reference(got, want, dtype, what):
    """float64: elementwise. float16 kernels: the relative Frobenius error (LSSAR's relu threshold makes a
    few gradient entries of a 16-bit run move by more than the rounding of their inputs)."""
    got, want = got.detach().double().cpu(), want.detach()
    if dtype == torch.float64:
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)
    else:
        # (plus a floor for gradients that are exactly 0 in float64, e.g. dq of a one-key sequence)
        error, size = float((got - want).norm()), float(want.norm())
        assert error < 2e-2 * size + 1e-3 * got.numel() ** 0.5, f"{what}: error {error:.3g} (norm {size:.3g}) against the float64 reference"


@pytest.mark.parametrize("padding", sorted(RUNS))
@pytest.mark.parametrize("options", OPTIONS, ids=["causal", "full", "lssar-window", "full-fixed-scale"])
def test_padded_rows_equal_each_sequence_alone(padding, options, device):
    gpu = is_gpu(device)
    dtype = torch.float16 if gpu else torch.float64
    q, k, v = _inputs(device, dtype)
    mask = _mask(RUNS[padding], SEQ, device)
    out = fastloss.softplus_attention(q, k, v, key_padding_mask=mask, **options)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64).to(device, dtype)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), grad_out)
    tol = _tolerance(dtype)
    for b, (length, start) in enumerate(RUNS[padding]):
        rows = slice(start, start + length)
        pad = ~mask[b].cpu()
        assert torch.all(out[b][:, pad.to(out.device)] == 0), "padded query rows must output zeros"
        for grad in (dq, dk, dv):
            assert torch.all(grad[b][:, pad.to(grad.device)] == 0), "padding must receive no gradient"
        if length == 0:
            continue
        alone = [t[b : b + 1, :, rows].detach().clone().requires_grad_() for t in (q, k, v)]
        out_alone = fastloss.softplus_attention(*alone, **options)
        grads_alone = torch.autograd.grad(out_alone, alone, grad_out[b : b + 1, :, rows])
        torch.testing.assert_close(out[b : b + 1, :, rows], out_alone, **tol)
        for got, want in zip((dq, dk, dv), grads_alone):
            torch.testing.assert_close(got[b : b + 1, :, rows], want, **tol)
        # and the float64 formula on the unpadded sequence
        ref_in = [t.detach().double().cpu().requires_grad_() for t in alone]
        out_ref = reference(*ref_in, **options)
        grads_ref = torch.autograd.grad(out_ref, ref_in, grad_out[b : b + 1, :, rows].double().cpu())
        _close_to_reference(out[b : b + 1, :, rows], out_ref, dtype, "out")
        for name, got, want in zip(("dq", "dk", "dv"), (dq, dk, dv), grads_ref):
            _close_to_reference(got[b : b + 1, :, rows], want, dtype, name)


@pytest.mark.parametrize("cache", ["left", "right-then-new", "holes"])
@pytest.mark.parametrize("options", OPTIONS[:3], ids=["causal", "full", "lssar-window"])
def test_decode_against_a_padded_cache_equals_each_sequence_alone(cache, options, device):
    gpu = is_gpu(device)
    dtype = torch.float16 if gpu else torch.float64
    seq_k = 11
    q, k, v = _inputs(device, dtype, seq_q=1, seq_k=seq_k, seed=2)
    valid = torch.zeros(3, seq_k, dtype=torch.bool)
    if cache == "left":
        valid[0, :] = True
        valid[1, 4:] = True
        valid[2, 9:] = True
    elif cache == "right-then-new":  # a right-padded cache with the new token's key appended at the end
        valid[0, :] = True
        valid[1, :6] = True
        valid[2, :2] = True
        valid[:, -1] = True
    else:
        valid[:, ::2] = True
        valid[:, -1] = True
    mask = valid.to(device)
    out = fastloss.softplus_attention(q, k, v, attn_mask=mask[:, None, None, :], **options)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(6), dtype=torch.float64).to(device, dtype)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), grad_out)
    tol = _tolerance(dtype)
    for b in range(3):
        keys = valid[b].nonzero().squeeze(1).to(k.device)
        alone = [q[b : b + 1].detach().clone()] + [t[b : b + 1].detach().index_select(2, keys) for t in (k, v)]
        alone = [t.requires_grad_() for t in alone]
        out_alone = fastloss.softplus_attention(*alone, **options)
        grads_alone = torch.autograd.grad(out_alone, alone, grad_out[b : b + 1])
        torch.testing.assert_close(out[b : b + 1], out_alone, **tol)
        torch.testing.assert_close(dq[b : b + 1], grads_alone[0], **tol)
        for got, want in zip((dk, dv), grads_alone[1:]):
            torch.testing.assert_close(got[b : b + 1].index_select(2, keys), want, **tol)
            assert torch.all(got[b][:, ~valid[b].to(got.device)] == 0)
        ref_in = [t.detach().double().cpu().requires_grad_() for t in alone]
        _close_to_reference(out[b : b + 1], reference(*ref_in, **options), dtype, "out")


def test_bad_masks_are_refused_with_clear_errors():
    q, k, v = _inputs("cpu", torch.float32)
    with pytest.raises(TypeError, match=r"softplus_attention: argument 'key_padding_mask' must be a bool tensor"):
        fastloss.softplus_attention(q, k, v, key_padding_mask=torch.ones(3, SEQ))
    with pytest.raises(ValueError, match=r"argument 'attn_mask' must be a key-padding mask.*cu_seqlens.*window"):
        fastloss.softplus_attention(q, k, v, attn_mask=torch.ones(3, 1, SEQ, SEQ, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"argument 'key_padding_mask' must have shape \(batch, seq_k\)"):
        fastloss.softplus_attention(q, k, v, key_padding_mask=torch.ones(2, SEQ, dtype=torch.bool))
    holes = torch.ones(3, SEQ, dtype=torch.bool)
    holes[1, 3] = False
    with pytest.raises(ValueError, match=r"row 1 has valid keys that are not one contiguous run"):
        fastloss.softplus_attention(q, k, v, key_padding_mask=holes)
    with pytest.raises(ValueError, match=r"'key_padding_mask' or 'attn_mask', not both"):
        fastloss.softplus_attention(q, k, v, key_padding_mask=holes, attn_mask=holes)


def test_module_takes_the_mask_and_refuses_a_cache_of_another_batch():
    torch.manual_seed(0)
    layer = fastloss.nn.SoftplusAttention(64, 2, num_kv_heads=1)
    x = torch.randn(3, SEQ, 64)
    mask = _mask(RUNS["right"], SEQ, "cpu")
    out = layer(x, key_padding_mask=mask)
    alone = layer(x[1:2, :5])
    torch.testing.assert_close(out[1:2, :5], alone, rtol=1e-5, atol=1e-6)
    _, cache = layer(x, use_cache=True)
    with pytest.raises(ValueError, match=r"SoftplusAttention: 'past_key_value' holds a batch of 3 but 'x' has 2"):
        layer(x[:2, :1], past_key_value=cache)


@pytest.mark.gpu
@pytest.mark.parametrize("seq_q", [SEQ, pytest.param(1, marks=pytest.mark.sim_no_launch)], ids=["packed", "decode"])
def test_padding_mask_reads_nothing_back_on_the_gpu(gpu, seq_q):
    from test_sync_free import host_syncs

    q, k, v = _inputs(gpu.device, torch.float16, seq_q=seq_q)
    mask = _mask(RUNS["left"], SEQ, gpu.device)

    def step():
        fastloss.softplus_attention(q, k, v, key_padding_mask=mask).float().sum().backward()

    count, reads = host_syncs(step)
    assert count == 0, reads


@pytest.mark.gpu
def test_a_mask_that_is_not_one_run_is_a_deferred_device_error(gpu):
    q, k, v = (t.detach() for t in _inputs(gpu.device, torch.float16))
    holes = torch.ones(3, SEQ, dtype=torch.bool)
    holes[2, 4] = False
    with gpu.kernels():
        fastloss.check_device_errors()
        fastloss.softplus_attention(q, k, v, key_padding_mask=gpu(holes))
        with pytest.raises(ValueError, match=r"softplus_attention \(an earlier call, found on the device\): argument "
                           r"'key_padding_mask' row 2 has valid keys that are not one contiguous run"):
            fastloss.check_device_errors()
        fastloss.softplus_attention(q, k, v, key_padding_mask=gpu(_mask(RUNS["right"], SEQ, "cpu")))
        fastloss.check_device_errors()
