"""fastloss: hand-written C++/CUDA kernels for losses, behind PyTorch custom ops.

``import fastloss`` registers every op under ``torch.ops.fastloss``; the functional API is
``fastloss.<fn>`` (each family's ``__all__``) and the modules are ``fastloss.nn.<Module>``.
"""

from __future__ import annotations

import torch  # noqa: F401  (the ops register into torch.library)

from . import _families
from ._library import (BUILD_INFO, HAS_CUDA_KERNELS, SIMULATED_CUDA, check_device_errors, poison_outputs,
                       set_target_checks, simulated_cuda)

__version__: str = BUILD_INFO["version"]


def build_info() -> dict:
    """How this copy was built: version, whether CUDA kernels are in (``cuda_simulated``: on the simulated
    device of a ``FASTLOSS_CUDA=SIMULATE`` build), for which architectures, compiler."""
    return dict(BUILD_INFO)


# The families, imported by name so that type checkers and IDEs see them (fastloss.metric.info_nce):
# a loop over _families alone is invisible to static analysis. Every name in _families.FAMILIES is here.
from . import attention, metric, ot, quant, spherical  # noqa: E402
from .attention import *  # noqa: E402,F401,F403  (softplus_attention)
from .spherical import *  # noqa: E402,F401,F403  (zloss, spherical_softmax_loss, taylor_softmax_loss)

# The family namespaces stay out of __all__: `from fastloss import *` must not rebind a user's `ot` (POT).
__all__ = ["nn", "build_info", "set_target_checks", "check_device_errors", "poison_outputs", "simulated_cuda",
           "HAS_CUDA_KERNELS", "SIMULATED_CUDA"]
__all__ += spherical.__all__
__all__ += attention.__all__

# Every family's functional API becomes fastloss.<fn>: the loop is what a family added to _families relies on
# at run time; tests/test_typing.py checks that the static imports above cover every exported name.
for _family in _families.import_all(""):
    # A family may keep its names in its own namespace (fastloss.quant.matmul) with __fastloss_exports__.
    for _name in getattr(_family, "__fastloss_exports__", _family.__all__):
        if _name not in __all__:
            globals()[_name] = getattr(_family, _name)
            __all__.append(_name)

from . import nn  # noqa: E402  (after the ops exist)
