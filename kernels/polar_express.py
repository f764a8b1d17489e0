"""Polar Express orthogonalisation for NorMuon (record #89, spec recipe-frontier.md section 3.2 step 3-4).

The op (every variant has this signature)::

    polar_express(G, coeffs, dtype=torch.bfloat16) -> X

    G       (..., m, n) float tensor, batched over any leading dims (the momentum-corrected gradient)
    coeffs  sequence of (a, b, c), one per iteration (the record's five: OptimConfig.polar_express_coeffs)
    X       (..., m, n) in ``dtype``: approximately U V^T for G = U S V^T

    X = dtype(G);  X = dtype(X / (1.02 ||X||_F + 1e-6))      the norm per matrix, computed in fp32
    per (a, b, c):
        wide (m <= n):  A = X X^T;  B = b A + c A A;  X = a X + B X
        tall (m > n):   A = X^T X;  B = b A + c A A;  X = a X + X B

A and B are computed with fp32 accumulation and stored in ``dtype``. The last line is one fused
matmul-add (one rounding to ``dtype``) for matrices of at most 1024 rows, and for taller ones a matmul
followed by an add (two roundings), as the record computes it. In exact arithmetic the two orientations
agree; the record uses the Gram matrix of the smaller side.

Variants: ``torch`` (the reference, plain PyTorch) and, when Triton imports, ``triton``: A and B are the
Newton-Schulz op's symmetric Triton kernels (kernels/newton_schulz.py: ``xxt_triton``, ``ba_plus_caa_triton``),
the last line stays a cuBLAS matmul.
"""

from __future__ import annotations

import torch

from kernels.common import refuse_backward, triton_usable
from kernels.newton_schulz import VARIANTS as NS_VARIANTS
from kernels.newton_schulz import check_matrices, xxt_torch

NORM_FACTOR = 1.02  # 1 + 2e-2: keeps the spectral norm below 1
NORM_EPS = 1e-6
SPLIT_ROWS = 1024  # matrices with more rows do the last step as two roundings (the record's split_baddbmm)


def check_polar_express_args(G, coeffs, dtype):
    check_matrices(G, dtype)
    coeffs = tuple(tuple(float(v) for v in abc) for abc in coeffs)
    if not coeffs or any(len(abc) != 3 for abc in coeffs):
        raise ValueError(f"coeffs must be a non-empty sequence of (a, b, c) triples, got {coeffs!r}")
    return coeffs


def normalise(G: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """dtype(G) / (1.02 ||dtype(G)||_F + 1e-6), the division in fp32, rounded once to ``dtype``."""
    X = G.to(dtype).float()
    return (X / (X.norm(dim=(-2, -1), keepdim=True) * NORM_FACTOR + NORM_EPS)).to(dtype)


def _gram(X: torch.Tensor, xxt) -> torch.Tensor:
    """The Gram matrix of the smaller side: X X^T (wide) or X^T X (tall)."""
    return xxt(X.mT) if X.size(-2) > X.size(-1) else xxt(X)


def _apply(X: torch.Tensor, B: torch.Tensor, a: float) -> torch.Tensor:
    """a X + B X (wide) or a X + X B (tall), in X's dtype."""
    tall = X.size(-2) > X.size(-1)
    left, right = (X, B) if tall else (B, X)
    if X.size(-2) > SPLIT_ROWS:
        return (left @ right).add_(X, alpha=a)
    if X.dim() == 2:
        return torch.addmm(X, left, right, beta=a)
    shape = X.shape
    X3, l3, r3 = X.reshape(-1, *shape[-2:]), left.reshape(-1, *left.shape[-2:]), right.reshape(-1, *right.shape[-2:])
    return torch.baddbmm(X3, l3, r3, beta=a).reshape(shape)


def _ba_plus_caa_torch(A: torch.Tensor, b: float, c: float) -> torch.Tensor:
    """B = b A + c A A with fp32 accumulation, rounded once to A's dtype."""
    A32 = A.float()
    return (c * (A32 @ A32) + b * A32).to(A.dtype)


def _xxt_fp32_accumulate(X: torch.Tensor) -> torch.Tensor:
    return xxt_torch(X.float()).to(X.dtype)


def polar_express_torch(G, coeffs, dtype=torch.bfloat16):
    """Reference: plain PyTorch (fp32 accumulation for A and B, PyTorch's matmul for the last step)."""
    coeffs = check_polar_express_args(G, coeffs, dtype)
    if G.numel() == 0:
        return G.to(dtype)
    X = normalise(G, dtype)
    for a, b, c in coeffs:
        A = _gram(X, _xxt_fp32_accumulate)
        B = _ba_plus_caa_torch(A, b, c)
        X = _apply(X, B, a)
    return X


VARIANTS = {"torch": polar_express_torch}


if "triton" in NS_VARIANTS:
    from kernels.newton_schulz import ba_plus_caa_triton, xxt_triton

    def polar_express_triton(G, coeffs, dtype=torch.bfloat16):
        """The op with A and B from the symmetric Triton kernels (upper-triangle tiles, mirrored). No gradient:
        differentiating the result raises."""
        coeffs = check_polar_express_args(G, coeffs, dtype)
        if not triton_usable(G.device):
            raise ValueError(f"G is on {G.device}, where the Triton kernels cannot run "
                             "(needs a CUDA GPU, or the CPU with TRITON_INTERPRET=1)")
        if G.numel() == 0:
            return G.detach().to(dtype)
        with torch.no_grad():
            X = normalise(G, dtype)
            for a, b, c in coeffs:
                X = _apply(X, ba_plus_caa_triton(_gram(X, xxt_triton), b, c), a)
        return refuse_backward(G, X, "polar_express (triton variant)")

    VARIANTS["triton"] = polar_express_triton
