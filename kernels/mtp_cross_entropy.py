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

``weights`` may also be a 1-D fp32 tensor of the K weights on x's device: the Triton variant reads it from
device memory, so weights that change every step (the schedule's) cost neither a recompile nor a sync.

Variants: ``torch`` (the reference: rows in chunks, so no (T, V) fp32 tensor is ever whole; the backward
recomputes each chunk's logits; FP8 products emulated exactly, kernels/fp8.py) and, when Triton imports,
``triton`` (the record's design, below).

Triton variant: the head matmul is a library call (x @ w, or for ``fp8`` torch._scaled_mm with fast
accumulation, as the record's); one kernel then reads each row's logits twice (the LSE, then the gradient)
and writes the row's loss and its gradient G for grad_out = 1, in the forward pass, without a host sync.
G is stored in x's dtype, or for ``fp8`` as the record's e5m2(g / (0.75/448)) (spec 2.11 item 5). The
backward scales G's rows by grad_out (in place) and runs the two matmuls. Where it differs from the
reference:

* bf16/fp16: G is rounded to x's dtype before dx = G w^T and dw = x^T G (the reference keeps it in fp32);
  the tests hold dx and dw to 2x the reference's own error against fp64.
* fp8: exact (up to fp32 summation order) when grad_out is one value c for every row, as in training
  (grad_scale): e5m2(G8 * c / |c|) = +-G8. Other grad_outs round twice (G8, then G8 * grad_out_t / max|.|).
* a target outside [0, V) gives that row a NaN loss and NaN gradient (no host sync to raise).
"""

from __future__ import annotations

import numpy as np
import torch

from kernels.common import interpreter_block, interpreting, new_empty, triton_usable
from kernels.fp8 import scaled_mm, scaled_mm_fast, to_e4m3, to_e5m2

try:
    import triton
    import triton.language as tl

    from kernels.triton_rounding import round_e5m2, round_mantissa
except ImportError:  # no triton: only the reference is registered
    triton = None

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
    if isinstance(weights, torch.Tensor):
        if weights.dim() != 1 or not 1 <= weights.numel() <= 3 or weights.dtype != torch.float32:
            raise ValueError(f"weights as a tensor must be 1-D fp32 with 1 to 3 entries, got {tuple(weights.shape)} "
                             f"{weights.dtype}")
        if weights.device != x.device:
            raise ValueError(f"weights must be on x's device ({x.device}), got {weights.device}")
        return weights
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
    weights = check_mtp_args(x, w, targets, weights)
    if isinstance(weights, torch.Tensor):
        weights = tuple(weights.tolist())  # a host read: the reference is not a kernel
    return _MTPCrossEntropy.apply(x, w, targets, weights, bool(fp8))


VARIANTS = {"torch": mtp_cross_entropy_torch}


# ------------------------------------------------------------------------------------------------------
# Triton variant (see the module docstring).
#
#   forward   u   = x @ w  (or the FP8 product)       library matmul, x's dtype              (T, V)
#             loss, G = _mtp_ce_kernel(u, targets)    two sweeps over each row's u           (T,), (T, V)
#   saved     x, w, G
#   backward  G  *= grad_out (per row; fp8: requantised, the identity for a uniform grad_out)
#             dx = G @ w^T,  dw = x^T @ G             library matmuls (fp8: torch._scaled_mm)
# ------------------------------------------------------------------------------------------------------

if triton is not None:

    # Roundings are done on the fp32 bits (kernels/triton_rounding.py), then cast exactly.

    @triton.jit
    def _capped(u, ROUND_BF16: tl.constexpr):
        """s = sigmoid((u + 5) / 7.5) in fp32, rounded to bf16 when asked (x's dtype, as the reference)."""
        s = 1.0 / (1.0 + tl.exp(-((u + 5.0) / 7.5)))
        if ROUND_BF16:
            s = round_mantissa(s, 16)
        return s

    @triton.jit
    def _mtp_ce_kernel(
        u_ptr, g_ptr,  # (T, V) logits in x's dtype; (T, V) out: the gradient for grad_out = 1, times g_mul
        targets_ptr, weights_ptr, loss_ptr,  # (T,) int64; (K,) fp32; (T,) fp32 out
        T, V, g_mul,
        K: tl.constexpr, ROUND_BF16: tl.constexpr, G_FORMAT: tl.constexpr,
        BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr,
    ):
        """BLOCK_R rows per program. Softcapped logits lie in (0, 23): the LSE shifts by the constant 23 (no
        running max). Rows past T read row T - 1 and are never stored."""
        g_mul = tl.cast(g_mul, tl.float32)  # Inductor may pass floats as fp64
        rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
        r_ok = rows < T
        rows_in = tl.minimum(rows, T - 1)
        u_rows = u_ptr + rows_in[:, None] * V  # (BLOCK_R, 1)
        cols = tl.arange(0, BLOCK_V)

        # sweep 1: LSE_t = 23 + log sum_j exp(z_tj - 23)
        acc = tl.zeros((BLOCK_R, BLOCK_V), tl.float32)
        for start in range(0, V, BLOCK_V):
            offs = start + cols
            mask = (offs < V)[None, :]
            u = tl.load(u_rows + offs[None, :], mask=mask, other=0.0).to(tl.float32)
            acc += tl.where(mask, tl.exp(23.0 * _capped(u, ROUND_BF16) - 23.0), 0.0)
        lse = 23.0 + tl.log(tl.sum(acc, axis=1))  # (BLOCK_R,)

        # the loss: row t predicts targets[t + k] for k < K while t + k < T; S = sum_k w_k (all of them)
        loss = tl.zeros((BLOCK_R,), tl.float32)
        total = 0.0
        bad = rows < 0  # all False
        for k in tl.static_range(K):
            wk = tl.load(weights_ptr + k)
            total += wk
            has = rows_in + k < T
            y = tl.load(targets_ptr + rows_in + k, mask=has, other=0)
            bad |= has & ((y < 0) | (y >= V))
            u_y = tl.load(u_ptr + rows_in * V + tl.where((y >= 0) & (y < V), y, 0)).to(tl.float32)
            loss += tl.where(has, wk * (lse - 23.0 * _capped(u_y, ROUND_BF16)), 0.0)
        tl.store(loss_ptr + rows, tl.where(bad, float("nan"), loss), mask=r_ok)

        # sweep 2: g = (23 / 7.5) s (1 - s) (S softmax(z) - sum_k w_k onehot(targets[t + k]))
        g_rows = g_ptr + rows[:, None] * V
        nan_rows = tl.where(bad, float("nan"), 0.0)[:, None]
        for start in range(0, V, BLOCK_V):
            offs = start + cols
            mask = (offs < V)[None, :]
            u = tl.load(u_rows + offs[None, :], mask=mask, other=0.0).to(tl.float32)
            s = _capped(u, ROUND_BF16)
            d = total * tl.exp(23.0 * s - lse[:, None])
            for k in tl.static_range(K):
                has = rows_in + k < T
                y = tl.load(targets_ptr + rows_in + k, mask=has, other=-1)
                d -= tl.where((offs[None, :] == y[:, None]) & has[:, None], tl.load(weights_ptr + k), 0.0)
            g = (23.0 / 7.5) * s * (1.0 - s) * d * g_mul + nan_rows
            if G_FORMAT == 1:  # bf16
                g = round_mantissa(g, 16)
            elif G_FORMAT == 2:  # e5m2 (|g| * g_mul < 1000: no saturation)
                g = round_e5m2(g)
            tl.store(g_rows + offs[None, :], g.to(g_ptr.dtype.element_ty), mask=mask & r_ok[:, None])

    G_FORMATS = {torch.float32: 0, torch.bfloat16: 1, torch.float8_e5m2: 2}

    def _launch_mtp_ce(u: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor, g_dtype: torch.dtype,
                       g_mul: float):
        """(loss (T,) fp32, G (T, V) in g_dtype, times g_mul) for contiguous logits u (T, V) in x's dtype
        (fp32 or bf16: s is rounded to it)."""
        T, V = u.shape
        loss = new_empty((T,), torch.float32, u.device)
        g = new_empty((T, V), g_dtype, u.device)
        if T == 0:
            return loss, g
        if interpreting():  # tile sizes from kernels.common.INTERPRETER_TILE (its cost is per program)
            block_r, block_v, warps = interpreter_block(T), interpreter_block(V), 4
        else:  # one row per program, as the record's kernel; the row's 100 KB of bf16 logits stay in L2
            block_r, block_v, warps = 1, 2048, 8
        _mtp_ce_kernel[(triton.cdiv(T, block_r),)](
            u, g, targets, weights, loss, T, V, g_mul,
            K=weights.numel(), ROUND_BF16=u.dtype == torch.bfloat16, G_FORMAT=G_FORMATS[g_dtype],
            BLOCK_R=block_r, BLOCK_V=block_v, num_warps=warps,
        )
        return loss, g

    class _MTPCrossEntropyTriton(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, w, targets, weights, fp8):
            if fp8:
                w8 = to_e4m3(w / W_SCALE)
                x8 = to_e4m3(x / X_SCALE)
                u = scaled_mm_fast(x8, w8, torch.tensor(XW_SCALE, device=x.device), x.dtype, fast_accum=True)
                loss, g = _launch_mtp_ce(u, targets, weights, torch.float8_e5m2, 1 / GRAD_SCALE)
                ctx.save_for_backward(x8, w8, g)
            else:
                u = (x @ w.to(x.dtype)).contiguous()
                loss, g = _launch_mtp_ce(u, targets, weights, x.dtype, 1.0)
                ctx.save_for_backward(x, w, g)
            ctx.fp8, ctx.x_dtype, ctx.w_dtype = fp8, x.dtype, w.dtype
            return loss

        @staticmethod
        def backward(ctx, grad_out):
            a, b, g = ctx.saved_tensors
            go = grad_out.float()
            if ctx.fp8:  # a = e4m3(x / x_s), b = e4m3(w / w_s), g = e5m2(G / (0.75 / 448))
                peak = go.abs().amax()
                factor = torch.where(peak > 0, go / peak, torch.zeros_like(go))  # +-1 for a uniform grad_out
                g8 = torch.empty_like(g)
                for r0 in range(0, g.size(0), ROW_CHUNK):
                    g8[r0:r0 + ROW_CHUNK] = to_e5m2(g[r0:r0 + ROW_CHUNK].float() * factor[r0:r0 + ROW_CHUNK, None])
                grad_s = GRAD_SCALE * peak
                dx = scaled_mm_fast(g8, b.t(), grad_s * W_SCALE, ctx.x_dtype)
                dw = scaled_mm_fast(a.t(), g8, grad_s * X_SCALE, torch.float32)
                return dx, dw.to(ctx.w_dtype), None, None, None
            g.mul_(go[:, None].to(g.dtype))  # G is this backward's own: scaled in place
            x, w = a, b
            dx = g @ w.to(g.dtype).t()
            dw = x.to(g.dtype).t() @ g
            return dx.to(ctx.x_dtype), dw.to(ctx.w_dtype), None, None, None

    def mtp_cross_entropy_triton(x, w, targets, weights, fp8=False):
        """The Triton variant (see the module docstring); ``weights`` best as an fp32 device tensor."""
        weights = check_mtp_args(x, w, targets, weights)
        if x.dtype not in (torch.float32, torch.bfloat16):
            raise TypeError(f"the Triton variant takes float32 or bfloat16 x (the recipe's), got {x.dtype}")
        if not triton_usable(x.device):
            raise ValueError(f"x is on {x.device}, where the Triton kernels cannot run "
                             "(needs a CUDA GPU, or the CPU with TRITON_INTERPRET=1)")
        if not isinstance(weights, torch.Tensor):
            weights = torch.tensor(weights, dtype=torch.float32, device=x.device)
        if len(weights) > 3:
            raise ValueError(f"the Triton variant takes 1 to 3 weights, got {len(weights)}")
        return _MTPCrossEntropyTriton.apply(x, w, targets.contiguous(), weights.contiguous(), bool(fp8))

    VARIANTS["triton"] = mtp_cross_entropy_triton
