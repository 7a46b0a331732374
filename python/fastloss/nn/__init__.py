"""Module wrappers of the functional API, mirroring ``torch.nn``: every family's
``fastloss/nn/<family>.py`` exports its modules through its ``__all__``."""

# Star imports of each family's __all__, so that type checkers and IDEs see fastloss.nn.InfoNCELoss;
# new modules in an existing family need no line here.
from .attention import *  # noqa: F401,F403
from .metric import *  # noqa: F401,F403
from .ot import *  # noqa: F401,F403
from .quant import *  # noqa: F401,F403
from .spherical import *  # noqa: F401,F403
from . import attention, metric, ot, quant, spherical
from .._families import import_all as _import_all

__all__: list[str] = []
__all__ += attention.__all__
__all__ += metric.__all__
__all__ += ot.__all__
__all__ += quant.__all__
__all__ += spherical.__all__

# A family added to _families but not yet listed above still gets its modules here at run time;
# tests/test_typing.py checks that the static lines cover every family.
for _module in _import_all("nn"):
    for _name in _module.__all__:
        if _name not in __all__:
            globals()[_name] = getattr(_module, _name)
            __all__.append(_name)
