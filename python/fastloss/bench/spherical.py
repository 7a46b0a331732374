"""Benchmarks of the spherical-family losses: forward + backward on dense logits, fastloss against the
same formula written in PyTorch (upcast to float32, as a user would write it), eager and under
``torch.compile``. No peer library implements these losses (Liger and Cut Cross-Entropy offer only
softmax cross-entropy and PaLM's log^2 Z term), so PyTorch is the baseline a user would pick."""

from __future__ import annotations

import functools

import torch

from ..reference import spherical as ref
from . import BenchCase, Contender, Problem, register

CPU_SHAPES = [(64, 32_768), (8, 131_072)]
CUDA_SHAPES = [(1024, 131_072), (256, 524_288), (128, 1_048_576)]
QUICK_SHAPES = [(16, 16_384)]


def _fwd_bwd(loss_fn, x, t):
    return lambda: torch.autograd.grad(loss_fn(x, t), x)


def _relative_difference(fns, x, t) -> float:
    grads = [torch.autograd.grad(fn(x, t), x)[0].double() for fn in fns]
    scale = float(grads[0].norm()) or 1.0
    return max(float((g - grads[0]).norm()) / scale for g in grads[1:])


def _allow_recompiles(limit: int = 64) -> None:
    """Every compiled contender wraps the same code object, so the shapes and dtypes of all the cases
    count against one recompile limit (8 by default); past it torch.compile silently runs eagerly and
    the 'torch.compile' rows would time eager code (as in the H100 run of 2026-11-22, see README)."""
    config = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(config, name):
            setattr(config, name, max(getattr(config, name), limit))


def _problems(name: str, dtypes, device: torch.device, quick: bool, compile_peer: bool) -> list[Problem]:
    fast, reference, kwargs = ref.LOSSES[name]
    fast_fn = functools.partial(fast, **kwargs)
    eager_fn = functools.partial(reference, compute_dtype=torch.float32, **kwargs)
    if compile_peer:
        _allow_recompiles()
    compiled_fn = torch.compile(eager_fn, dynamic=False) if compile_peer else None
    shapes = QUICK_SHAPES if quick else (CUDA_SHAPES if device.type == "cuda" else CPU_SHAPES)
    problems = []
    for dtype in dtypes:
        for rows, cols in shapes:
            generator = torch.Generator(device=device).manual_seed(rows * cols)
            x = (torch.randn(rows, cols, device=device, generator=generator) * 2).to(dtype).requires_grad_()
            t = torch.randint(0, cols, (rows,), device=device, generator=generator)
            contenders = [Contender("fastloss", _fwd_bwd(fast_fn, x, t)), Contender("torch eager", _fwd_bwd(eager_fn, x, t))]
            fns = [fast_fn, eager_fn]
            if compiled_fn is not None:
                contenders.append(Contender("torch.compile", _fwd_bwd(compiled_fn, x, t)))
                fns.append(compiled_fn)
            problems.append(
                Problem(
                    label=f"N={rows} D={cols}",
                    dtype=dtype,
                    contenders=contenders,
                    bytes_floor=3 * x.numel() * x.element_size(),  # read logits twice, write the gradient once
                    check=functools.partial(_relative_difference, fns, x, t),
                )
            )
    return problems


def _case(name: str, dtypes_cpu, dtypes_cuda, quick_dtypes):
    def make(device: torch.device, quick: bool, compile_peer: bool = True) -> list[Problem]:
        dtypes = quick_dtypes if quick else (dtypes_cuda if device.type == "cuda" else dtypes_cpu)
        return _problems(name, dtypes, device, quick, compile_peer)

    return register(BenchCase(family="spherical", name=f"{name} fwd+bwd", make=make))


_case("zloss", (torch.float32, torch.bfloat16), (torch.float32, torch.bfloat16), (torch.float32,))
_case("spherical_softmax_loss", (torch.float32,), (torch.float32, torch.bfloat16), ())
_case("taylor_softmax_loss", (torch.float32,), (torch.float32, torch.bfloat16), ())


from . import spherical_output  # noqa: E402,F401  (registers the output-layer step benchmark)
