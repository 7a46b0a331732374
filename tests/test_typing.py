"""Type checkers and IDEs see the whole public API: mypy, run on a user script that touches every
exported name (fastloss.<fn>, fastloss.<family>.<fn>, fastloss.nn.<Module>), finds each of them.

The names come from the running package (its ``__all__`` lists, filled at import time by the
family loop), so a family or function added without a static import fails here."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import fastloss
import fastloss.nn
from fastloss import _families

# The family namespaces a user reaches as fastloss.<family>.<name>: every registered family.
NAMESPACES = _families.FAMILIES

# torch is skipped (its types become Any): mypy would take a minute to analyse it, and the test is about
# whether fastloss's own names are visible. no_implicit_reexport is the strict setting: a name counts as
# exported only through __all__ or an explicit re-export.
MYPY_CONFIG = """\
[mypy]
follow_imports = silent
no_implicit_reexport = True
warn_unused_configs = True

[mypy-torch.*]
follow_imports = skip
"""


def _user_script() -> tuple[str, list[str]]:
    lines = ["import fastloss", "import fastloss.nn", ""]
    names = [f"fastloss.{name}" for name in fastloss.__all__]
    for namespace in NAMESPACES:
        names += [f"fastloss.{namespace}.{name}" for name in getattr(fastloss, namespace).__all__]
    names += [f"fastloss.nn.{name}" for name in fastloss.nn.__all__]
    lines += [f"print({name})" for name in names]
    # A function must keep its signature (not Any): reveal_type prints it.
    lines += ["reveal_type(fastloss.metric.info_nce)", "reveal_type(fastloss.nn.InfoNCELoss)"]
    return "\n".join(lines) + "\n", names


def _run_mypy(tmp_path: Path, script: str) -> subprocess.CompletedProcess:
    (tmp_path / "user.py").write_text(script)
    (tmp_path / "mypy.ini").write_text(MYPY_CONFIG)
    env = dict(os.environ)
    # The fastloss under test (a staged or installed copy), found through the interpreter's sys.path.
    package_root = str(Path(fastloss.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH", "")) if p)
    env.pop("MYPYPATH", None)
    return subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", "mypy.ini", "--python-executable", sys.executable,
         "--cache-dir", str(tmp_path / "cache"), "--no-error-summary", "--show-error-codes", "user.py"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)


def test_mypy_sees_every_public_name(tmp_path):
    script, names = _user_script()
    assert "fastloss.metric.info_nce" in names and "fastloss.softplus_attention" in names
    assert "fastloss.nn.InfoNCELoss" in names and "fastloss.ot.sinkhorn" in names and "fastloss.quant.quantize" in names
    result = _run_mypy(tmp_path, script)
    output = result.stdout + result.stderr
    errors = [line for line in output.splitlines() if ": error:" in line]
    assert not errors, "mypy does not see these names:\n" + "\n".join(errors)
    assert result.returncode == 0, output
    # The revealed types are real signatures, not Any.
    revealed = [line for line in output.splitlines() if "Revealed type" in line]
    assert len(revealed) == 2, output
    assert "def (" in revealed[0] and "Any" != revealed[0].split("Revealed type is ")[-1].strip('"'), revealed[0]
    assert "InfoNCELoss" in revealed[1], revealed[1]


def test_mypy_reports_a_missing_name(tmp_path):
    """The check above can fail: a name fastloss does not export is reported."""
    result = _run_mypy(tmp_path, "import fastloss\nfastloss.metric.no_such_loss\nfastloss.no_such_family\n")
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert 'has no attribute "no_such_loss"' in output and 'has no attribute "no_such_family"' in output, output
