"""``SphericalOutputLayer``: the exact O(d^2) factored output layer of Vincent, de Brébisson &
Bouthillier (NeurIPS 2015, "Efficient Exact Gradient Update for training Deep Networks with Very
Large Sparse Targets"), for the losses of the spherical family.

The D x d output matrix is kept as W = V U + 1 omega^T, with U^-T, Q = W^T W and wbar = W^T 1 up to
date. A training step (forward, ``loss.backward()``) computes the loss, dL/dh and the *exact* SGD
update of W at a cost independent of D: O(m d^2 + m^2 d) for a batch of m samples, plus O(K m d)
for the K target rows of V that change. The algorithm and its checks are in
``shared/reference/spherical.md`` §1.3; the row layouts in ``csrc/spherical/factored_head.h``.

State (all buffers, so ``state_dict`` and ``.to()`` carry it):
  ``V``        (D, d), ``dtype`` (float32 or float64)
  ``packed``   (2d+2, d), ``state_dtype``: rows [U; omega; wbar; Q] — one GEMM gives S h.
  ``u_inv_t``  (d, d), ``state_dtype``: U^-T
  ``steps``    number of updates applied
"""

from __future__ import annotations

import math
import struct
import warnings
import weakref

import torch

from .. import _library as L
from .. import _validate as Val
from .. import spherical_factored as ops
from . import _factored_inverse as inverse

_LOSS_PARAMS = {  # loss -> (a, b, eps) used by the head, from the constructor's a, b, eps
    "zloss": lambda a, b, eps: (a, b, 1e-12 if eps is None else eps),
    "spherical_softmax": lambda a, b, eps: (1.0, 0.0, 1e-6 if eps is None else eps),
    "taylor_softmax": lambda a, b, eps: (1.0, 0.0, 0.0),
    "mse": lambda a, b, eps: (1.0, 0.0, 0.0),
}
_STABLE_RANGE = (0.5, 2.0)  # singular values of U outside this range are reset to 1


def _describe_refused_step(reason: int, lam_bits: int, bound_bits: int) -> str:
    lam, bound = struct.unpack("<2d", struct.pack("<2q", lam_bits, bound_bits))
    what = {
        1: "non-finite values in the step (in h, target_weight or the gradient of the loss)",
        2: f"the step could make U singular: 2 * lr * lambda_max(h^T diag(max(dL/dq, 0)) h) <= {lam:.4g} >= 1 "
           "(lower lr or the scale of h)",
        3: f"the step is too large for the U^-T update without a host read (||X||_F = {bound:.4g}: its fixed "
           "Newton-Schulz count did not reach rounding); lower lr, or use fastloss.set_target_checks(True), whose "
           "eager check takes LU there",
        4: "a class index out of range",
    }.get(reason, f"reason {reason}")
    return f"{what}; the update was skipped and the layer's state is unchanged"


def _caller_stacklevel() -> int:
    """The stacklevel of the first frame outside torch.nn and this file: the user's ``.to()`` call,
    however deep the module tree that relayed it."""
    import sys

    frame, level = sys._getframe(1), 1
    while frame is not None and (frame.f_code.co_filename == __file__ or "torch/nn/modules" in frame.f_code.co_filename):
        frame, level = frame.f_back, level + 1
    return level


_GUARD_CODE = L.register_device_error("SphericalOutputLayer", None, _describe_refused_step, RuntimeError)


class _PendingStep:
    """A training forward waiting for its backward (weakly held: a dropped graph stops counting)."""

    __slots__ = ("version", "__weakref__")

    def __init__(self, version: int) -> None:
        self.version = version


class _Step(torch.autograd.Function):
    """Forward: the loss of each sample. Backward: dL/dh, and (in training) the layer's SGD update."""

    @staticmethod
    def forward(ctx, h, trigger, layer, target, target_weight):
        hs = h.detach().to(layer.state_dtype).contiguous()
        sh = torch.mm(hs, layer.packed.t())
        kind = ops.LOSS_KINDS[layer.loss]
        loss, partials = ops.head(hs, sh, layer.V, target, target_weight, kind, *layer._head_params, layer.ignore_index)
        ctx.layer = layer
        ctx.update = layer.training
        ctx.version = layer._version
        if ctx.update:
            ctx.token = _PendingStep(layer._version)
            layer._pending.add(ctx.token)
        ctx.h_dtype = h.dtype
        ctx.save_for_backward(hs, sh, target, partials)
        return loss.to(L.accumulator_dtype(h.dtype))

    @staticmethod
    def backward(ctx, grad_loss):
        layer = ctx.layer
        hs, sh, target, partials = ctx.saved_tensors
        if layer._version != ctx.version:
            raise RuntimeError(
                "fastloss.SphericalOutputLayer: backward of a forward computed before the layer's last update; "
                "call backward after each training forward (the update needs the state the forward saw)"
            )
        if ctx.update:
            waiting = sum(1 for token in layer._pending if token.version == ctx.version)
            if waiting > 1:
                raise RuntimeError(
                    f"fastloss.SphericalOutputLayer: {waiting} training forwards of the same state are waiting for "
                    "backward, but the factored update applies one batch at a time: call the layer once per backward "
                    "(concatenate the batches), or run forwards that are not trained on in eval mode; the layer's "
                    "state is unchanged"
                )
            layer._pending.discard(ctx.token)
        grad_loss = grad_loss.to(hs.dtype).contiguous()
        ytilde, scaled, coef = ops.prepare(hs, sh, layer.V, target, partials, grad_loss)
        grad_h = torch.mm(ytilde, layer.packed)
        if ctx.update:
            if layer.process_group is None:
                layer._update(hs, sh, target, ytilde, scaled, coef, grad_h)
            else:
                layer._update_distributed(hs, target, partials, grad_loss)
        return grad_h.to(ctx.h_dtype), None, None, None, None


class SphericalOutputLayer(torch.nn.Module):
    """A D-class linear output layer (no bias) trained with a spherical-family loss by exact SGD in O(d^2).

    Args:
        in_features: d, the width of ``h``.
        num_classes: D.
        loss: "zloss" (de Brébisson & Vincent), "mse" (squared error against the one-hot or K-sparse
            target), "spherical_softmax" or "taylor_softmax"; as :func:`fastloss.zloss` etc.
        lr: the layer's own SGD step size (the network's optimizer does not see the layer).
        weight_decay: as ``torch.optim.SGD``: W <- (1 - lr wd) W - lr dL/dW, applied as a rescaling.
        a, b: Z-loss sharpness and offset. eps: Z-loss variance / spherical-softmax epsilon
            (defaults 1e-12 / 1e-6, as the dense losses).
        reduction: "mean" (over samples with a target), "sum" or "none".
        ignore_index: a target entry equal to it is padding; a sample with no other entry is ignored.
        stabilize_every: every this many updates, the singular values of U outside [0.5, 2] are reset
            to 1 (W unchanged; V absorbs the change) and U^-T is recomputed from the SVD. When more
            than d/3 are out of range, the layer unfactorizes (V <- W, U = I, omega = 0). 0 disables.
        refresh_every: every this many updates, Q and wbar are recomputed from V (O(D d^2)). 0 disables.
        init: "linear" (as ``torch.nn.Linear``: U(-1/sqrt(d), 1/sqrt(d))), "normal" (std 1/sqrt(d)) or "zeros".
        dtype: dtype of V, float32 (default) or float64.
        state_dtype: dtype of U, U^-T, Q, omega, wbar and of the step's arithmetic; float64 by default
            (on an H100 float64 GEMMs run at the float32 rate, and U^-T drifts in float32).
        process_group: a ``torch.distributed`` group for data parallelism: the factored update is not
            additive, so every rank all-gathers h, targets and loss partials and applies the same
            deterministic update (the mean of the ranks' gradients, as DDP), keeping replicas identical.
            Every rank must call the layer with the same batch shape.
        deterministic: scatter into V without atomics (CUDA); default: ``torch.are_deterministic_algorithms_enabled()``.
        check_stability: before each update, refuse a step with 2 lr lambda_max(h^T diag(dL/dq) h) >= 1
            (U would become singular) or a value the update reads that is not finite. On the CPU (and
            on CUDA with ``fastloss.set_target_checks(True)``) it raises, from one host read per step
            that also fits the Newton-Schulz count of the U^-T update to the step. On CUDA by default
            (and under CUDA-graph capture) it is decided on the device: a refused step is skipped (the
            state stays bit-identical) and raised later as a device error (``fastloss.check_device_errors()``),
            and the count is fixed, with its residual checked. Off, a CUDA step runs a fixed count
            unchecked and records its residual bound for ``check()``. Either way an eager CUDA step
            reads nothing back, except ``stabilize()`` every ``stabilize_every`` steps (one read).

    Learning rate and ``eps`` for ``loss="spherical_softmax"``: -log((o_c^2 + eps) / sum_k (o_k^2 + eps)) is
    (up to eps) invariant to the scale of the outputs, so its gradient is orthogonal to W and a step only
    grows ||W||, and dL/do_c = -2 o_c / (o_c^2 + eps) peaks at 1/sqrt(eps) when the target output o_c
    crosses 0. With the default eps = 1e-6 a few such samples give steps of up to lr * 1000 |h|: at lr >= 0.2
    ||W|| grows 4-40x within 100 steps, the effective step size (lr / ||w_row||^2) collapses and the loss
    stops falling, which looks like "does not learn" (the layer is not at fault: it matches dense SGD to
    1e-14 here). Either keep eps = 1e-6 with lr <= 0.05, or (recommended) take ``eps=1e-2`` for outputs of
    order 1, which bounds the gradient at 5 and lets lr 0.2-1.0 work. Measured (float64, default init,
    100 steps on a separable 100-class problem, d = 32, m = 64; ``tests/test_spherical_output_seams.py``):
    eps = 1e-6: loss 6.09 -> 2.42 at lr 0.05, 2.88 at lr 0.2, 4.01 at lr 1 (uniform: 4.61);
    eps = 1e-2: 5.59 -> 2.25 at lr 0.05, 1.63 at lr 0.2, 1.49 at lr 1. The Z-loss, which standardizes the
    outputs, needs none of this (lr 0.2-5 all learn).

    ``loss = layer(h, target)`` (``h``: (..., d); ``target``: (...) or (..., K) int64, with an optional
    ``target_weight`` of the target's shape: the target values for "mse", per-entry weights otherwise).
    In training mode ``loss.backward()`` sets ``h.grad`` and applies the update; in eval mode it only
    sets ``h.grad``. ``layer.weight`` materializes W; ``logits`` and ``topk`` evaluate all D outputs.
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        *,
        loss: str = "zloss",
        lr: float,
        weight_decay: float = 0.0,
        a: float = 1.0,
        b: float = 0.0,
        eps: float | None = None,
        reduction: str = "mean",
        ignore_index: int = -100,
        stabilize_every: int = 100,
        refresh_every: int = 1000,
        init: str = "linear",
        dtype: torch.dtype = torch.float32,
        state_dtype: torch.dtype = torch.float64,
        device: torch.device | str | None = None,
        process_group: "torch.distributed.ProcessGroup | None" = None,
        deterministic: bool | None = None,
        check_stability: bool = True,
    ) -> None:
        super().__init__()
        fn = "SphericalOutputLayer"
        for name, value in (("in_features", in_features), ("num_classes", num_classes)):
            if Val.integer(fn, name, value) < 1:
                raise ValueError(f"fastloss.{fn}: argument '{name}' must be >= 1, got {value}")
        if loss not in _LOSS_PARAMS:
            raise ValueError(f"fastloss.{fn}: argument 'loss' must be one of {tuple(_LOSS_PARAMS)}, got {loss!r}")
        if init not in ("linear", "normal", "zeros"):
            raise ValueError(f"fastloss.{fn}: argument 'init' must be 'linear', 'normal' or 'zeros', got {init!r}")
        for name, value in (("dtype", dtype), ("state_dtype", state_dtype)):
            if value not in ops.STATE_DTYPES:
                raise TypeError(f"fastloss.{fn}: argument '{name}' must be torch.float32 or torch.float64, got {value}")
        self.in_features, self.num_classes, self.loss = in_features, num_classes, loss
        self.lr = Val.real_number(fn, "lr", lr, positive=True)
        self.weight_decay = Val.real_number(fn, "weight_decay", weight_decay, non_negative=True)
        if self.lr * self.weight_decay >= 1:
            raise ValueError(f"fastloss.{fn}: lr * weight_decay must be < 1, got {self.lr * self.weight_decay}")
        a = Val.real_number(fn, "a", a, positive=True)
        b = Val.real_number(fn, "b", b)
        if eps is not None:
            eps = Val.real_number(fn, "eps", eps, positive=loss == "spherical_softmax", non_negative=True)
        self._head_params = _LOSS_PARAMS[loss](a, b, eps)
        self.reduction = Val.reduction(fn, reduction)
        self.ignore_index = Val.integer(fn, "ignore_index", ignore_index)
        if 0 <= self.ignore_index < num_classes:
            raise ValueError(
                f"fastloss.{fn}: argument 'ignore_index' must be < 0 or >= num_classes ({num_classes}), got "
                f"{ignore_index}: it marks padding entries, and a class index would be both trained and ignored"
            )
        self.stabilize_every = Val.integer(fn, "stabilize_every", stabilize_every)
        self.refresh_every = Val.integer(fn, "refresh_every", refresh_every)
        for name, value in (("stabilize_every", stabilize_every), ("refresh_every", refresh_every)):
            if value < 0:
                raise ValueError(f"fastloss.{fn}: argument '{name}' must be >= 0 (0 turns it off), got {value}")
        self.state_dtype = state_dtype
        self.process_group = process_group
        self.deterministic = deterministic
        self.check_stability = bool(check_stability)
        self._version = 0  # bumped by every change of the state; a backward checks it
        self._host_steps = 0
        self._pending = weakref.WeakSet()  # tokens of training forwards whose backward has not run
        self._inverse_path = "auto"  # "woodbury" or "solve" force one form of the U^-T update (tests)
        self._inverse_method = "auto"  # "lu" forces the LU solve over Newton-Schulz (tests)
        self._q_update = "auto"  # "gram" (m x m M) or "gram_free" forces one form of the Q update (tests)

        d, classes = in_features, num_classes
        V = torch.empty(classes, d, dtype=dtype, device=device)
        if init == "linear":
            bound = 1.0 / math.sqrt(d)
            torch.nn.init.uniform_(V, -bound, bound)
        elif init == "normal":
            torch.nn.init.normal_(V, std=1.0 / math.sqrt(d))
        else:
            V.zero_()
        self.register_buffer("V", V)
        self.register_buffer("packed", torch.zeros(ops.packed_width(d), d, dtype=state_dtype, device=device))
        self.register_buffer("u_inv_t", torch.eye(d, dtype=state_dtype, device=device))
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64, device=device))
        # Largest ||X||_F of a U^-T update made without a host read (CUDA-graph capture, or check_stability=False
        # on CUDA); check() turns it into a bound on the residual those updates left.
        self.register_buffer("_unchecked_bound", torch.zeros((), dtype=state_dtype, device=device), persistent=False)
        self._reset_factorization(refresh=True)

    # ------------------------------------------------------------------ views of the packed state
    @property
    def U(self) -> torch.Tensor:
        return self.packed[: self.in_features]

    @property
    def omega(self) -> torch.Tensor:
        return self.packed[self.in_features]

    @property
    def wbar(self) -> torch.Tensor:
        return self.packed[self.in_features + 1]

    @property
    def Q(self) -> torch.Tensor:
        return self.packed[self.in_features + 2 :]

    @property
    def weight(self) -> torch.Tensor:
        """W = V U + 1 omega^T (D x d, state dtype), materialized: O(D d^2)."""
        with torch.no_grad():
            return torch.addmm(self.omega.unsqueeze(0), self.V.to(self.state_dtype), self.U)

    @classmethod
    def from_linear(
        cls,
        linear: torch.nn.Linear,
        *,
        loss: str = "zloss",
        lr: float,
        weight_decay: float = 0.0,
        a: float = 1.0,
        b: float = 0.0,
        eps: float | None = None,
        reduction: str = "mean",
        ignore_index: int = -100,
        stabilize_every: int = 100,
        refresh_every: int = 1000,
        dtype: torch.dtype | None = None,
        state_dtype: torch.dtype = torch.float64,
        device: torch.device | str | None = None,
        process_group: "torch.distributed.ProcessGroup | None" = None,
        deterministic: bool | None = None,
        check_stability: bool = True,
    ) -> "SphericalOutputLayer":
        """A layer whose W is ``linear.weight`` (out_features = D classes); ``linear`` must have no bias.
        The arguments are the constructor's; ``device`` defaults to the weight's, ``dtype`` to its dtype when
        float32/float64 (else float32)."""
        if not isinstance(linear, torch.nn.Linear):
            raise TypeError(f"fastloss.SphericalOutputLayer.from_linear: expected a torch.nn.Linear, got {type(linear).__name__}")
        if linear.bias is not None:
            raise ValueError("fastloss.SphericalOutputLayer.from_linear: the layer has no bias; pass a Linear with bias=False")
        kwargs = dict(loss=loss, lr=lr, weight_decay=weight_decay, a=a, b=b, eps=eps, reduction=reduction,
                      ignore_index=ignore_index, stabilize_every=stabilize_every, refresh_every=refresh_every,
                      state_dtype=state_dtype, process_group=process_group, deterministic=deterministic,
                      check_stability=check_stability)  # fmt: skip
        kwargs["device"] = linear.weight.device if device is None else device
        kwargs["dtype"] = dtype if dtype is not None else (linear.weight.dtype if linear.weight.dtype in ops.STATE_DTYPES
                                                           else torch.float32)  # fmt: skip
        layer = cls(linear.in_features, linear.out_features, init="zeros", **kwargs)
        with torch.no_grad():
            layer.V.copy_(linear.weight)
        layer._reset_factorization(refresh=True)
        return layer

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, num_classes={self.num_classes}, loss={self.loss!r}, lr={self.lr}, "
            f"weight_decay={self.weight_decay}, reduction={self.reduction!r}, dtype={self.V.dtype}, "
            f"state_dtype={self.state_dtype}"
        )

    # Buffers kept in the state dtype whatever a module-wide cast asks: the factored update's U, U^-T, Q
    # and wbar are what make it exact (U^-T drifts in float32 and breaks in 16 bits).
    _STATE_BUFFERS = ("packed", "u_inv_t", "_unchecked_bound")

    def _apply(self, fn, recurse=True):
        """``.to(device)`` / ``.cuda()`` move everything. A dtype cast (``.to(dtype)``, ``.half()``,
        ``.bfloat16()``, ``.float()``, ``.double()``, often applied to a whole model) converts V only to
        float32 or float64; the state (U, U^-T, Q, omega, wbar) keeps ``state_dtype``. A 16-bit cast leaves
        V as it is and warns: the kernels keep V in float32/float64, and 16-bit h are accepted anyway."""
        names = {id(t): name for name, t in self._buffers.items() if t is not None}
        ignored: list[torch.dtype] = []

        def convert(t: torch.Tensor) -> torch.Tensor:
            out = fn(t)
            name = names.get(id(t))
            if name is None or out.dtype == t.dtype:
                return out
            if name == "V" and out.dtype in ops.STATE_DTYPES:
                return out
            if name == "V":
                ignored.append(out.dtype)
            # Converting back from ``out`` would keep its rounding: move the original instead.
            return t.to(device=out.device)

        super()._apply(convert, recurse)
        if ignored:
            warnings.warn(
                f"fastloss.SphericalOutputLayer: ignored the cast to {ignored[0]}: V stays {self.V.dtype} and the "
                f"factored state {self.state_dtype} (the exact update needs them; 16-bit V is not supported). The layer "
                f"still takes {ignored[0]} inputs h and returns dL/dh in their dtype. To avoid this warning, cast the "
                "other submodules only (e.g. model.backbone.to(...))",
                stacklevel=_caller_stacklevel(),
            )
        self._version += 1  # a forward saved before a move must not drive a backward into the moved state
        return self

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._version += 1
        self._host_steps = int(self.steps)

    # ------------------------------------------------------------------ forward
    def forward(self, h: torch.Tensor, target: torch.Tensor, target_weight: torch.Tensor | None = None) -> torch.Tensor:
        """The loss of ``h`` (..., d) against ``target`` ((...) or (..., K) int64 class indices, ``ignore_index``
        pads), reduced by ``reduction`` (float32 for 16-bit h, else h's dtype).

        ``target_weight`` (the target's shape): the target values for "mse", per-entry weights otherwise.
        In training mode the following ``loss.backward()`` sets ``h.grad`` and applies the layer's own SGD
        step (one training forward per backward); in eval mode it only sets ``h.grad``. Shapes, dtypes and
        (on the CPU) class indices are checked before anything changes.
        """
        h2, target2, weight2, shape = self._check_inputs(h, target, target_weight)
        trigger = torch.empty(0, device=h.device, requires_grad=True) if torch.is_grad_enabled() else None
        loss = _Step.apply(h2, trigger, self, target2, weight2)
        if self.reduction == "none":
            return loss.reshape(shape)
        if self.reduction == "sum":
            return loss.sum()
        return loss.sum() / (target2 != self.ignore_index).any(dim=1).sum()

    def _check_inputs(self, h, target, target_weight):
        fn = "SphericalOutputLayer"
        h = Val.tensor(fn, "h", h)
        target = Val.tensor(fn, "target", target)
        Val.dtype_in(fn, "h", h, Val.FLOAT_DTYPES)
        Val.dtype_in(fn, "target", target, (torch.int64,))
        if h.dim() < 1 or h.shape[-1] != self.in_features:
            raise ValueError(f"fastloss.{fn}: argument 'h' must have shape (..., {self.in_features}), got {tuple(h.shape)}")
        lead = h.shape[:-1]
        if target.shape == lead:
            target2 = target.reshape(-1, 1)
        elif target.dim() == h.dim() and target.shape[:-1] == lead and target.shape[-1] >= 1:
            target2 = target.reshape(-1, target.shape[-1])
        else:
            raise ValueError(
                f"fastloss.{fn}: argument 'target' must have shape {tuple(lead)} or {tuple(lead)} + (K,), got {tuple(target.shape)}"
            )
        Val.same_device(fn, h=h, target=target, V=self.V)
        L.require_cuda_kernels(fn, h)
        weight2 = None
        if target_weight is not None:
            target_weight = Val.tensor(fn, "target_weight", target_weight)
            Val.dtype_in(fn, "target_weight", target_weight, Val.FLOAT_DTYPES)
            if target_weight.shape != target.shape:
                raise ValueError(
                    f"fastloss.{fn}: argument 'target_weight' must have the target's shape {tuple(target.shape)}, "
                    f"got {tuple(target_weight.shape)}"
                )
            Val.same_device(fn, h=h, target_weight=target_weight)
            weight2 = target_weight.reshape(target2.shape).to(self.state_dtype).contiguous()
        target2 = target2.contiguous()
        if target2.numel() >= 2**31:
            raise ValueError(f"fastloss.{fn}: at most 2**31 - 1 target entries a step, got {target2.numel()}")
        if target2.numel() and (not L.is_cuda(target2) or L.may_inspect_values(target2)):
            bad = ((target2 < 0) | (target2 >= self.num_classes)) & (target2 != self.ignore_index)
            if bool(bad.any()):
                index = int(bad.reshape(-1).nonzero()[0, 0])
                raise ValueError(
                    f"fastloss.{fn}: argument 'target' has out-of-range class index {int(target2.reshape(-1)[index])} "
                    f"at flat position {index}; expected 0 <= target < {self.num_classes} or target == ignore_index "
                    f"({self.ignore_index})"
                )
        return h.reshape(-1, self.in_features), target2, weight2, lead

    # ------------------------------------------------------------------ the update
    @torch.no_grad()
    def _update(self, hs, sh, target, ytilde, scaled, coef, grad_h, grad_scale: float = 1.0) -> None:
        """W <- (1 - lr wd) W - lr grad_scale G h^T in factored form (reference note §1.3, rows form)."""
        d = self.in_features
        m = hs.shape[0]
        if m == 0:
            return
        decay = 1.0 - self.lr * self.weight_decay
        # The step before the decay rescaling: decay * (W - eta G h^T) = decay W - lr grad_scale G h^T.
        eta = self.lr * grad_scale / decay
        two_gq_h = ytilde[:, d + 2 :]
        gq = scaled[:, -1]
        # U^-T <- U^-T (I - X)^-1: Woodbury with X = (h h^T) diag(2 eta gq), m x m, when m <= d, else
        # X = 2 eta P, d x d (see _factored_inverse.py). The guard may raise here, before any change.
        woodbury = self._inverse_path == "woodbury" or (self._inverse_path == "auto" and m <= d)
        if woodbury:
            c = 2.0 * eta * gq
            x = torch.mm(hs, hs.t()).mul_(c.unsqueeze(0))
        else:
            x = torch.mm(hs.t(), two_gq_h).mul_(eta)
        iterations, guard = self._plan_inverse(hs, gq, eta, x, (ytilde, scaled), target)
        power = None
        if woodbury:
            z, power = inverse.solve_near_identity(x, hs, iterations, return_power=True)
            z = z.mul_(c.unsqueeze(1))
        else:
            new_u_inv_t, power = inverse.solve_near_identity(x, self.u_inv_t.t(), iterations, return_power=True)
            new_u_inv_t = new_u_inv_t.t()
        ok = None
        if guard is not None:
            # Guarded on the device: a refused step goes on with every input of the update zeroed (non-finite
            # values included), so each in-place write below adds exact zeros and the rescalings multiply by
            # 1: the state stays bit-identical, with no host read.
            ok = self._finish_device_guard(hs, guard, power)
            hs, sh, ytilde, scaled, coef, grad_h = (torch.where(ok, t, 0.0) for t in (hs, sh, ytilde, scaled, coef,
                                                                                       grad_h))  # fmt: skip
            two_gq_h = ytilde[:, d + 2 :]
            if woodbury:
                z = torch.where(ok, z, 0.0)
            else:
                new_u_inv_t = torch.where(ok, new_u_inv_t, self.u_inv_t)
        if woodbury:
            old_rows = torch.mm(hs, self.u_inv_t.t())  # rows U^-T h_j, before the in-place update below
        # Q <- Q - eta (gradH^T h + h^T gradH) + eta^2 H M H^T, M = G^T G (G = dL/dO, D x m).
        Q = self.Q
        # The m x m-free form needs fewer FLOPs from m ~ 2d, but on an H100 at d = 512, m = 1024 it was
        # slower (0.46 against 0.41 ms a captured step: its d x d GEMMs fill few SMs, plus a sort), so
        # it takes over only from m = 4d.
        order = None  # the entries sorted by class, when a step needs them
        if self._q_update == "gram" or (self._q_update == "auto" and m < 4 * d):
            quad = self._gram_term(hs, sh, target, scaled, grad_h, eta)
            Q.addmm_(hs.t(), quad).addmm_(grad_h.t(), hs, alpha=-eta)
        else:
            order = torch.sort(target.reshape(-1), stable=True).indices
            hmh = self._gram_free_term(hs, sh, target, scaled, ytilde, grad_h, order)
            Q.addmm_(grad_h.t(), hs, alpha=-eta).addmm_(hs.t(), grad_h, alpha=-eta).add_(hmh, alpha=eta * eta)
        # U <- U (I - 2 eta P) = U - eta (U h)^T-rows x (2 gq h);  omega, wbar <- - eta coef^T h.
        self.U.addmm_(sh[:, :d].t(), two_gq_h, alpha=-eta)
        self.packed[d : d + 2].addmm_(coef.t(), hs, alpha=-eta)
        if woodbury:
            self.u_inv_t.addmm_(old_rows.t(), z)
        else:
            self.u_inv_t.copy_(new_u_inv_t)
        # V[C] -= eta ydot (U_new^-T h)^T
        r = torch.mm(hs, self.u_inv_t.t())
        ops.scatter_(self.V, hs, sh, target, scaled, r, eta, self._scatter_order(target, order))
        if decay != 1.0:
            if ok is None:
                self.packed[: d + 2].mul_(decay)
                Q.mul_(decay * decay)
                self.u_inv_t.div_(decay)
            else:
                factor = torch.where(ok, torch.full((), decay, dtype=self.state_dtype, device=ok.device), 1.0)
                self.packed[: d + 2].mul_(factor)
                Q.mul_(factor * factor)
                self.u_inv_t.div_(factor)
        self._after_update(ok)

    def _gram_term(self, hs, sh, target, scaled, grad_h, eta):
        """eta^2 M h - eta gradH (rows), with the m x m M from the kernel: O(m^2 d) (m < 4d)."""
        d = self.in_features
        hg = torch.mm(hs, grad_h.t())
        mh = torch.mm(hs, sh[:, d + 2 :].t())
        gram = ops.gram(hs, sh, self.V, target, scaled, hg, mh)
        return torch.addmm(grad_h, gram, hs, beta=-eta, alpha=eta * eta)

    def _gram_free_term(self, hs, sh, target, scaled, ytilde, grad_h, order):
        """H M H^T without an m x m matrix, O(m d^2 + d^3) (m >= 4d). In rows form, with G H^T =
        R + 1 u^T + 2 W P (R = Ydot H^T, nonzero on the target rows; u = H gs; P = H diag(gq) H^T):
        H M H^T = R^T R + D u u^T + v u^T + u v^T + 4 P Q P + 2 B^T P + 2 P B, where v = H ybar and
        B = W^T R + wbar u^T = Zh H^T, Zh = gradH - 2 Q H diag(gq) (the columns of W^T (Ydot + 1 gs^T))."""
        d = self.in_features
        two_gq_h = ytilde[:, d + 2 :]
        gs, ybar = ytilde[:, d + 1], ytilde[:, d]
        grouped = ops.group(hs, sh, self.V, target, scaled, order)  # the rows of R, one per class (others 0)
        u, v = torch.mv(hs.t(), gs), torch.mv(hs.t(), ybar)
        p = torch.mm(hs.t(), two_gq_h).mul_(0.5)
        zh = torch.addmm(grad_h, two_gq_h, self.Q, alpha=-1.0)
        b_p = torch.mm(torch.mm(zh.t(), hs).t(), p)  # B^T P
        out = torch.mm(grouped.t(), grouped)
        out.addr_(u, u, alpha=float(self.num_classes)).addr_(v, u).addr_(u, v)
        out.addmm_(torch.mm(p, self.Q), p, alpha=4.0)
        out.add_(b_p, alpha=2.0).add_(b_p.t(), alpha=2.0)
        return out

    def _scatter_order(self, target: torch.Tensor, order: torch.Tensor | None) -> torch.Tensor | None:
        """The sorted entries for a deterministic CUDA scatter (reusing ``order`` when the step has it)."""
        if not L.is_cuda(target):
            return None
        deterministic = torch.are_deterministic_algorithms_enabled() if self.deterministic is None else self.deterministic
        if not deterministic:
            return None
        return order if order is not None else torch.sort(target.reshape(-1), stable=True).indices

    def _plan_inverse(self, hs, gq, eta: float, x: torch.Tensor, inputs: tuple, target: torch.Tensor):
        """Checks the step before any state changes and picks the Newton-Schulz iteration count for
        (I - X)^-1 (None: LU). Returns (iterations, guard): guard is None when the step was checked on the
        host (or not at all), else what _finish_device_guard turns into the device flag the update applies.

        On the host (the CPU, or CUDA with fastloss.set_target_checks(True)), from one read: ||X||_F,
        the sum of |inputs| (every value the update reads: non-finite h, target_weight or grad_output
        must not reach the state) and the guard's bound. The guard raises if
        2 eta lambda_max(h^T diag(max(gq, 0)) h) >= 1, an upper bound of the 2 eta lambda_max(h^T diag(gq) h)
        that would make U singular at 1."""
        if L.is_cuda(hs) and not L.may_inspect_values(hs):  # no host read on CUDA
            if self.check_stability:
                return self._device_guard(hs, gq, eta, x, inputs, target)
            torch.maximum(self._unchecked_bound, torch.linalg.matrix_norm(x), out=self._unchecked_bound)
            return (None if self._inverse_method == "lu" else inverse.UNCHECKED_ITERATIONS), None
        if L.is_cuda(hs) and not self.check_stability:
            torch.maximum(self._unchecked_bound, torch.linalg.matrix_norm(x), out=self._unchecked_bound)
            return (None if self._inverse_method == "lu" else inverse.UNCHECKED_ITERATIONS), None
        checks = [torch.linalg.matrix_norm(x), sum(t.abs().sum() for t in inputs)]
        gram = inverse.positive_part_gram(hs, gq, eta) if self.check_stability else None
        if gram is not None:
            checks.append(torch.linalg.matrix_norm(gram))
        values = torch.stack(checks).tolist()
        bound = values[0]
        if not (math.isfinite(bound) and math.isfinite(values[1])):
            raise RuntimeError(
                "fastloss.SphericalOutputLayer: non-finite values in this step (in h, target_weight or the gradient "
                "of the loss); the layer's state is unchanged"
            )
        if gram is not None and not values[2] < 1.0:  # Frobenius >= lambda_max: the exact value only near the edge
            lam = float(torch.linalg.eigvalsh(gram)[-1])
            if not lam < 1.0:
                raise RuntimeError(
                    f"fastloss.SphericalOutputLayer: this step could make U singular: 2 * lr * lambda_max(h^T "
                    f"diag(max(dL/dq, 0)) h) = {lam:.4g} >= 1. Lower lr (now {self.lr}) or the scale of h; the layer's "
                    "state is unchanged"
                )
        if self._inverse_method == "lu":
            return None, None
        return (inverse.iterations_for(bound, hs.dtype) if bound < inverse.MAX_NEWTON_BOUND else None), None

    def _device_guard(self, hs, gq, eta: float, x: torch.Tensor, inputs: tuple, target: torch.Tensor):
        """The guard of _plan_inverse decided on the device, with no host read (CUDA by default, and in
        CUDA-graph capture). Returns (iterations, (reason, lam, bound)): reason 0 when every class index is
        valid, every input finite and the guard's bound of lambda_max < 1 (lambda_max_bound: at most ~1.1x
        the exact value that the host path computes). The Newton-Schulz count is fixed (exact up to
        ||X||_F = MAX_NEWTON_BOUND); _finish_device_guard also refuses a step whose residual it did not
        bring to rounding (the host path takes LU there)."""
        bound = torch.linalg.matrix_norm(x)
        total = sum(t.abs().sum() for t in inputs)
        lam = inverse.lambda_max_bound(inverse.positive_part_gram(hs, gq, eta))
        valid = ((target >= 0) & (target < self.num_classes)) | (target == self.ignore_index)
        reason = torch.where(~valid.all(), 4, torch.where(~(torch.isfinite(bound) & torch.isfinite(total)), 1,
                                                          torch.where(~(lam < 1.0), 2, 0)))  # fmt: skip
        iterations = None if self._inverse_method == "lu" else inverse.device_iterations(hs.dtype)
        return iterations, (reason, lam, bound)

    def _finish_device_guard(self, hs, guard, power) -> torch.Tensor:
        """ok (a device bool) from the guard and the Newton-Schulz residual ||X^(2^(k+1))||_F (power is
        X^(2^k), None after LU); a refused step is reported as a device error."""
        reason, lam, bound = guard
        if power is not None:
            converged = torch.linalg.matrix_norm(torch.mm(power, power)) <= torch.finfo(hs.dtype).eps
            reason = torch.where((reason == 0) & ~converged, 3, reason)
        details = torch.stack([lam.to(torch.float64), bound.to(torch.float64)]).view(torch.int64)
        L.report_device_error_if(hs, _GUARD_CODE, reason, torch.cat([reason.reshape(1).to(torch.int64), details]))
        return reason == 0

    def _after_update(self, ok: torch.Tensor | None = None) -> None:
        self._version += 1
        if ok is None:
            self.steps += 1
        else:
            self.steps += ok.to(self.steps.dtype)  # a skipped step leaves the count too
        self._host_steps += 1  # the schedule reads this copy (steps tried): reading `steps` would sync with the GPU
        if L.is_cuda(self.V) and L.graph_capturing(self.V):
            return  # under CUDA-graph capture: call stabilize() / refresh() outside the graph
        count = self._host_steps
        if self.stabilize_every and count % self.stabilize_every == 0:
            self.stabilize()
        if self.refresh_every and count % self.refresh_every == 0:
            self.refresh()

    @torch.no_grad()
    def _update_distributed(self, hs, target, partials, grad_loss) -> None:
        import torch.distributed as dist

        group = self.process_group
        world = dist.get_world_size(group)
        d, k = self.in_features, target.shape[1]
        floats = torch.cat([hs, partials, grad_loss.unsqueeze(1)], dim=1)
        gathered = [torch.empty_like(floats) for _ in range(world)]
        targets = [torch.empty_like(target) for _ in range(world)]
        dist.all_gather(gathered, floats.contiguous(), group=group)
        dist.all_gather(targets, target, group=group)
        floats = torch.cat(gathered)
        all_target = torch.cat(targets)
        all_h = floats[:, :d].contiguous()
        all_partials = floats[:, d : d + k + 2].contiguous()
        all_grad = floats[:, d + k + 2].contiguous()
        sh = torch.mm(all_h, self.packed.t())
        ytilde, scaled, coef = ops.prepare(all_h, sh, self.V, all_target, all_partials, all_grad)
        grad_h = torch.mm(ytilde, self.packed)
        # The mean of the ranks' gradients: a step of lr / world on the gathered batch.
        self._update(all_h, sh, all_target, ytilde, scaled, coef, grad_h, grad_scale=1.0 / world)

    # ------------------------------------------------------------------ stability control
    @torch.no_grad()
    def stabilize(self) -> dict:
        """Resets the singular values of U outside [0.5, 2] to 1 without changing W, and recomputes U^-T
        from the SVD; unfactorizes when more than d/3 are out of range. Returns what it did."""
        d = self.in_features
        left, sigma, right_t = torch.linalg.svd(self.U)
        out_of_range = (sigma < _STABLE_RANGE[0]) | (sigma > _STABLE_RANGE[1])
        count = int(out_of_range.sum())
        if count > d // 3:
            self.unfactorize()
            return {"reset": 0, "unfactorized": True}
        new_sigma = torch.where(out_of_range, torch.ones_like(sigma), sigma)
        if count:
            # U = A diag(sigma) B^T -> A diag(new) B^T; V absorbs A diag(sigma / new) A^T so that V U is unchanged.
            cols = left[:, out_of_range]
            factor = (sigma[out_of_range] / new_sigma[out_of_range] - 1.0).unsqueeze(0)
            correction = torch.mm(cols * factor, cols.t())
            self._add_to_v(correction)
            self.U.copy_(torch.mm(left * new_sigma.unsqueeze(0), right_t))
        self.u_inv_t.copy_(torch.mm(left / new_sigma.unsqueeze(0), right_t))
        self._version += 1
        return {"reset": count, "unfactorized": False}

    def _add_to_v(self, correction: torch.Tensor, chunk: int = 1 << 16) -> None:
        """V <- V (I + correction), chunked over rows so a float32 V is updated through the state dtype."""
        for start in range(0, self.num_classes, chunk):
            rows = self.V[start : start + chunk]
            rows.copy_(torch.addmm(rows.to(self.state_dtype), rows.to(self.state_dtype), correction))

    @torch.no_grad()
    def unfactorize(self) -> None:
        """V <- V U + 1 omega^T, U = U^-T = I, omega = 0 (W unchanged; O(D d^2)), then refresh Q and wbar."""
        self._add_to_v(self.U - torch.eye(self.in_features, dtype=self.state_dtype, device=self.V.device))
        self.V.add_(self.omega.to(self.V.dtype).unsqueeze(0))
        self._reset_factorization(refresh=True)

    def _reset_factorization(self, refresh: bool) -> None:
        with torch.no_grad():
            eye = torch.eye(self.in_features, dtype=self.state_dtype, device=self.V.device)
            self.U.copy_(eye)
            self.u_inv_t.copy_(eye)
            self.omega.zero_()
        if refresh:
            self.refresh()

    @torch.no_grad()
    def refresh(self, chunk: int = 1 << 16) -> None:
        """Recomputes Q = W^T W and wbar = W^T 1 from V, U and omega (O(D d^2), in the state dtype)."""
        d = self.in_features
        gram = torch.zeros(d, d, dtype=self.state_dtype, device=self.V.device)
        col_sum = torch.zeros(d, dtype=self.state_dtype, device=self.V.device)
        for start in range(0, self.num_classes, chunk):
            rows = self.V[start : start + chunk].to(self.state_dtype)
            gram.addmm_(rows.t(), rows)
            col_sum += rows.sum(0)
        U, omega = self.U, self.omega
        ut_sum = torch.mv(U.t(), col_sum)  # U^T V^T 1
        q = torch.linalg.multi_dot([U.t(), gram, U])
        q += torch.outer(ut_sum, omega) + torch.outer(omega, ut_sum) + self.num_classes * torch.outer(omega, omega)
        self.Q.copy_(q)
        self.wbar.copy_(ut_sum + self.num_classes * omega)
        self._version += 1

    # ------------------------------------------------------------------ evaluation and checks
    @torch.no_grad()
    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """All D outputs W h for h (..., d), in the state dtype: O(D d) per sample."""
        flat = h.reshape(-1, self.in_features).to(self.state_dtype)
        projected = torch.mm(flat, self.U.t())
        out = torch.mm(projected.to(self.V.dtype), self.V.t()).to(self.state_dtype)
        out += torch.mv(flat, self.omega).unsqueeze(1)
        return out.reshape(*h.shape[:-1], self.num_classes)

    @torch.no_grad()
    def topk(self, h: torch.Tensor, k: int, chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
        """The k largest outputs and their classes, computed over chunks of samples."""
        flat = h.reshape(-1, self.in_features)
        values, indices = [], []
        for start in range(0, flat.shape[0], chunk):
            top = self.logits(flat[start : start + chunk]).topk(k, dim=-1)
            values.append(top.values)
            indices.append(top.indices)
        shape = (*h.shape[:-1], k)
        if not values:
            return flat.new_empty(shape, dtype=self.state_dtype), torch.empty(shape, dtype=torch.int64, device=h.device)
        return torch.cat(values).reshape(shape), torch.cat(indices).reshape(shape)

    @torch.no_grad()
    def check(self) -> dict:
        """Relative drift of the invariants: Q vs W^T W, wbar vs W^T 1, U (U^-T)^T vs I (O(D d^2)), and the
        largest residual bound of a U^-T update made without a host read (0 when none was)."""
        w = self.weight
        gram = torch.mm(w.t(), w)
        eye = torch.eye(self.in_features, dtype=self.state_dtype, device=w.device)

        def rel(a, b):
            return float((a - b).norm() / b.norm().clamp(min=torch.finfo(b.dtype).tiny))

        return {
            "q": rel(self.Q, gram),
            "wbar": rel(self.wbar, w.sum(0)),
            "inverse": float((torch.mm(self.U, self.u_inv_t.t()) - eye).norm() / math.sqrt(self.in_features)),
            "unchecked_inverse_residual": float(self._unchecked_bound) ** (2 ** (inverse.UNCHECKED_ITERATIONS + 1)),
        }
