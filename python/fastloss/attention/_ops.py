"""Ops of the softplus-attention family (``csrc/attention/``).

``softplus_attention_fwd``  out and the per-row statistics the backward needs (Z; for LSSAR also
                            max_j x_ij and sum_j u_ij^p), in the accumulator type.
``softplus_attention_bwd``  dq, dk, dv from dO, the inputs, out and the statistics.

The forward op is differentiable (``register_autograd``): its backward is the second op. q and k
arrive as the kernel sees them (already l2-normalized when the caller asked for cosine scores).
On the CPU, float16 / bfloat16 inputs are computed in float32 and rounded back.
"""

from __future__ import annotations

import torch

from .. import _C
from .. import _library as L

SCHEMA_ARGS = ("Tensor? cu_seqlens, bool causal, int window, bool length_scale, float scale, float reweight, "
               "int offset_rows")  # fmt: skip
CUDA_DTYPES = (torch.float16, torch.bfloat16)
CUDA_HEAD_DIMS = (32, 64, 96, 128)


def stats_per_row(reweight: float) -> int:
    return 3 if reweight > 0 else 1


def _problem(q, k, v, cu_seqlens, causal, window, length_scale, scale, reweight, offset_rows):
    batch, heads_q, len_q, dim = q.shape
    documents = 0 if cu_seqlens is None else cu_seqlens.numel() - 1
    return _C.AttentionProblem(L.DTYPE_CODES[q.dtype], batch, heads_q, k.shape[1], len_q, k.shape[2], dim,
                               q.data_ptr(), k.data_ptr(), v.data_ptr(),
                               0 if cu_seqlens is None else cu_seqlens.data_ptr(), documents, causal, window,
                               length_scale, scale, reweight, offset_rows)  # fmt: skip


def _kernel_inputs(device: str, *tensors: torch.Tensor) -> list[torch.Tensor]:
    """Contiguous; float32 for 16-bit inputs on the CPU; 16-byte aligned on CUDA (cp.async loads)."""
    out = []
    for t in tensors:
        if device == "cpu" and t.dtype in (torch.float16, torch.bfloat16):
            t = t.float()
        t = t.contiguous()
        if device == "cuda" and t.data_ptr() % 16:
            t = t.clone()
        out.append(t)
    return out


def _require_cuda_shape(q: torch.Tensor) -> None:
    if q.dtype not in CUDA_DTYPES:
        raise TypeError(f"fastloss.softplus_attention: the CUDA kernels take float16 or bfloat16, got {q.dtype}")
    if q.shape[-1] not in CUDA_HEAD_DIMS:
        raise ValueError(f"fastloss.softplus_attention: the CUDA kernels take head dims {CUDA_HEAD_DIMS}, "
                         f"got {q.shape[-1]}")  # fmt: skip


def _forward(q, k, v, cu_seqlens, causal, window, length_scale, scale, reweight, offset_rows, *, device):
    if device == "cuda":
        _require_cuda_shape(q)
    qc, kc, vc = _kernel_inputs(device, q, k, v)
    cu = None if cu_seqlens is None else cu_seqlens.contiguous()
    problem = _problem(qc, kc, vc, cu, causal, window, length_scale, scale, reweight, offset_rows)
    acc = L.accumulator_dtype(qc.dtype)
    out = L.empty(qc.shape, qc.dtype, qc.device)
    stats = L.empty((*qc.shape[:3], stats_per_row(reweight)), acc, qc.device)
    workspace_bytes = 0 if device == "cpu" else _C.attention_forward_cuda_workspace_bytes(problem, L.device_index(qc))
    workspace = torch.empty(workspace_bytes, dtype=torch.uint8, device=qc.device)  # decode step: the key splits
    L.launch("attention_forward", device, out, problem, out.data_ptr(), stats.data_ptr(),
             workspace.data_ptr() if workspace_bytes else 0, workspace_bytes)  # fmt: skip
    return out.to(q.dtype), stats


def _forward_fake(q, k, v, cu_seqlens, causal, window, length_scale, scale, reweight, offset_rows):
    acc = L.accumulator_dtype(q.dtype)
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(
        (*q.shape[:3], stats_per_row(reweight)), dtype=acc)


def _backward(grad_out, q, k, v, out, stats, cu_seqlens, causal, window, length_scale, scale, reweight, offset_rows,
              *, device):  # fmt: skip
    if device == "cuda":
        _require_cuda_shape(q)
    qc, kc, vc, oc, gc = _kernel_inputs(device, q, k, v, out, grad_out)
    cu = None if cu_seqlens is None else cu_seqlens.contiguous()
    problem = _problem(qc, kc, vc, cu, causal, window, length_scale, scale, reweight, offset_rows)
    grad_q = L.empty(qc.shape, qc.dtype, qc.device)
    grad_k = L.empty(kc.shape, kc.dtype, kc.device)
    grad_v = L.empty(vc.shape, vc.dtype, vc.device)
    row_terms = L.empty((*qc.shape[:3], 2), stats.dtype, qc.device)
    L.launch("attention_backward", device, grad_q, problem, oc.data_ptr(), gc.data_ptr(), stats.contiguous().data_ptr(),
             grad_q.data_ptr(), grad_k.data_ptr(), grad_v.data_ptr(), row_terms.data_ptr())  # fmt: skip
    return grad_q.to(q.dtype), grad_k.to(k.dtype), grad_v.to(v.dtype)


def _backward_fake(grad_out, q, k, v, out, stats, *rest):
    # The kernels write contiguous gradients whatever the strides of q, k, v (transposed views from
    # a projection are the usual case): the fake must say so, or a compiled graph plans other strides.
    contiguous = torch.contiguous_format
    return (torch.empty_like(q, memory_format=contiguous), torch.empty_like(k, memory_format=contiguous),
            torch.empty_like(v, memory_format=contiguous))  # fmt: skip


def _no_double_backward(ctx, *grads):
    raise RuntimeError("fastloss.softplus_attention: double backward (create_graph=True through the backward) is not "
                       "supported")  # fmt: skip


backward = L.define_op(
    "softplus_attention_bwd",
    f"(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor stats, {SCHEMA_ARGS}) "
    "-> (Tensor grad_q, Tensor grad_k, Tensor grad_v)",
    cpu=lambda *args: _backward(*args, device="cpu"),
    cuda=lambda *args: _backward(*args, device="cuda"),
    fake=_backward_fake,
    backward=_no_double_backward,
    setup_context=lambda ctx, inputs, output: None,
)


def _setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens, *options = inputs
    out, stats = output
    ctx.save_for_backward(q, k, v, out, stats, cu_seqlens)
    ctx.options = options
    ctx.mark_non_differentiable(stats)


def _autograd_backward(ctx, grad_out, grad_stats):
    q, k, v, out, stats, cu_seqlens = ctx.saved_tensors
    if grad_out is None:
        return None, None, None, None, None, None, None, None, None, None
    grad_q, grad_k, grad_v = backward(grad_out, q, k, v, out, stats, cu_seqlens, *ctx.options)
    return grad_q, grad_k, grad_v, None, None, None, None, None, None, None


forward = L.define_op(
    "softplus_attention_fwd",
    f"(Tensor q, Tensor k, Tensor v, {SCHEMA_ARGS}) -> (Tensor out, Tensor stats)",
    cpu=lambda *args: _forward(*args, device="cpu"),
    cuda=lambda *args: _forward(*args, device="cuda"),
    fake=_forward_fake,
    backward=_autograd_backward,
    setup_context=_setup_context,
)
