"""The lm_head, record #89's logit transform and its multi-token-prediction loss, fused (the record's
FusedSoftcappedCrossEntropy; spec recipe-frontier.md 2.11 and 6).

The op (every variant has this signature)::

    mtp_cross_entropy(x, w, targets, weights, fp8=False) -> loss

    x        (T, d) float32 / bfloat16: one rank's final normed activations
    w        (d, V): the lm_head, stored in x out (logits = x @ w)
    targets  (T,) int64: the next token of every position
    weights  sequence of K floats: the weight of predicting token t+1+k from row t (k < K)
    loss     (T,) fp32: loss_t = sum over k < K with t + k < T of weights[k] * (LSE_t - z_t[targets[t + k]])

    z = 23 sigmoid((x @ w + 5) / 7.5)     the sigmoid rounded to x's dtype (bf16 in the record), z in fp32
    LSE_t = log sum_j exp(z_tj) over all V columns (the vocabulary's padding columns included)

The gradient is the record's, not autograd's: with p_t = softmax(z_t) and S = sum_k weights[k] (the
full sum, also in the last K - 1 rows, which have fewer targets: spec 2.11 item 5), the gradient of row t
w.r.t. its logits is

    grad_out_t * (23 / 7.5) * s (1 - s) * (S p_t - sum_{k < K, t + k < T} weights[k] * onehot(targets[t + k]))

with s the (rounded) sigmoid; then dx = g w^T and dw = x^T g (fp32, cast to x's and w's dtypes).

With ``fp8`` the two matmuls are the record's FP8 ones (spec 2.11 items 1 and 6, x_s = 100/448,
w_s = 1.6/448, grad_s = 0.75/448 x the incoming gradient, which training makes 1/A on every row):
    logits = bf16(x_s w_s (e4m3(x / x_s) e4m3(w / w_s)))
    G8 = e5m2(g / grad_s);  dx = bf16(grad_s w_s G8 e4m3(w / w_s)^T);  dw = x_s grad_s e4m3(x / x_s)^T G8

Variants: ``torch`` (the reference: rows in chunks, so no (T, V) fp32 tensor is ever whole; the backward
recomputes each chunk's logits; FP8 products emulated exactly, kernels/fp8.py).
"""

from __future__ import annotations

import numpy as np
import torch

from kernels.fp8 import scaled_mm, to_e4m3, to_e5m2

SOFTCAP, SHIFT, DIVISOR = 23.0, 5.0, 7.5
ROW_CHUNK = 2048
X_SCALE, W_SCALE, GRAD_SCALE = 100 / 448, 1.6 / 448, 0.75 / 448
XW_SCALE = float(np.float32(X_SCALE) * np.float32(W_SCALE))  # the product of the two fp32 scales, in fp32


def _logits(x: torch.Tensor, w: torch.Tensor, w8: torch.Tensor | None) -> torch.Tensor:
    """x @ w in x's dtype, or with the FP8 weights w8 = e4m3(w / w_s) the record's FP8 product."""
    if w8 is None:
        return x @ w.to(x.dtype)
    return scaled_mm(to_e4m3(x / X_SCALE), w8, XW_SCALE, x.dtype)


def check_mtp_args(x, w, targets, weights):
    for name, t in (("x", x), ("w", w)):
        if not isinstance(t, torch.Tensor) or t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise TypeError(f"{name} must be a float32, float16 or bfloat16 tensor")
    if x.dim() != 2 or w.dim() != 2 or x.size(1) != w.size(0):
        raise ValueError(f"x must be (T, d) and w (d, V), got {tuple(x.shape)} and {tuple(w.shape)}")
    if not isinstance(targets, torch.Tensor) or targets.shape != (x.size(0),) or targets.dtype != torch.int64:
        raise ValueError(f"targets must be an int64 tensor of shape ({x.size(0)},)")
    weights = tuple(float(v) for v in weights)
    if not weights:
        raise ValueError("weights must hold at least one weight")
    return weights


def softcap(logits: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(z, s): s = sigmoid((logits + 5) / 7.5) rounded to ``dtype``, z = 23 s, both returned in fp32."""
    s = torch.sigmoid((logits.float() + SHIFT) / DIVISOR).to(dtype).float()
    return SOFTCAP * s, s


def _predicted(targets: torch.Tensor, rows: slice, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(row indices within the chunk, their columns targets[t + k]) for the rows t of ``rows`` with t + k < T."""
    t = torch.arange(rows.start, min(rows.stop, targets.size(0) - k), device=targets.device)
    return t - rows.start, targets[t + k]


class _MTPCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, targets, weights, fp8):
        T = x.size(0)
        w8 = to_e4m3(w / W_SCALE) if fp8 else None
        loss = torch.zeros(T, dtype=torch.float32, device=x.device)
        for r0 in range(0, T, ROW_CHUNK):
            rows = slice(r0, min(T, r0 + ROW_CHUNK))
            z, _ = softcap(_logits(x[rows], w, w8), x.dtype)
            lse = torch.logsumexp(z, dim=-1)
            chunk = torch.zeros(rows.stop - r0, dtype=torch.float32, device=x.device)
            for k, wk in enumerate(weights):
                i, cols = _predicted(targets, rows, k)
                chunk[i] += wk * (lse[i] - z[i, cols])
            loss[rows] = chunk
        ctx.save_for_backward(x, w, targets)
        ctx.weights, ctx.fp8 = weights, fp8
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        x, w, targets = ctx.saved_tensors
        weights, T = ctx.weights, x.size(0)
        total = sum(weights)
        dx = torch.empty_like(x)
        dw = torch.zeros(w.shape, dtype=torch.float32, device=w.device)
        w32 = w.float()
        w8 = to_e4m3(w / W_SCALE) if ctx.fp8 else None
        grad_s = GRAD_SCALE * grad_out.float().abs().amax()  # the record's grad_scale * 0.75 / 448
        for r0 in range(0, T, ROW_CHUNK):
            rows = slice(r0, min(T, r0 + ROW_CHUNK))
            z, s = softcap(_logits(x[rows], w, w8), x.dtype)
            d = total * torch.softmax(z, dim=-1)
            for k, wk in enumerate(weights):
                i, cols = _predicted(targets, rows, k)
                d.index_put_((i, cols), torch.full_like(cols, -wk, dtype=torch.float32), accumulate=True)
            g = (SOFTCAP / DIVISOR) * s * (1 - s) * d * grad_out[rows, None].float()
            if w8 is None:
                dx[rows] = (g @ w32.T).to(x.dtype)
                dw += x[rows].float().T @ g
            else:
                g8 = to_e5m2(g / grad_s)
                dx[rows] = scaled_mm(g8, w8.T, grad_s * W_SCALE, x.dtype)
                dw += scaled_mm(to_e4m3(x[rows] / X_SCALE).T, g8, grad_s * X_SCALE, torch.float32)
        return dx, dw.to(w.dtype), None, None, None


@torch.compiler.disable  # row chunks in Python: left out of a compiled model's graph
def mtp_cross_entropy_torch(x, w, targets, weights, fp8=False):
    """Reference (see the module docstring)."""
    return _MTPCrossEntropy.apply(x, w, targets, check_mtp_args(x, w, targets, weights), bool(fp8))


VARIANTS = {"torch": mtp_cross_entropy_torch}
