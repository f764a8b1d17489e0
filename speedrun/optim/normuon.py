"""NorMuon as record #89 runs it (spec recipe-frontier.md section 3.2), for a bank of n matrices (n, R, C).

    B <- mu B + (1 - mu) g;   U = (1 - mu) g + mu B        Nesterov momentum in fp32 (B from 0), mu as fp32
    X = polar_express(U)                                   in ns_dtype (bf16 in the record): kernels/polar_express.py
    per row of X (R >= C) or per column (R < C): m = the mean of X^2 over the other axis, and
        S <- beta2 S + (1 - beta2) m                       fp32, from 0, no bias correction
        q = 1 / sqrt(max(S, 1e-10));   X <- X * bf16(q ||X||_F / max(||X q||_F, 1e-10))
      (the same Frobenius norm as Polar Express's output, rows or columns re-weighted by 1/sqrt(EMA))
    P <- P - [X P >= 0] P lam eta - X eta                  cautious decay (>=: also where X = 0) and update
        eta = the matrix's lr (base lr x schedule x shape factor sqrt(max(1, R / C)) x per-matrix factor)
        lam = weight_decay x base lr x schedule (x wd_mul)

P is an fp32 master. For a bf16 parameter it is the parameter's 16 bits followed by 16 more mantissa bits
kept here: after the update the parameter is the master's upper half (truncated, not rounded) and the
lower half is kept for the next step. An fp32 parameter is its own master. A matrix of zeros with a zero
gradient (a bank's padding) gets a zero update and stays zero.
"""

from __future__ import annotations

import numpy as np
import torch


def new_normuon_state(shape: tuple[int, int, int], param_dtype: torch.dtype, device) -> dict:
    """Momentum (n, R, C), second moment (n, R, 1) per row if R >= C else (n, 1, C), and for bf16
    parameters the lower 16 bits of the fp32 master (as int16), all zero."""
    n, rows, cols = shape
    moment_shape = (n, rows, 1) if rows >= cols else (n, 1, cols)
    mantissa = torch.zeros(shape, dtype=torch.int16, device=device) if param_dtype == torch.bfloat16 else None
    return {"momentum": torch.zeros(shape, dtype=torch.float32, device=device),
            "second_moment": torch.zeros(moment_shape, dtype=torch.float32, device=device),
            "mantissa": mantissa}


def nesterov(grad: torch.Tensor, momentum_buffer: torch.Tensor, momentum: float) -> torch.Tensor:
    """B <- mu B + (1 - mu) g (in place); returns (1 - mu) g + mu B. As in the record, mu is an fp32 number
    and 1 - mu is computed in fp32 (Python floats holding those values: no device tensor, no host sync)."""
    mu = np.float32(momentum)
    g = grad.float()
    momentum_buffer.lerp_(g, float(np.float32(1) - mu))
    return g.lerp(momentum_buffer, float(mu))


def normalise_rows_or_columns(X: torch.Tensor, second_moment: torch.Tensor, beta2: float) -> torch.Tensor:
    """NorMuon's second-moment normalisation of X (n, R, C), updating ``second_moment`` in place."""
    axis = -1 if X.size(-2) >= X.size(-1) else -2  # the axis averaged over: per-row statistics if R >= C
    mean_sq = X.float().square().mean(dim=axis, keepdim=True)
    n_reduced = X.size(axis)
    norm = mean_sq.sum(dim=(-2, -1), keepdim=True).mul_(n_reduced).sqrt_()
    second_moment.lerp_(mean_sq, 1 - beta2)
    scale = second_moment.clamp_min(1e-10).rsqrt_()
    new_norm = ((mean_sq * n_reduced) * scale.square()).sum(dim=(-2, -1), keepdim=True).sqrt_()
    factor = scale * (norm / new_norm.clamp_min_(1e-10))
    return X * factor.to(X.dtype)


def master_weights(p: torch.Tensor, mantissa: torch.Tensor | None) -> torch.Tensor:
    """The fp32 master of ``p``: p itself (fp32), or a bf16 p's bits with ``mantissa`` as the lower 16 bits."""
    if mantissa is None:
        return p
    bits = (p.view(torch.int16).to(torch.int32) << 16) | (mantissa.to(torch.int32) & 0xFFFF)
    return bits.view(torch.float32)


def store_master(p: torch.Tensor, mantissa: torch.Tensor | None, master: torch.Tensor) -> None:
    """Write the fp32 ``master`` back: into an fp32 p, or split into a bf16 p (upper half, truncated) and
    ``mantissa`` (lower half)."""
    if mantissa is None:
        if master is not p:
            p.copy_(master)
        return
    bits = master.view(torch.int32)
    p.view(torch.int16).copy_((bits >> 16).to(torch.int16))
    mantissa.copy_(bits.to(torch.int16))


@torch.no_grad()
def normuon_update(p: torch.Tensor, grad: torch.Tensor, state: dict, lr: torch.Tensor, decay: float, momentum: float,
                   beta2: float, polar_express, coeffs, dtype: torch.dtype) -> None:
    """One NorMuon update of the bank slice ``p`` (n, R, C), a view into the parameter (fp32 or bf16), from
    ``grad`` (n, R, C). ``lr`` (n, 1, 1) fp32 holds each matrix's eta; ``decay`` is lam."""
    U = nesterov(grad, state["momentum"], momentum)
    X = polar_express(U, coeffs, dtype=dtype)
    X = normalise_rows_or_columns(X, state["second_moment"], beta2).float()
    master = master_weights(p, state["mantissa"])
    keep = (X * master) >= 0
    new = master - master * keep * decay * lr - X * lr
    store_master(p, state["mantissa"], new)
