"""Newton-Schulz orthogonalisation for Muon.

The op (every variant has this signature)::

    newton_schulz(G, steps=5, coeffs=(3.4445, -4.7750, 2.0315), eps=1e-7, dtype=torch.bfloat16) -> X

    G      (..., m, n) float tensor, batched over any leading dims
    X      (..., m, n) in ``dtype``: approximately U V^T for G = U S V^T, singular values in ~[0.5, 1.5]

Each step, on the wide orientation (m <= n, transposing when m > n), with X normalised to unit
Frobenius norm per matrix first:  A = X X^T;  B = b A + c A A;  X = a X + B X.
The building blocks, which the Triton variant implements as kernels, are ``xxt`` (A = X X^T) and
``ba_plus_caa`` (B = b A + c A A for symmetric A).
"""

from __future__ import annotations

import torch

DEFAULT_COEFFS = (3.4445, -4.7750, 2.0315)


def check_newton_schulz_args(G, steps, dtype):
    if not isinstance(G, torch.Tensor):
        raise TypeError(f"G must be a torch.Tensor, got {type(G).__name__}")
    if G.dim() < 2:
        raise ValueError(f"G must have at least 2 dims (..., m, n), got shape {tuple(G.shape)}")
    if not G.dtype.is_floating_point:
        raise TypeError(f"G must be a floating-point tensor, got {G.dtype}")
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
    if not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be a non-negative int, got {steps!r}")


def xxt_torch(X: torch.Tensor) -> torch.Tensor:
    """A = X X^T for X (..., m, n)."""
    return X @ X.mT


def ba_plus_caa_torch(A: torch.Tensor, b: float, c: float) -> torch.Tensor:
    """B = b A + c A A for symmetric A (..., m, m)."""
    return b * A + c * (A @ A)


def newton_schulz_torch(G, steps=5, coeffs=DEFAULT_COEFFS, eps=1e-7, dtype=torch.bfloat16):
    """Reference: plain batched matmuls in ``dtype``."""
    check_newton_schulz_args(G, steps, dtype)
    a, b, c = coeffs
    X = G.to(dtype)
    tall = X.size(-2) > X.size(-1)
    if tall:
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + eps)
    for _ in range(steps):
        A = xxt_torch(X)
        B = ba_plus_caa_torch(A, b, c)
        X = a * X + B @ X
    return X.mT if tall else X


VARIANTS = {"torch": newton_schulz_torch}
