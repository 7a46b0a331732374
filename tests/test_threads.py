"""CPU threads (issue 17): the parallel loops give the same bits whoever runs the pieces.

For a given thread count the pieces are fixed, so torch's OpenMP team (the default), fastloss's own
pool (FASTLOSS_CPU_POOL=own) and a forked child (own pool) must agree bit for bit. Across thread
counts (one thread: everything inline on the caller) every kernel agrees bit for bit too, except the
metric gradients, whose per-piece partial sums are merged in piece order and the piece count follows
the thread count. No timings here: bench/threads.py measures them."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys

import pytest
import torch

import fastloss
import fastloss.metric as metric
import fastloss.ot as ot
import fastloss.quant as quant

CPUS = len(os.sched_getaffinity(0))


def _outputs() -> list[torch.Tensor]:
    """Every CPU op at a size its loops split into several pieces, forward and backward."""
    torch.manual_seed(0)  # the output layer's initial weights
    g = torch.Generator().manual_seed(0)
    out = []
    logits = torch.randn(64, 40_000, generator=g, requires_grad=True)
    target = torch.randint(0, 40_000, (64,), generator=g)
    loss = fastloss.zloss(logits, target)
    out += [loss.detach(), torch.autograd.grad(loss, logits)[0]]
    q = torch.randn(300, 64, generator=g, requires_grad=True)
    k = torch.randn(300, 64, generator=g, requires_grad=True)
    loss = metric.info_nce(q, k, symmetric=True)
    out += [loss.detach(), *torch.autograd.grad(loss, (q, k))]
    result = ot.sinkhorn(torch.rand(200, 150, generator=g), eps=0.05)
    out += [result.cost, result.f, result.g]
    qw = quant.quantize(torch.randn(512, 1024, generator=g) * 0.02)
    for rows in (1, 16):
        out.append(quant.matmul(torch.randn(rows, 1024, generator=g), qw))
    qa, ka, va = (torch.randn(1, 2, 200, 32, generator=g, requires_grad=True) for _ in range(3))
    att = fastloss.softplus_attention(qa, ka, va)
    out += [att.detach(), *torch.autograd.grad(att.square().sum(), (qa, ka, va))]
    layer = fastloss.nn.SphericalOutputLayer(48, 5_000, loss="zloss", lr=0.05)
    h = torch.randn(32, 48, generator=g, requires_grad=True)
    layer(h, torch.randint(0, 5_000, (32,), generator=g)).backward()
    out += [h.grad, layer.weight.detach().clone()]
    return out


def _libgomp_loaded() -> bool:
    with open("/proc/self/maps") as maps:
        return any("libgomp" in line for line in maps)


def _assert_same_bits(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b)):
        assert torch.equal(x, y), f"output {i} differs"


METRIC_GRADS = (3, 4)  # indices in _outputs() of the info_nce gradients


def _outputs_with(threads: int) -> list[torch.Tensor]:
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        return _outputs()
    finally:
        torch.set_num_threads(before)


def test_one_thread_and_two_threads_agree():
    inline, parallel = _outputs_with(1), _outputs_with(2)
    for i in METRIC_GRADS:
        torch.testing.assert_close(inline[i], parallel[i], rtol=1e-5, atol=1e-7)
        inline[i] = parallel[i]
    _assert_same_bits(inline, parallel)


_CHILD = """
import sys, torch
sys.path[:0] = {path!r}
from test_threads import _outputs
import fastloss
torch.set_num_threads(2)
torch.save([_outputs(), fastloss.build_info()["cpu_pool"]], {out!r})
"""


@pytest.mark.parametrize("pool", ["own", "default"])
def test_each_pool_gives_the_same_bits(tmp_path, pool):
    out = str(tmp_path / "out.pt")
    env = dict(os.environ)
    env.pop("FASTLOSS_CPU_POOL", None)
    if pool == "own":
        env["FASTLOSS_CPU_POOL"] = "own"
    path = [os.path.dirname(__file__), *sys.path]
    subprocess.run([sys.executable, "-c", _CHILD.format(path=path, out=out)], env=env, check=True, timeout=600)
    outputs, kind = torch.load(out)
    # The default borrows the team of an OpenMP runtime torch loaded (libgomp in the Linux wheels).
    assert kind == ("openmp" if pool == "default" and _libgomp_loaded() else "fastloss")
    _assert_same_bits(outputs, _outputs_with(2))


def _kernel_inputs():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 40_000, generator=g)
    target = torch.randint(0, 40_000, (64,), generator=g)
    qw = quant.quantize(torch.randn(512, 1024, generator=g) * 0.02)
    return logits, target, torch.randn(16, 1024, generator=g), qw


def _kernel_outputs(inputs) -> list[torch.Tensor]:
    """fastloss kernels alone, no parallel torch op: torch's own OpenMP loops hang in a forked child."""
    logits, target, x, qw = inputs
    return [fastloss.zloss(logits, target), quant.matmul(x, qw)]


def _forked_child(queue, inputs):
    torch.set_num_threads(2)
    queue.put([t.tolist() for t in _kernel_outputs(inputs)])  # plain values: the child exits first


@pytest.mark.skipif(sys.platform != "linux", reason="fork start method")
def test_a_forked_child_runs_parallel_loops():
    """libgomp's team does not survive fork (torch's own parallel loops hang there): the child's
    fastloss loops must run on the own pool, and give the same bits."""
    _outputs_with(2)  # the parent's loops have used the team before the fork
    inputs = _kernel_inputs()
    parent = _kernel_outputs(inputs)
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_forked_child, args=(queue, inputs))
    child.start()
    try:
        result = queue.get(timeout=120)
    finally:
        child.join(timeout=60)
        if child.is_alive():
            child.kill()
    assert child.exitcode == 0
    _assert_same_bits(parent, [torch.tensor(r, dtype=p.dtype) for r, p in zip(result, parent)])
