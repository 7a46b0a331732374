"""The package around the kernels: build info, the family registration list, the self-check that
`python -m fastloss` runs, and the benchmark runner's JSON."""

import importlib
import json

import pytest
import torch

import fastloss
from fastloss import _families
from fastloss.bench import runner

from conftest import GPU_TARGET


def test_build_info_describes_the_build():
    info = fastloss.build_info()
    assert info["version"] == fastloss.__version__
    simulated = bool(info.get("cuda_simulated", False))
    assert isinstance(info["cuda"], bool) and simulated == fastloss.SIMULATED_CUDA
    # A SIMULATE build has CUDA kernels (cuda: True) for the simulated device only: none for CUDA tensors.
    assert fastloss.HAS_CUDA_KERNELS == (info["cuda"] and not simulated)
    assert info["cpu_threads"] >= 1
    if fastloss.HAS_CUDA_KERNELS:
        assert info["cuda_archs"] and info["cuda_runtime_version"] > 0


def test_simulated_cuda_needs_a_simulate_build():
    assert fastloss.simulated_cuda.__doc__ and "FASTLOSS_CUDA=SIMULATE" in fastloss.simulated_cuda.__doc__
    with fastloss.simulated_cuda(False):  # turning the routing off is fine in any build
        pass
    if not fastloss.SIMULATED_CUDA:
        with pytest.raises(RuntimeError, match="FASTLOSS_CUDA=SIMULATE pip install"):
            with fastloss.simulated_cuda():
                pass


@pytest.mark.parametrize("family", _families.FAMILIES)
def test_every_family_provides_all_its_modules(family):
    for package in ("", "nn.", "reference.", "bench."):
        module = importlib.import_module(f"fastloss.{package}{family}")
        if package == "":
            assert module.__all__ and all(hasattr(module, n) for n in module.__all__)
            exported = getattr(module, "__fastloss_exports__", module.__all__)  # names lifted to fastloss.*
            assert all(getattr(fastloss, n) is getattr(module, n) for n in exported)
        if package == "nn.":
            assert module.__all__ and all(hasattr(fastloss.nn, n) for n in module.__all__)


# With a GPU target the self-check runs the CUDA kernels too (on the simulated device in a SIMULATE build).
@pytest.mark.gpu if GPU_TARGET else (lambda test: test)
def test_self_check_passes_and_reports_every_op(capsys):
    from fastloss.selfcheck import run_self_checks

    passed = run_self_checks()
    out = capsys.readouterr().out
    assert passed, out
    for name in ("zloss", "spherical_softmax_loss", "taylor_softmax_loss"):
        assert out.count(name) >= 3 and "FAIL" not in out
    assert out.count("SphericalOutputLayer") >= 2
    if fastloss.SIMULATED_CUDA:  # every check also ran its CUDA kernels on the simulated device
        assert out.count(" cuda-sim ") >= 10


def test_benchmark_runner_writes_json(tmp_path):
    report = runner.run(torch.device("cpu"), quick=True, name_filter="zloss", compile_peer=False, budget_s=0.01,
                        log=lambda *_: None)
    path = runner.write_json(report, tmp_path / "out.json")
    data = json.loads(path.read_text())
    assert data["device"] and data["torch"] == torch.__version__ and data["fastloss"] == fastloss.__version__
    assert data["date"][:4].isdigit()
    impls = {r["impl"] for r in data["results"]}
    assert impls == {"fastloss", "torch eager"}
    for row in data["results"]:
        assert row["median_ms"] > 0 and row["bytes_floor"] > 0 and row["max_rel_grad_difference"] < 1e-4
