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


def solve_near_identity(x: torch.Tensor, rhs: torch.Tensor, iterations: int | None) -> torch.Tensor:
    """(I - X)^-1 rhs; ``iterations=None`` means an LU solve.

    Newton-Schulz from Y_0 = I + X has the product form Y_k = (I + X)(I + X^2)(I + X^4)...(I + X^(2^k)),
    applied here to rhs directly: one GEMM for each factor and one to square the power, and no
    elementwise work, which matters in a step that is a chain of small launches."""
    if iterations is None:
        eye = torch.eye(x.shape[0], dtype=x.dtype, device=x.device)
        solution, _ = torch.linalg.solve_ex(eye - x, rhs)
        return solution
    if x.shape[0] == 1:  # Sherman-Morrison: a scalar
        return rhs / (1.0 - x)
    z = torch.addmm(rhs, x, rhs)
    power = x
    for _ in range(iterations):
        power = torch.mm(power, power)
        z = torch.addmm(z, power, z)
    return z


def positive_part_gram(hs: torch.Tensor, gq: torch.Tensor, eta: float) -> torch.Tensor:
    """2 eta G+^(1/2) ... : the smaller of the two symmetric matrices whose top eigenvalue is
    lambda_max(2 eta h^T diag(max(gq, 0)) h) >= lambda_max(2 eta P), the quantity the guard bounds."""
    root = hs * gq.clamp(min=0).sqrt().unsqueeze(1)
    small = torch.mm(root, root.t()) if root.shape[0] <= root.shape[1] else torch.mm(root.t(), root)
    return small.mul_(2.0 * eta)
