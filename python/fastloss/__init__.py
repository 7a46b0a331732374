"""fastloss: hand-written C++/CUDA kernels for losses, behind PyTorch custom ops.

``import fastloss`` registers every op under ``torch.ops.fastloss``; the functional API is
``fastloss.<fn>`` and the modules are ``fastloss.nn.<Module>``.
"""

from __future__ import annotations

import torch  # noqa: F401  (the ops register into torch.library)

from . import _families
from ._library import BUILD_INFO, HAS_CUDA_KERNELS, poison_outputs, set_target_checks
from .spherical import spherical_softmax_loss, taylor_softmax_loss, zloss

__version__: str = BUILD_INFO["version"]

_families.import_all("")
from . import nn  # noqa: E402  (after the ops exist)


def build_info() -> dict:
    """How this copy was built: version, whether CUDA kernels are in, for which architectures, compiler."""
    return dict(BUILD_INFO)


__all__ = [
    "zloss",
    "spherical_softmax_loss",
    "taylor_softmax_loss",
    "nn",
    "build_info",
    "set_target_checks",
    "poison_outputs",
    "HAS_CUDA_KERNELS",
]
