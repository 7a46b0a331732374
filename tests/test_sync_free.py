"""No host synchronization by default: every public op on the GPU target, with default arguments,
forward and backward, makes no synchronizing call and no host read of device memory.

What is counted (``host_syncs``):
* on the simulated device, the synchronizing runtime calls of the simulated cudart (stream, event
  and device synchronize, blocking copies to the host: ``sim_stats()["sync_calls"]``) and the host's
  polls of the device's progress (``host_polls``: event and stream queries, which Sinkhorn's
  convergence test makes);
* everywhere, the aten ops that read a CUDA tensor back to the host (``.item()``, ``bool()``,
  ``int()``, ``float()``, ``nonzero``, boolean-mask indexing, ``unique``, ``bincount``, ...) or
  check a solver's status on the host (``_linalg_check_errors``), seen by a TorchDispatchMode that also
  enters the Python implementations of the fastloss ops (a mode sees a custom op, not the aten ops
  inside its implementation, unless it redispatches into it with itself on);
* on a real GPU, also ``torch.cuda.set_sync_debug_mode("error")``.
``.tolist()`` and ``.numpy()`` do not dispatch an aten op on CPU tensors, so the simulated run cannot
see them: no CUDA path of fastloss calls them (checked by grep in ``test_cuda_paths_use_no_tolist``).

The cases that must synchronize are listed in ``MUST_SYNC`` with the reason; every other case must
count 0. The count of every case is printed (``-s``) and kept in the report (``record_property``).
"""

from __future__ import annotations

import collections
import contextlib
import copy
import pathlib
import re

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fastloss
from fastloss import _C
from fastloss import _library as L
from conftest import GPU_TARGET

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(GPU_TARGET is None, reason="needs a GPU target (a CUDA GPU or the simulator)")]

aten = torch.ops.aten
# The aten ops that make the host wait for a CUDA tensor's values.
_HOST_READS = {
    "_local_scalar_dense", "item", "is_nonzero", "nonzero", "argwhere", "masked_select", "_unique", "_unique2", "unique_dim", "unique_consecutive",
    "equal", "bincount", "histc", "_linalg_check_errors",
}  # fmt: skip
_NEEDS_OUTPUT_SIZE = {"repeat_interleave": "output_size"}  # a sync unless the size is given


class _HostReadCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.reads: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name
        if name.startswith("fastloss::"):
            # Run the op's own implementation with this mode on, so the aten ops inside it are seen too.
            first = next(a for a in _flat(args) if isinstance(a, torch.Tensor))
            with self:
                return L.OPS[name.split("::")[-1]].kernel("cuda" if first.is_cuda else "cpu")(*args, **kwargs)
        base = name.split("::")[-1]
        if base in _HOST_READS or (base in _NEEDS_OUTPUT_SIZE and kwargs.get(_NEEDS_OUTPUT_SIZE[base]) is None):
            self.reads.append(base)
        elif base in ("index", "index_put", "index_put_", "_index_put_impl_") and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in _flat(args[1:2])):
            self.reads.append(f"{base} with a boolean mask")  # a nonzero inside the kernel  # fmt: skip
        return func(*args, **kwargs)


def _flat(args):
    for a in args:
        if isinstance(a, (list, tuple)):
            yield from _flat(a)
        else:
            yield a


def _sim_counts() -> int:
    stats = _C.sim_stats()
    return stats["sync_calls"] + stats["host_polls"]


def host_syncs(fn) -> tuple[int, list[str]]:
    """(number of host synchronizations, what they were) while ``fn()`` runs on the GPU target."""
    counter = _HostReadCounter()
    before = _sim_counts() if GPU_TARGET == "sim" else 0
    debug = contextlib.nullcontext()
    if GPU_TARGET == "cuda":
        torch.cuda.synchronize()
        previous = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("error")
        debug = contextlib.ExitStack()
        debug.callback(torch.cuda.set_sync_debug_mode, previous)
    runtime = []
    with debug, counter, L.simulated_cuda(True) if GPU_TARGET == "sim" else contextlib.nullcontext():
        try:
            fn()
        except RuntimeError as error:
            if "synchronizing operation" not in str(error):
                raise
            runtime.append(f"sync_debug_mode: {error}")
    if GPU_TARGET == "sim":
        runtime += ["runtime sync or poll"] * (_sim_counts() - before)
    reads = counter.reads + runtime
    return len(reads), reads


# ---------------------------------------------------------------------------- the cases
def _dev(t: torch.Tensor) -> torch.Tensor:
    return t.to("cuda") if GPU_TARGET == "cuda" else t.clone()


def _leaf(*shape, seed=0, dtype=torch.float32, scale=1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return _dev(torch.randn(*shape, generator=g, dtype=dtype) * scale).requires_grad_()


def _labels(n, classes, seed=1) -> torch.Tensor:
    return _dev(torch.randint(0, classes, (n,), generator=torch.Generator().manual_seed(seed)))


def _backward(loss) -> None:
    loss.sum().backward() if loss.dim() else loss.backward()


def _spherical(fn):
    def run():
        x, t = _leaf(6, 40), _labels(6, 40)
        _backward(fn(x, t))

    return run


def _metric(name):
    def run():
        M = fastloss.metric
        e, y = _leaf(24, 16), _labels(24, 5)
        if name in ("info_nce", "auc_loss"):
            _backward(getattr(M, name)(e, _leaf(24, 16, seed=3)))
        elif name == "decoupled_softmax":
            positives = _dev(torch.arange(12).reshape(12, 1) % 20)
            _backward(M.decoupled_softmax(_leaf(12, 16), _leaf(20, 16, seed=3), positives))
        else:
            _backward(getattr(M, name)(e, y))

    return run


def _ot(name):
    def run():
        ot = fastloss.ot
        if name == "sinkhorn":
            C = _dev(torch.rand(9, 11, generator=torch.Generator().manual_seed(0))).requires_grad_()
            _backward(ot.sinkhorn(C, eps=0.1).cost)
        elif name == "sinkhorn_points":
            _backward(ot.sinkhorn_points(_leaf(9, 3), _leaf(11, 3, seed=2), eps=0.1).cost)
        elif name == "sinkhorn_divergence":
            _backward(ot.sinkhorn_divergence(_leaf(9, 3), _leaf(11, 3, seed=2), eps=0.1))
        elif name == "balanced_assignment":
            ot.balanced_assignment(_leaf(16, 5).detach())
        elif name == "sparse_ot":
            C = _dev(torch.rand(7, 8, generator=torch.Generator().manual_seed(0)))
            ot.sparse_ot(C, gamma=0.5)

    return run


def _quant(name):
    def run():
        q = fastloss.quant
        weight = torch.randn(64, 128, generator=torch.Generator().manual_seed(0)).half()
        qw = _QW.get("qw")
        if name == "quantize":
            q.quantize(_dev(weight))
            return
        if name == "dequantize":
            q.dequantize(qw, torch.float16)
        elif name == "matmul":
            x = _leaf(3, 128, dtype=torch.float16)
            _backward(q.matmul(x, qw).float())

    return run


_QW: dict = {}


@pytest.fixture(scope="module")
def quantized_weight():
    weight = torch.randn(64, 128, generator=torch.Generator().manual_seed(0)).half()
    with L.simulated_cuda(True) if GPU_TARGET == "sim" else contextlib.nullcontext():
        _QW["qw"] = fastloss.quant.quantize(_dev(weight))
    yield _QW["qw"]
    _QW.clear()


def _attention():
    q, k, v = (_leaf(1, 2, 9, 32, seed=s, dtype=torch.float16) for s in range(3))
    _backward(fastloss.softplus_attention(q, k, v))


def _module(make, *inputs):
    def run():
        module = make()
        _backward(module(*(i() for i in inputs)))

    return run


def _output_layer_step():
    layer = _LAYER["layer"]
    h = _leaf(5, 8, dtype=torch.float64)
    _backward(layer(h, _labels(5, 30)))


_LAYER: dict = {}

CASES = {
    **{f"spherical.{n}": _spherical(getattr(fastloss, n)) for n in fastloss.spherical.__all__},
    **{f"metric.{n}": _metric(n) for n in fastloss.metric.__all__},
    **{f"ot.{n}": _ot(n) for n in fastloss.ot.__all__ if not n.endswith("Result")},
    "quant.quantize": _quant("quantize"),
    "quant.dequantize": _quant("dequantize"),
    "quant.matmul": _quant("matmul"),
    "attention.softplus_attention": _attention,
    "nn.ZLoss": _module(lambda: fastloss.nn.ZLoss(), lambda: _leaf(6, 40), lambda: _labels(6, 40)),
    "nn.SphericalSoftmaxLoss": _module(lambda: fastloss.nn.SphericalSoftmaxLoss(), lambda: _leaf(6, 40),
                                       lambda: _labels(6, 40)),  # fmt: skip
    "nn.TaylorSoftmaxLoss": _module(lambda: fastloss.nn.TaylorSoftmaxLoss(), lambda: _leaf(6, 40),
                                    lambda: _labels(6, 40)),  # fmt: skip
    "nn.SphericalOutputLayer.step": _output_layer_step,
    "nn.SinkhornLoss": _module(lambda: fastloss.nn.SinkhornLoss(eps=0.1), lambda: _leaf(9, 3),
                               lambda: _leaf(11, 3, seed=2)),  # fmt: skip
    "nn.SinkhornDivergence": _module(lambda: fastloss.nn.SinkhornDivergence(eps=0.1), lambda: _leaf(9, 3),
                                     lambda: _leaf(11, 3, seed=2)),  # fmt: skip
    "nn.InfoNCELoss": _module(lambda: fastloss.nn.InfoNCELoss(), lambda: _leaf(24, 16), lambda: _leaf(24, 16, seed=3)),
    "nn.SupConLoss": _module(lambda: fastloss.nn.SupConLoss(), lambda: _leaf(24, 16), lambda: _labels(24, 5)),
    "nn.SoftplusAttention": _module(lambda: _dev_module(fastloss.nn.SoftplusAttention(64, 2).half()),
                                    lambda: _leaf(1, 9, 64, dtype=torch.float16)),
}  # fmt: skip


def _dev_module(module):
    return module.to("cuda") if GPU_TARGET == "cuda" else module


# Cases that synchronize by contract, with the reason. Everything else must count 0.
MUST_SYNC = {
    # tol=1e-6, check_every=10 by default: the host learns when every problem has converged from the
    # count of running problems, copied back asynchronously every check_every iterations (event queries,
    # and one wait at the end for the copies still in flight). check_every=0 (a fixed max_iter) reads
    # nothing and is capturable.
    "ot.sinkhorn": "Sinkhorn's convergence test (tol): check_every=0 avoids it",
    "ot.sinkhorn_points": "Sinkhorn's convergence test (tol): check_every=0 avoids it",
    "ot.sinkhorn_divergence": "Sinkhorn's convergence test (tol): check_every=0 avoids it",
    "nn.SinkhornLoss": "Sinkhorn's convergence test (tol): check_every=0 avoids it",
    "nn.SinkhornDivergence": "Sinkhorn's convergence test (tol): check_every=0 avoids it",
    # L-BFGS on the dual: the line search and the stopping test are decided on the host every iteration.
    "ot.sparse_ot": "L-BFGS line search and stopping test on the host",
    # positives (a bool mask or a padded index matrix) become CSR lists whose length is the number of
    # positives: a nonzero, so a host read.
    "metric.decoupled_softmax": "positives -> CSR (nonzero sizes pos_idx)",
    # A one-time construction: the format's values (codes, zero points, side index) are validated once.
    "quant.quantize": "one-time construction of a QuantizedWeight (validated once, not per call)",
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_default_arguments_make_no_host_sync(case, record_property, quantized_weight):
    if case == "nn.SphericalOutputLayer.step":
        with L.simulated_cuda(True) if GPU_TARGET == "sim" else contextlib.nullcontext():
            _LAYER["layer"] = _dev_module(fastloss.nn.SphericalOutputLayer(8, 30, lr=0.05, dtype=torch.float64))
    count, what = host_syncs(CASES[case])
    record_property("host_syncs", count)
    print(f"{case}: {count} host syncs {dict(collections.Counter(what))}")
    if case in MUST_SYNC:
        assert count > 0, f"{case} no longer synchronizes: take it off MUST_SYNC ({MUST_SYNC[case]})"
    else:
        assert count == 0, f"{case}: {count} host synchronizations: {dict(collections.Counter(what))}"


def test_default_arguments_of_sinkhorn_alternatives_make_no_host_sync():
    """The option beside tol that avoids the host read: check_every=0 runs max_iter iterations."""
    C = _dev(torch.rand(9, 11, generator=torch.Generator().manual_seed(0))).requires_grad_()
    count, what = host_syncs(lambda: _backward(fastloss.ot.sinkhorn(C, eps=0.1, max_iter=50, check_every=0).cost))
    assert count == 0, what


# ---------------------------------------------------------------------------- the counter can fail
def test_the_counter_sees_a_host_read_planted_inside_an_op(monkeypatch):
    import fastloss.spherical as S

    original = S._check_op_inputs

    def planted(name, logits, target, **others):
        original(name, logits, target, **others)
        logits.sum().item()  # the planted host read, inside the op's implementation

    monkeypatch.setattr(S, "_check_op_inputs", planted)
    count, what = host_syncs(_spherical(fastloss.zloss))
    assert count >= 2 and set(what) <= {"_local_scalar_dense", "item"}  # forward and backward each read once


@pytest.mark.skipif(GPU_TARGET != "sim", reason="the simulated runtime's counters")
def test_the_counter_sees_the_runtime_polls_of_sinkhorn():
    count, what = host_syncs(_ot("sinkhorn"))
    assert "runtime sync or poll" in what


def test_cuda_paths_use_no_tolist():
    """``.tolist()`` / ``.numpy()`` are invisible to the dispatch mode on CPU tensors, so the simulated run
    would miss them: each use in the package is listed here with why it is not on a default CUDA path."""
    root = pathlib.Path(fastloss.__file__).parent
    allowed = {
        "quant/_format.py": "state[\"meta\"].tolist()",  # from_state_dict: a one-time construction
        "quant/_quantizer.py": "bits[~allowed].tolist()",  # quantize: an error message, one-time construction
        "nn/spherical_output.py": "torch.stack(checks).tolist()",  # the host guard: CPU or set_target_checks(True)
        "ot/_inputs.py": "totals.flatten()[:4].tolist()",  # an error message of the opt-in host check
        "attention/_api.py": "host.tolist()[:8]",  # an error message of the opt-in host check
        "_library.py": "t.detach().reshape(()).numpy()",  # host_scalar_value: CPU tensors only
    }
    found = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root).as_posix()
        if rel.startswith(("bench/", "reference/")) or rel == "_registry.py":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"\.(tolist|numpy)\(\)", line) and allowed.get(rel, "\0") not in line:
                found.append(f"{rel}:{number}: {line.strip()}")
    assert not found, found


# ---------------------------------------------------------------------------- deferred device errors
def _routed():
    return L.simulated_cuda(True) if GPU_TARGET == "sim" else contextlib.nullcontext()


def test_bad_cu_seqlens_is_a_deferred_device_error():
    q, k, v = (_leaf(1, 2, 10, 32, seed=s, dtype=torch.float16).detach() for s in range(3))
    with _routed():
        fastloss.check_device_errors()
        out = fastloss.softplus_attention(q, k, v, cu_seqlens=_dev(torch.tensor([0, 6, 4, 10])))
        assert out.shape == q.shape  # clamped offsets: wrong rows, no fault
        with pytest.raises(ValueError, match=r"fastloss.softplus_attention \(an earlier call, found on the device\): "
                           r"argument 'cu_seqlens' must increase strictly from 0 to the packed length 10"):
            fastloss.check_device_errors()
        fastloss.softplus_attention(q, k, v, cu_seqlens=_dev(torch.tensor([0, 4, 10])))
        fastloss.check_device_errors()  # a good call reports nothing


def test_bad_positive_index_is_a_deferred_device_error():
    positives = _dev(torch.tensor([[0, -1], [25, 1], [2, -1]]))  # 25 >= 20 keys
    with _routed():
        fastloss.metric.decoupled_softmax(_leaf(3, 16).detach(), _leaf(20, 16, seed=3).detach(), positives)
        with pytest.raises(ValueError, match=r"fastloss.metric \(an earlier call, found on the device\): pos_idx .* "
                           r"holds 25 at position 1"):
            fastloss.check_device_errors()


def test_a_pending_device_error_is_raised_by_the_next_call_and_only_once():
    x, bad, good = _leaf(3, 5).detach(), _dev(torch.tensor([0, 7, 1])), _dev(torch.tensor([0, 4, 1]))
    with _routed():
        fastloss.zloss(x, bad)  # no error yet: nothing was read back
        if GPU_TARGET == "cuda":
            torch.cuda.synchronize()  # (the next call sees only what finished: it does not wait)
        with pytest.raises(ValueError, match=r"fastloss.zloss \(an earlier call.*class index 7 at flat position 1"):
            fastloss.zloss(x, good)
        fastloss.zloss(x, good)
        fastloss.check_device_errors()
