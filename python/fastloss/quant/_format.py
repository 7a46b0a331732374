"""``QuantizedWeight``: a mixed 2/4-bit weight in the packed format of ``csrc/quant/packed_layout.h``
(format version 1, documented in ``docs/quant_format.md``)."""

from __future__ import annotations

import torch

from .. import _C
from .. import _library as L
from . import _ops, _quantizer

FORMAT_VERSION: int = int(_C.quant_format_version)
SCALE_TYPES = (torch.float16, torch.bfloat16)
_ARRAYS = ("main", "side", "side_index", "scales", "zeros")


class QuantizedWeight:
    """A (out_features, in_features) weight quantized to 2 bits, with some K-blocks in 4 bits.

    Arrays (all contiguous, on one device):

    - ``main`` int32 words: the low 2-bit plane of every code, in 8 x 64 word tiles;
    - ``side`` int32 words: the high 2-bit plane of the codes of the 4-bit K-blocks only;
    - ``side_index`` int32 (G,): rank of each K-block among the 4-bit ones, -1 for 2-bit;
    - ``scales`` float16/bfloat16 (G, N_pad) and ``zeros`` uint8 (G, N_pad), group-major.

    A weight is ``w[n, k] = (q[n, k] - z[n, g]) * s[n, g]`` with ``g = k // group_size``. N is
    padded to a multiple of 64 and K to a multiple of ``group_size``; the padding is zero codes.
    """

    def __init__(self, *, main, side, side_index, scales, zeros, shape, group_size):
        self.main, self.side, self.side_index, self.scales, self.zeros = main, side, side_index, scales, zeros
        self.shape = (int(shape[0]), int(shape[1]))
        self.group_size = int(group_size)
        packed = self._packed_shape()  # validates sizes and dtypes
        if L.may_validate_once(self.side_index):  # and the values the kernels index with
            _ops.check_contents("quant.QuantizedWeight", self.side_index, self.zeros, packed.side_groups)

    # ---- construction --------------------------------------------------------------------------
    @classmethod
    def from_codes(cls, codes, scales, zeros, group_bits, group_size: int) -> "QuantizedWeight":
        """Pack integer codes (N, K) (uint8, values below 2**bits of their K-block) with per-group
        ``scales`` (N, G) (float16 or bfloat16) and ``zeros`` (N, G) (integers below 2**bits) and
        ``group_bits`` (G,) (2 or 4 per K-block), G = ceil(K / group_size)."""
        fn = "fastloss.quant.QuantizedWeight.from_codes"
        if not isinstance(codes, torch.Tensor) or codes.dim() != 2 or codes.dtype not in (torch.uint8, torch.int32, torch.int64):
            raise ValueError(f"{fn}: 'codes' must be a 2-D integer tensor")
        if not isinstance(zeros, torch.Tensor) or zeros.is_floating_point() or zeros.is_complex():
            raise ValueError(f"{fn}: 'zeros' must be an integer tensor")
        rows, cols = codes.shape
        group_size = _quantizer._check_group_size(group_size, fn)
        groups = -(-cols // group_size) if group_size > 0 else 0
        group_bits = torch.as_tensor(group_bits, device=codes.device).reshape(-1)
        if group_bits.numel() != groups:
            raise ValueError(f"{fn}: 'group_bits' must have one entry per K-block ({groups}), got {group_bits.numel()}")
        if scales.shape != (rows, groups) or zeros.shape != (rows, groups):
            raise ValueError(f"{fn}: 'scales' and 'zeros' must be ({rows}, {groups}), got {tuple(scales.shape)} and {tuple(zeros.shape)}")
        if scales.dtype not in SCALE_TYPES:
            raise ValueError(f"{fn}: 'scales' must be float16 or bfloat16, got {scales.dtype}")
        if len({codes.device, scales.device, zeros.device}) != 1:
            raise ValueError(f"{fn}: 'codes', 'scales' and 'zeros' must be on one device")
        if L.may_validate_once(codes):
            if not bool(((group_bits == 2) | (group_bits == 4)).all()):
                raise ValueError(f"{fn}: 'group_bits' must be 2 or 4")
            levels = torch.where(group_bits == 4, 16, 4).to(codes.device)
            if cols and bool((codes.to(torch.int64) >= levels.repeat_interleave(group_size)[:cols]).any() | (codes < 0).any()):
                raise ValueError(f"{fn}: a code does not fit the bit width of its K-block")
            if bool((zeros.to(torch.int64) >= levels).any() | (zeros < 0).any()):
                raise ValueError(f"{fn}: a zero point does not fit the bit width of its K-block")
        four = group_bits == 4
        side_index = torch.where(four, torch.cumsum(four.to(torch.int32), 0) - 1, -1).to(torch.int32)
        side_groups = int(four.sum())
        shape = _ops.packed_shape(rows, cols, group_size, side_groups)
        shape.validate("fastloss.quant.QuantizedWeight.from_codes")
        main, side = _ops.quant_pack(codes.to(torch.uint8).contiguous(), side_index, group_size, side_groups)
        padded_scales = torch.zeros((groups, shape.rows_padded), dtype=scales.dtype, device=codes.device)
        padded_scales[:, :rows] = scales.t()
        padded_zeros = torch.zeros((groups, shape.rows_padded), dtype=torch.uint8, device=codes.device)
        padded_zeros[:, :rows] = zeros.t().to(torch.uint8)
        return cls(main=main, side=side, side_index=side_index, scales=padded_scales, zeros=padded_zeros,
                   shape=(rows, cols), group_size=group_size)  # fmt: skip

    # ---- properties ----------------------------------------------------------------------------
    @property
    def out_features(self) -> int:
        return self.shape[0]

    @property
    def in_features(self) -> int:
        return self.shape[1]

    @property
    def device(self) -> torch.device:
        return self.main.device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the scales: the activations' dtype for the CUDA kernel."""
        return self.scales.dtype

    @property
    def group_bits(self) -> torch.Tensor:
        """Bit width (2 or 4) of every K-block."""
        return torch.where(self.side_index >= 0, 4, 2).to(torch.int32)

    @property
    def nbytes(self) -> int:
        """Bytes of every array, the padding included."""
        return sum(getattr(self, name).numel() * getattr(self, name).element_size() for name in _ARRAYS)

    @property
    def bits_per_weight(self) -> float:
        """Stored bits per weight of the (N, K) matrix: codes, side planes, scales, zero points
        and the padding."""
        return 8.0 * self.nbytes / (self.shape[0] * self.shape[1])

    def _packed_shape(self):
        return _ops._check_arrays("quant.QuantizedWeight", self.main, self.side, self.side_index, self.shape[0],
                                  self.shape[1], self.group_size, self.scales, self.zeros)  # fmt: skip

    # ---- views of the contents -----------------------------------------------------------------
    def codes(self) -> torch.Tensor:
        """The integer codes (N, K) as uint8."""
        return _ops.quant_unpack(self.main, self.side, self.side_index, *self.shape, self.group_size)

    def scale_matrix(self) -> torch.Tensor:
        """Scales as (N, G)."""
        return self.scales[:, : self.shape[0]].t()

    def zero_matrix(self) -> torch.Tensor:
        """Zero points as (N, G)."""
        return self.zeros[:, : self.shape[0]].t()

    def dequantize(self, dtype: torch.dtype = torch.float16) -> torch.Tensor:
        """The dense (N, K) weight, ``round((q - z) * s)`` to ``dtype`` (bit-exact on CPU and CUDA)."""
        return _ops.quant_dequantize(self.main, self.side, self.side_index, self.scales, self.zeros, *self.shape,
                                     self.group_size, dtype)  # fmt: skip

    # ---- moves and serialization ---------------------------------------------------------------
    def to(self, device=None, dtype: torch.dtype | None = None) -> "QuantizedWeight":
        """A copy on ``device``; ``dtype`` (float16 or bfloat16) converts the scales, which the
        CUDA kernel needs in the activations' dtype."""
        if isinstance(device, torch.dtype):
            device, dtype = None, device
        if dtype is not None and dtype not in SCALE_TYPES:
            raise ValueError(f"fastloss.quant.QuantizedWeight.to: the scales can be float16 or bfloat16, not {dtype}")
        arrays = {name: getattr(self, name).to(device) if device is not None else getattr(self, name) for name in _ARRAYS}
        if dtype is not None:
            arrays["scales"] = arrays["scales"].to(dtype)
        return QuantizedWeight(**arrays, shape=self.shape, group_size=self.group_size)

    def cuda(self, device=None) -> "QuantizedWeight":
        return self.to(torch.device("cuda") if device is None else torch.device("cuda", device) if isinstance(device, int) else device)

    def cpu(self) -> "QuantizedWeight":
        return self.to(torch.device("cpu"))

    def state_dict(self) -> dict:
        """Tensors only (``torch.save`` friendly): the arrays and a ``meta`` int64 vector
        (format version, N, K, group size)."""
        meta = torch.tensor([FORMAT_VERSION, self.shape[0], self.shape[1], self.group_size], dtype=torch.int64)
        return {"meta": meta, **{name: getattr(self, name) for name in _ARRAYS}}

    @classmethod
    def from_state_dict(cls, state: dict) -> "QuantizedWeight":
        version, rows, cols, group_size = (int(v) for v in state["meta"].tolist())
        if version != FORMAT_VERSION:
            raise ValueError(f"fastloss.quant.QuantizedWeight.from_state_dict: format version {version}, this build reads {FORMAT_VERSION}")
        return cls(**{name: state[name] for name in _ARRAYS}, shape=(rows, cols), group_size=group_size)

    def __repr__(self) -> str:
        four = int((self.side_index >= 0).sum())
        return (f"QuantizedWeight({self.shape[0]}x{self.shape[1]}, group_size={self.group_size}, 4-bit K-blocks "
                f"{four}/{self.side_index.numel()}, {self.bits_per_weight:.3f} bits/weight, scales {self.dtype}, "
                f"{self.device})")  # fmt: skip
