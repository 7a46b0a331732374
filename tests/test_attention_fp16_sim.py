"""fp16 range of the softplus-attention CUDA kernels' tensor-core weights (csrc/attention/attention_cuda.cu,
docs/attention.md "fp16 range"): weights and score gradients are computed in fp32 and rounded to the input
type for the P V, G K and G^T Q products. In fp16 they are stored times a per-row (per-key for dK) power of
two, so that none overflows 65504 and a row whose weights are all tiny does not flush to zero. Runs on a real
GPU or on the simulated device (FASTLOSS_CUDA=SIMULATE); bfloat16 runs the same cases on its unscaled path."""

import pytest
import torch

from test_attention import check_against_reference, make

DTYPES = (torch.float16, torch.bfloat16)


def test_lssar_dq_does_not_overflow_fp16(gpu):
    # Rows with a small xmax (near-uniform weights) have score gradients times Z of about 9e4: stored
    # without the row's 1/Z they overflowed fp16, and dQ row 117 (among others) became NaN.
    for dtype in DTYPES:
        q, k, v = make((2, 2, 130, 64), (2, 2, 130, 64), dtype, gpu.device)
        with gpu.kernels():
            check_against_reference(q, k, v, causal=True, reweight=15)


@pytest.mark.parametrize("reweight", [None, 3])
def test_tiny_softplus_weights_do_not_flush_to_zero(gpu, reweight):
    # A fixed scale 2.5 and unnormalized q, k: row 1 sees two keys with c s about -25, so both weights
    # are about 1e-11, below fp16's smallest subnormal; the row's output was 0 instead of a mean of v.
    for dtype in DTYPES:
        q, k, v = make((2, 2, 45, 32), (2, 1, 45, 32), dtype, gpu.device)
        with gpu.kernels():
            out = check_against_reference(q, k, v, scale=2.5, normalize_qk=False, reweight=reweight)
        assert bool(out[:, :, 1].detach().abs().amax(-1).gt(0).all()), "row 1 flushed to 0"


def spread_inputs(dtype, device, n=200, d=32, seed=0):
    """q_i ~ a_i e and k_j ~ b_j e with a_i in [0.2, 1.5] growing with i and b_j in [-20, 20] growing with
    j: scores from about -30 to 30, so the softplus weights (and the score gradients) of a row grow by
    dozens of binades from its first key tile to its last, and a key's gradients grow from row tile to
    row tile. The fp16 scales must grow with them (RunningScale's rescales) without losing the sums."""
    g = torch.Generator().manual_seed(seed)
    e = torch.zeros(d, dtype=torch.float64)
    e[0] = 1.0
    a = torch.linspace(0.2, 1.5, n, dtype=torch.float64)
    b = torch.linspace(-20.0, 20.0, n, dtype=torch.float64)
    q = a[:, None] * e + 0.1 * torch.randn(1, 2, n, d, generator=g, dtype=torch.float64)
    k = b[:, None] * e + 0.1 * torch.randn(1, 2, n, d, generator=g, dtype=torch.float64)
    v = torch.randn(1, 2, n, d, generator=g, dtype=torch.float64)
    return [t.to(device=device, dtype=dtype).requires_grad_() for t in (q, k, v)]


@pytest.mark.parametrize("reweight", [None, 15])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_weights_spanning_many_binades(gpu, reweight, causal):
    for dtype in DTYPES:
        q, k, v = spread_inputs(dtype, gpu.device)
        with gpu.kernels():
            check_against_reference(q, k, v, causal=causal, scale=1.0, normalize_qk=False, reweight=reweight)


def test_rows_whose_every_weight_is_far_below_fp16(gpu):
    # Every score about -60 (weights about 1e-26, relative differences of e^(+-10) between keys): LSSA's
    # output is still the weighted mean of v and the gradients follow, as in float64.
    for dtype in DTYPES:
        g = torch.Generator().manual_seed(3)
        e = torch.zeros(32, dtype=torch.float64)
        e[0] = 1.0
        q = 3.0 * e + 0.5 * torch.randn(1, 2, 70, 32, generator=g, dtype=torch.float64)
        k = -20.0 * e + 0.5 * torch.randn(1, 2, 70, 32, generator=g, dtype=torch.float64)
        v = torch.randn(1, 2, 70, 32, generator=g, dtype=torch.float64)
        q, k, v = (t.to(device=gpu.device, dtype=dtype).requires_grad_() for t in (q, k, v))
        with gpu.kernels():
            check_against_reference(q, k, v, causal=False, scale=1.0, normalize_qk=False)
