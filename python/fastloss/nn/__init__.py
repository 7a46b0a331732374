"""Module wrappers of the functional API, mirroring ``torch.nn``: every family's
``fastloss/nn/<family>.py`` exports its modules through its ``__all__``."""

from .._families import import_all as _import_all

__all__: list[str] = []
for _module in _import_all("nn"):
    for _name in _module.__all__:
        globals()[_name] = getattr(_module, _name)
        __all__.append(_name)
