"""Modules of the 2-bit weight family (see :mod:`fastloss.quant`)."""

from ..quant import QuantLinear

__all__ = ["QuantLinear"]
