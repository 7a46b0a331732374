"""The U^-T update of the factored layer and the stability guard: U_new = U (I - 2 eta P) with
P = h^T diag(gq) h, so U_new^-T = U^-T (I - 2 eta P)^-1.

The inverse is of a matrix near the identity, I - X with X = 2 eta P (d x d) or, by Woodbury,
X = (h h^T) diag(2 eta gq) (m x m, used when m <= d). A dense LU of it is latency-bound on a GPU
(cuSOLVER's getrf takes ~200 us at n = 128 and ~1 ms at n = 512 on an H100, more than the rest of
the step), so it is inverted by Newton-Schulz from the second-order Neumann guess:
    Y_0 = I + X,  Y_{k+1} = Y_k (2I - (I - X) Y_k),  residual I - (I - X) Y_k = X^(2^(k+1)),
two GEMMs an iteration (in the product form of solve_near_identity). With b = ||X||_F known (eager, one host read shared with the guard) the
iteration count is the smallest that makes b^(2^(k+1)) vanish in the state dtype, and b >= 1/2
falls back to LU. Without a host read (CUDA-graph capture, or check_stability=False on CUDA) it runs
a fixed count and records the bound of the residual it left, which ``SphericalOutputLayer.check()``
reports.
"""

from __future__ import annotations

import math

import torch

MAX_NEWTON_BOUND = 0.5  # above this ||X||_F, eager steps use LU instead
UNCHECKED_ITERATIONS = 3  # without a host read (capture, or check_stability=False on CUDA): exact in float64 for ||X||_F <= 0.09 (Z-loss at large D: ~1e-6)


def iterations_for(bound: float, dtype: torch.dtype) -> int:
    """Newton-Schulz iterations k with bound^(2^(k+1)) below the rounding of ``dtype``."""
    if bound <= 0.0:
        return 0
    tolerance = torch.finfo(dtype).eps / 4
    needed = math.log(tolerance) / math.log(bound)  # the power 2^(k+1) must reach this
    return max(0, math.ceil(math.log2(max(needed, 1.0))) - 1)


def solve_near_identity(x: torch.Tensor, rhs: torch.Tensor, iterations: int | None, return_power: bool = False):
    """(I - X)^-1 rhs; ``iterations=None`` means an LU solve.

    Newton-Schulz from Y_0 = I + X has the product form Y_k = (I + X)(I + X^2)(I + X^4)...(I + X^(2^k)),
    applied here to rhs directly: one GEMM for each factor and one to square the power, and no
    elementwise work, which matters in a step that is a chain of small launches. With ``return_power``
    it returns (solution, X^(2^k)), whose square is the residual I - (I - X) Y_k (None for an exact solve)."""
    if iterations is None:
        eye = torch.eye(x.shape[0], dtype=x.dtype, device=x.device)
        solution, _ = torch.linalg.solve_ex(eye - x, rhs)
        return (solution, None) if return_power else solution
    if x.shape[0] == 1:  # Sherman-Morrison: a scalar
        return (rhs / (1.0 - x), None) if return_power else rhs / (1.0 - x)
    z = torch.addmm(rhs, x, rhs)
    power = x
    for _ in range(iterations):
        power = torch.mm(power, power)
        z = torch.addmm(z, power, z)
    return (z, power) if return_power else z


def positive_part_gram(hs: torch.Tensor, gq: torch.Tensor, eta: float) -> torch.Tensor:
    """2 eta G+^(1/2) ... : the smaller of the two symmetric matrices whose top eigenvalue is
    lambda_max(2 eta h^T diag(max(gq, 0)) h) >= lambda_max(2 eta P), the quantity the guard bounds."""
    root = hs * gq.clamp(min=0).sqrt().unsqueeze(1)
    small = torch.mm(root, root.t()) if root.shape[0] <= root.shape[1] else torch.mm(root.t(), root)
    return small.mul_(2.0 * eta)


def lambda_max_bound(gram: torch.Tensor, squarings: int = 5) -> torch.Tensor:
    """An upper bound of lambda_max of a symmetric positive semi-definite matrix, on the device (no
    host read, no solver): lambda_max^(2^j) <= ||G^(2^j)||_F <= sqrt(rank) lambda_max^(2^j), so
    ||G^(2^j)||_F^(1/2^j) is within sqrt(rank)^(1/2^j) of lambda_max (1.10x at rank 512, j = 5).
    Each square is renormalized to Frobenius norm 1, so nothing under- or overflows:
    ||G^(2^j)||_F^(1/2^j) = ||G||_F prod_i n_i^(1/2^i), with n_i the norm of the i-th square."""
    norm = torch.linalg.matrix_norm(gram)
    bound = norm.clone()
    a = gram / norm.clamp(min=torch.finfo(gram.dtype).tiny)
    for i in range(1, squarings + 1):
        a = torch.mm(a, a)
        n = torch.linalg.matrix_norm(a)
        bound = bound * n.pow(0.5**i)
        a = a / n.clamp(min=torch.finfo(gram.dtype).tiny)
    return bound


def device_iterations(dtype: torch.dtype) -> int:
    """The Newton-Schulz count of a guarded step decided on the device: exact in ``dtype`` up to
    ||X||_F = MAX_NEWTON_BOUND (5 for float64, 4 for float32); larger steps are refused there."""
    return iterations_for(MAX_NEWTON_BOUND, dtype)
