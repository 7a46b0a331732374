"""Ops of the mixed 2/4-bit weight format (``csrc/quant/``), one per kernel:

``quant_pack``        codes (N, K) uint8 -> the main and side word arrays.
``quant_unpack``      the inverse (for checks and for re-quantization).
``quant_dequantize``  the dense (N, K) weight, bit-exact between CPU and CUDA.
``quant_matmul``      y = x W^T + bias for a 2-D x, differentiable in x and bias.

The word arrays are int32 tensors holding the uint32 words of ``csrc/quant/packed_layout.h``.
The ops check their own contract; ``fastloss.quant`` and ``QuantizedWeight`` check the public
arguments. The kernels' choice by shape is in one place: ``_matmul_cuda`` below (above
``DENSE_ROWS`` rows of x, dequantize once and let cuBLAS run at full tensor-core rate) and
``plan_launch`` in ``csrc/quant/matmul_cuda.cu`` (tile height and the stream-K CTA count).
"""

from __future__ import annotations

import weakref

import torch

from .. import _C
from .. import _library as L

HALF_TYPES = (torch.float16, torch.bfloat16)
CPU_TYPES = (torch.float32, torch.float16, torch.bfloat16)

# From this many rows of x on, CUDA dequantizes into a dense weight and calls cuBLAS: the
# weight's bytes no longer dominate, and cuBLAS's tensor-core GEMM beats mma.sync with
# in-register dequantization (bench/results: the quant M sweep on the H100).
DENSE_ROWS = 128


def packed_shape(rows: int, cols: int, group_size: int, side_groups: int):
    return _C.QuantPackedShape(rows, cols, group_size, side_groups)


def side_groups_of(shape_rows: int, cols: int, group_size: int, side: torch.Tensor) -> int:
    """The number of 4-bit K-blocks, from the size of the side array."""
    base = packed_shape(shape_rows, cols, group_size, 1)
    per_group = base.side_words
    return side.numel() // per_group if per_group else 0


def _packed_weight(shape, main, side, side_index, scales, zeros):
    return _C.QuantPackedWeight(
        shape, main.data_ptr(), side.data_ptr(), side_index.data_ptr(), scales.data_ptr(), L.DTYPE_CODES[scales.dtype],
        zeros.data_ptr(),
    )  # fmt: skip


def _check_arrays(fn, main, side, side_index, rows, cols, group_size, scales=None, zeros=None):
    """The op contract on the packed arrays; returns the packed shape."""
    groups_4bit = side_groups_of(rows, cols, group_size, side)
    shape = packed_shape(rows, cols, group_size, groups_4bit)
    shape.validate(f"fastloss.{fn}")
    expect = [
        ("main", main, torch.int32, (shape.main_words,)),
        ("side", side, torch.int32, (shape.side_words,)),
        ("side_index", side_index, torch.int32, (shape.groups,)),
    ]
    if scales is not None:
        expect.append(("zeros", zeros, torch.uint8, (shape.groups, shape.rows_padded)))
        if scales.dtype not in HALF_TYPES or tuple(scales.shape) != (shape.groups, shape.rows_padded):
            raise ValueError(f"fastloss.{fn}: 'scales' must be float16 or bfloat16 of shape {(shape.groups, shape.rows_padded)}")
    for name, t, dtype, size in expect:
        if t.dtype != dtype or tuple(t.shape) != size or not t.is_contiguous():
            raise ValueError(f"fastloss.{fn}: '{name}' must be a contiguous {dtype} tensor of shape {size}, got "
                             f"{t.dtype} {tuple(t.shape)}")  # fmt: skip
    tensors = [main, side, side_index] + ([scales, zeros] if scales is not None else [])
    if len({t.device for t in tensors}) != 1:
        raise ValueError(f"fastloss.{fn}: all packed arrays must be on one device")
    if L.is_cuda(main) and any(t.numel() and t.data_ptr() % 16 for t in tensors):
        raise ValueError(f"fastloss.{fn}: the packed arrays must be 16-byte aligned on CUDA (the kernel copies "
                         f"16-byte chunks); use contiguous copies, not views at an offset")  # fmt: skip
    return shape


def check_contents(fn: str, side_index: torch.Tensor, zeros: torch.Tensor | None, side_groups: int) -> None:
    """The values the kernels index with: side_index must rank the 4-bit K-blocks 0, 1, ... in
    order (-1 elsewhere) and zero points must fit their K-block's bit width. Reads the arrays
    on the host (callers skip it where that is not allowed: _library.may_inspect_values)."""
    four = side_index >= 0
    expected = torch.where(four, torch.cumsum(four.to(torch.int32), 0) - 1, -1).to(torch.int32)
    if not torch.equal(side_index, expected) or int(four.sum()) != side_groups:
        raise ValueError(f"fastloss.{fn}: 'side_index' must number the {side_groups} 4-bit K-blocks 0, 1, ... in "
                         f"order and be -1 for 2-bit K-blocks")  # fmt: skip
    if zeros is not None and zeros.numel():
        levels = torch.where(four, 16, 4).to(zeros.device)
        if bool((zeros.to(torch.int32) >= levels[:, None]).any()):
            raise ValueError(f"fastloss.{fn}: a zero point does not fit the bit width of its K-block")


# ---- pack / unpack ------------------------------------------------------------------------------
def _pack(device: str):
    def impl(codes, side_index, group_size, side_groups):
        if codes.dtype != torch.uint8 or codes.dim() != 2 or codes.stride(1) != 1:
            raise ValueError("fastloss.quant_pack: 'codes' must be a 2-D uint8 tensor with unit column stride")
        rows, cols = codes.shape
        shape = packed_shape(rows, cols, group_size, side_groups)
        shape.validate("fastloss.quant_pack")
        if side_index.dtype != torch.int32 or tuple(side_index.shape) != (shape.groups,) or side_index.device != codes.device:
            raise ValueError(f"fastloss.quant_pack: 'side_index' must be int32 of shape ({shape.groups},) on {codes.device}")
        side_index = side_index.contiguous()
        main = L.empty((shape.main_words,), torch.int32, codes.device)
        side = L.empty((shape.side_words,), torch.int32, codes.device)
        L.launch("quant_pack", device, codes, shape, side_index.data_ptr(), codes.data_ptr(), codes.stride(0),
                 main.data_ptr(), side.data_ptr())  # fmt: skip
        return main, side

    return impl


def _pack_fake(codes, side_index, group_size, side_groups):
    shape = packed_shape(codes.shape[0], codes.shape[1], group_size, side_groups)
    return (codes.new_empty(shape.main_words, dtype=torch.int32), codes.new_empty(shape.side_words, dtype=torch.int32))


quant_pack = L.define_op(
    "quant_pack",
    "(Tensor codes, Tensor side_index, int group_size, int side_groups) -> (Tensor, Tensor)",
    cpu=_pack("cpu"), cuda=_pack("cuda"), fake=_pack_fake,
)  # fmt: skip


def _unpack(device: str):
    def impl(main, side, side_index, rows, cols, group_size):
        shape = _check_arrays("quant_unpack", main, side, side_index, rows, cols, group_size)
        codes = L.empty((rows, cols), torch.uint8, main.device)
        L.launch("quant_unpack", device, main, shape, side_index.data_ptr(), main.data_ptr(), side.data_ptr(),
                 codes.data_ptr())  # fmt: skip
        return codes

    return impl


quant_unpack = L.define_op(
    "quant_unpack",
    "(Tensor main, Tensor side, Tensor side_index, int rows, int cols, int group_size) -> Tensor",
    cpu=_unpack("cpu"), cuda=_unpack("cuda"),
    fake=lambda main, side, side_index, rows, cols, group_size: main.new_empty((rows, cols), dtype=torch.uint8),
)  # fmt: skip


# ---- dequantize ---------------------------------------------------------------------------------
def _dequantize(device: str):
    def impl(main, side, side_index, scales, zeros, rows, cols, group_size, dtype):
        shape = _check_arrays("quant_dequantize", main, side, side_index, rows, cols, group_size, scales, zeros)
        if dtype not in L.DTYPE_CODES:
            raise ValueError(f"fastloss.quant_dequantize: 'dtype' must be a floating type, got {dtype}")
        out = L.empty((rows, cols), dtype, main.device)
        weight = _packed_weight(shape, main, side, side_index, scales, zeros)
        L.launch("quant_dequantize", device, main, weight, L.DTYPE_CODES[dtype], out.data_ptr())
        return out

    return impl


quant_dequantize = L.define_op(
    "quant_dequantize",
    "(Tensor main, Tensor side, Tensor side_index, Tensor scales, Tensor zeros, int rows, int cols, int group_size, "
    "ScalarType dtype) -> Tensor",
    cpu=_dequantize("cpu"), cuda=_dequantize("cuda"),
    fake=lambda main, side, side_index, scales, zeros, rows, cols, group_size, dtype: main.new_empty((rows, cols), dtype=dtype),
)  # fmt: skip


# ---- matmul -------------------------------------------------------------------------------------
def _check_matmul(x, bias, shape, scales, device: str):
    fn = "fastloss.quant_matmul"
    if x.dim() != 2 or x.shape[1] != shape.cols:
        raise ValueError(f"{fn}: 'x' must be 2-D with {shape.cols} columns, got {tuple(x.shape)}")
    allowed = CPU_TYPES if device == "cpu" else (scales.dtype,)
    if x.dtype not in allowed:
        raise ValueError(f"{fn}: 'x' must be one of {allowed} on {x.device}, got {x.dtype}")
    if x.device != scales.device:
        raise ValueError(f"{fn}: 'x' is on {x.device} but the weight is on {scales.device}")
    if bias is not None and (bias.shape != (shape.rows,) or bias.dtype != x.dtype or bias.device != x.device):
        raise ValueError(f"{fn}: 'bias' must be a {x.dtype} vector of {shape.rows} on {x.device}")


def _kernel_x(x: torch.Tensor, device: str) -> torch.Tensor:
    """x as the kernel reads it: unit column stride; on CUDA also 16-byte aligned rows (a
    zero-padded copy otherwise)."""
    if device == "cpu":
        return x if x.stride(1) == 1 and x.stride(0) >= x.shape[1] else x.contiguous()
    row_ok = x.stride(1) == 1 and x.stride(0) % 8 == 0 and x.stride(0) >= x.shape[1]
    if row_ok and x.data_ptr() % 16 == 0:
        return x
    padded = torch.zeros((x.shape[0], (x.shape[1] + 7) // 8 * 8), dtype=x.dtype, device=x.device)
    padded[:, : x.shape[1]] = x
    return padded


class PreparedWeight:
    """The checked packed arrays of one weight and the kernel's view of them (``_C.QuantPackedWeight``),
    built once and reused while the same array objects are passed (the checks depend only on their
    dtypes, shapes, layout and device, which an in-place write leaves unchanged). Holds the arrays by
    weak reference, so a module moved to another device frees its old arrays."""

    __slots__ = ("refs", "sizes", "shape", "weight")

    def __init__(self, main, side, side_index, scales, zeros, rows: int, cols: int, group_size: int) -> None:
        self.shape = _check_arrays("quant_matmul", main, side, side_index, rows, cols, group_size, scales, zeros)
        self.refs = tuple(weakref.ref(t) for t in (main, side, side_index, scales, zeros))
        self.sizes = (rows, cols, group_size)
        self.weight = _packed_weight(self.shape, main, side, side_index, scales, zeros)

    def matches(self, main, side, side_index, scales, zeros, rows: int, cols: int, group_size: int) -> bool:
        r = self.refs
        return (r[0]() is main and r[1]() is side and r[2]() is side_index and r[3]() is scales and r[4]() is zeros
                and self.sizes == (rows, cols, group_size))  # fmt: skip


def prepared(cache_owner, main, side, side_index, scales, zeros, rows: int, cols: int, group_size: int):
    """The PreparedWeight of these arrays, cached on ``cache_owner`` (a QuantizedWeight or QuantLinear)."""
    cached = getattr(cache_owner, "_fastloss_prepared", None) if cache_owner is not None else None
    if cached is not None and cached.matches(main, side, side_index, scales, zeros, rows, cols, group_size):
        return cached
    cached = PreparedWeight(main, side, side_index, scales, zeros, rows, cols, group_size)
    if cache_owner is not None:
        cache_owner._fastloss_prepared = cached
    return cached


def run_matmul(device: str, x: torch.Tensor, arrays: tuple, w: PreparedWeight, bias: torch.Tensor | None) -> torch.Tensor:
    """y = x W^T + bias for a 2-D x on checked ``arrays`` (main, side, side_index, scales, zeros): the
    kernel part of the op, also called directly by ``fastloss.quant.matmul`` in plain eager code."""
    shape = w.shape
    scales = arrays[3]
    _check_matmul(x, bias, shape, scales, device)
    if bias is not None and not bias.is_contiguous():
        bias = bias.contiguous()
    m = x.shape[0]
    if device == "cuda" and m >= DENSE_ROWS:
        weight = quant_dequantize(*arrays, *w.sizes, x.dtype)
        return torch.nn.functional.linear(x, weight, bias)
    xk = _kernel_x(x, device)
    y = L.empty((m, shape.rows), x.dtype, x.device)
    if m == 0:
        return y
    args = (w.weight, L.DTYPE_CODES[x.dtype], xk.data_ptr(), m, xk.stride(0), bias.data_ptr() if bias is not None else 0,
            y.data_ptr(), y.stride(0))  # fmt: skip
    if device == "cuda":  # partial sums of row blocks that two CTAs share
        with L.on_device(x):
            need = _C.quant_matmul_cuda_workspace_bytes(m, shape, L.device_index(x))
        workspace = torch.empty(need, dtype=torch.uint8, device=x.device)
        args += (workspace.data_ptr(), need)
    L.launch("quant_matmul", device, x, *args)
    return y


def _matmul(device: str):
    def impl(x, main, side, side_index, scales, zeros, bias, rows, cols, group_size):
        w = PreparedWeight(main, side, side_index, scales, zeros, rows, cols, group_size)
        return run_matmul(device, x, (main, side, side_index, scales, zeros), w, bias)

    return impl


def _matmul_fake(x, main, side, side_index, scales, zeros, bias, rows, cols, group_size):
    return x.new_empty((x.shape[0], rows))


def _matmul_setup(ctx, inputs, output):
    x, main, side, side_index, scales, zeros, bias, rows, cols, group_size = inputs
    ctx.save_for_backward(main, side, side_index, scales, zeros)
    ctx.sizes = (rows, cols, group_size)
    ctx.x_dtype = x.dtype
    ctx.has_bias = bias is not None


def _matmul_backward(ctx, grad_y):
    """dL/dx = dL/dy W with W dequantized in x's dtype; dL/dbias = column sums. The packed
    weight is a constant (no gradient)."""
    main, side, side_index, scales, zeros = ctx.saved_tensors
    rows, cols, group_size = ctx.sizes
    grad_x = grad_bias = None
    if ctx.needs_input_grad[0]:
        weight = quant_dequantize(main, side, side_index, scales, zeros, rows, cols, group_size, ctx.x_dtype)
        grad_x = grad_y.to(ctx.x_dtype) @ weight
    if ctx.has_bias and ctx.needs_input_grad[6]:
        grad_bias = grad_y.sum(0)
    return grad_x, None, None, None, None, None, grad_bias, None, None, None


quant_matmul = L.define_op(
    "quant_matmul",
    "(Tensor x, Tensor main, Tensor side, Tensor side_index, Tensor scales, Tensor zeros, Tensor? bias, int rows, "
    "int cols, int group_size) -> Tensor",
    cpu=_matmul("cpu"), cuda=_matmul("cuda"), fake=_matmul_fake,
    backward=_matmul_backward, setup_context=_matmul_setup,
)  # fmt: skip
