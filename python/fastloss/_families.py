"""The registration list: every kernel family of fastloss, by module name.

A family ``name`` provides ``fastloss/<name>.py`` (ops and functional API),
``fastloss/nn/<name>.py`` (modules), ``fastloss/reference/<name>.py`` (float64
references and self-checks) and ``fastloss/bench/<name>.py`` (benchmark cases).
Adding a family means adding its name here and nothing else outside its files.
"""

import importlib
from types import ModuleType

FAMILIES: tuple[str, ...] = ("spherical", "quant", "ot", "attention", "metric")


def import_all(package: str) -> list[ModuleType]:
    """Import ``fastloss.<package>.<family>`` (or ``fastloss.<family>`` for package "") for every family."""
    prefix = f"fastloss.{package}." if package else "fastloss."
    return [importlib.import_module(prefix + family) for family in FAMILIES]
