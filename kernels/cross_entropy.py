"""Cross-entropy of softcapped logits.

The op (every variant has this signature)::

    cross_entropy(z, targets, cap=30.0, scale=7.5, ignore_index=-100, reduction="mean") -> loss

    z          (N, V) raw logits (the lm_head output), float32 / float16 / bfloat16
    targets    (N,) int64 class ids in [0, V), or ignore_index
    logits     cap * sigmoid(z / scale)   (= cap/2 * (tanh(z / (2*scale)) + 1)), computed in fp32
    loss       fp32 scalar: the mean (or sum) over non-ignored targets; "none" gives (N,) with 0 at ignored

With reduction "mean" and every target ignored the loss is NaN, as in PyTorch.

Variants: ``torch`` (the reference: materialises the fp32 logits, PyTorch's cross-entropy, autograd) and,
when triton imports, ``triton`` (Liger-Kernel style, below): one kernel computes the per-row loss AND the
gradient w.r.t. z in a single launch, so neither the fp32 logits nor their gradient ever exist in memory.

Triton variant, where it differs from the reference:

* targets outside [0, V) that are not ignore_index: the reference raises; the kernel cannot without a
  host sync, so such a row gets a NaN loss and a NaN gradient row (the loss -- mean, sum or that row of
  "none" -- is NaN, so the bug is loud). Set ``CHECK_TARGETS = True`` (or the environment variable
  SPEEDRUN_CHECK_TARGETS=1) to get the reference's error instead, at the price of a host sync per call.
* z with a non-unit column stride is copied (``.contiguous()``); any row stride is read in place.
* no host sync anywhere (the count of non-ignored targets and the mean's division are device tensor ops),
  so it can be captured in a CUDA graph.
* memory: the forward writes dz into a NEW (N, V) buffer in z's dtype (z itself is never written: the
  caller may still need it); the backward scales that buffer by grad_output in place (in fp32, one more
  rounding to z's dtype) and hands it over as z's gradient, so no second (N, V) buffer is ever allocated.
  The price: dz is rounded to z's dtype before that scaling (exact when grad_output is 1, as in training),
  and no second backward. Every rounding to bf16 is to nearest even, under the CPU interpreter too
  (kernels/triton_rounding.py).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from kernels.common import interpreter_tile, interpreting, new_empty, triton_usable

try:
    import triton
    import triton.language as tl

    from kernels.triton_rounding import round_mantissa
except ImportError:  # no triton: only the reference is registered
    triton = None

REDUCTIONS = ("mean", "sum", "none")

# Debug aid (triton variant): check targets on the host and raise like the reference. Costs a sync.
CHECK_TARGETS = os.environ.get("SPEEDRUN_CHECK_TARGETS", "0") not in ("", "0")


def check_cross_entropy_args(z, targets, cap, scale, reduction):
    if not isinstance(z, torch.Tensor) or z.dim() != 2:
        raise ValueError(f"z must be a 2-D (N, V) tensor, got {getattr(z, 'shape', type(z).__name__)}")
    if z.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"z must be float32, float16 or bfloat16, got {z.dtype}")
    if not isinstance(targets, torch.Tensor) or targets.dtype != torch.int64:
        raise TypeError(f"targets must be an int64 tensor, got {getattr(targets, 'dtype', type(targets).__name__)}")
    if targets.shape != z.shape[:1]:
        raise ValueError(f"targets must have shape (N,) = {tuple(z.shape[:1])}, got {tuple(targets.shape)}")
    if targets.device != z.device:
        raise ValueError(f"z and targets must be on one device, got {z.device} and {targets.device}")
    if not cap > 0 or not scale > 0:
        raise ValueError(f"cap and scale must be positive, got cap={cap}, scale={scale}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def softcap(z: torch.Tensor, cap: float, scale: float) -> torch.Tensor:
    return cap * torch.sigmoid(z.float() / scale)


def cross_entropy_torch(z, targets, cap=30.0, scale=7.5, ignore_index=-100, reduction="mean"):
    """Reference: materialise the fp32 softcapped logits, then PyTorch's cross-entropy."""
    check_cross_entropy_args(z, targets, cap, scale, reduction)
    return F.cross_entropy(softcap(z, cap, scale), targets, ignore_index=ignore_index, reduction=reduction)


VARIANTS = {"torch": cross_entropy_torch}

# Softcapped logits lie in (0, cap), so exp(l - cap) is in (exp(-cap), 1]: with cap <= this bound the
# first sweep can shift by the constant cap instead of a running max -- no overflow (the sum is <= V) and
# no underflow (exp(-80) ~ 1.8e-35 is a normal fp32) -- which drops one block max-reduction and the
# rescale per chunk. Larger caps take the usual online max/logsumexp.
FIXED_SHIFT_MAX_CAP = 80.0


if triton is not None:

    @triton.jit
    def _softcap(zf, cap, inv_scale):
        """l = cap * sigmoid(x) with x = z / scale, on fp32 ``zf``; one exp."""
        x = zf * inv_scale
        e = tl.exp(-tl.abs(x))  # in (0, 1]: never overflows
        r = 1.0 / (1.0 + e)  # sigmoid(|x|)
        return cap * tl.where(x >= 0, r, e * r)

    @triton.jit
    def _softcap_and_grad(zf, cap, inv_scale):
        """(l, dl/dz): dl/dz = cap/scale * sigmoid(x) * sigmoid(-x) = cap/scale * e / (1 + e)^2 with
        e = exp(-|x|). Written this way, not as s * (1 - s), it keeps full relative precision where the
        softcap saturates (1 - s would cancel to 0 or to a rounding error)."""
        x = zf * inv_scale
        e = tl.exp(-tl.abs(x))
        r = 1.0 / (1.0 + e)
        return cap * tl.where(x >= 0, r, e * r), (cap * inv_scale) * e * r * r

    @triton.jit
    def _rounded_for(v, ptr):
        """fp32 ``v`` cast to the element type of ``ptr``, rounded to nearest even (bf16 through
        round_mantissa, since the CPU interpreter's own cast truncates)."""
        if ptr.dtype.element_ty == tl.bfloat16:
            v = round_mantissa(v, 16)
        return v.to(ptr.dtype.element_ty)

    @triton.jit
    def _softcapped_chunk(z_rows, offs, V, cap, inv_scale):
        """Softcapped fp32 logits (rows, len(offs)) of the columns ``offs`` of the rows at ``z_rows``
        (pointers (rows, 1)); columns >= V are -inf."""
        mask = (offs < V)[None, :]
        zf = tl.load(z_rows + offs[None, :], mask=mask, other=0.0)
        return tl.where(mask, _softcap(zf.to(tl.float32), cap, inv_scale), float("-inf"))

    @triton.jit
    def _ce_fwd_kernel(
        z_ptr, z_row_stride,  # (N, V) z, unit column stride
        t_ptr, t_stride,  # (N,) int64 targets
        loss_ptr,  # (N,) fp32 out: per-row loss, 0 at ignored rows
        dz_ptr,  # (N, V) contiguous out, dtype of z: d(reduced loss)/dz for grad_output = 1
        n_valid_ptr,  # () int64: count of non-ignored targets (read only when MEAN and COMPUTE_GRAD)
        V, cap, inv_scale, ignore_index,
        BLOCK_V: tl.constexpr, FIXED_SHIFT: tl.constexpr, COMPUTE_GRAD: tl.constexpr, MEAN: tl.constexpr,
    ):
        cap, inv_scale = tl.cast(cap, tl.float32), tl.cast(inv_scale, tl.float32)  # Inductor may pass floats as fp64
        row = tl.program_id(0).to(tl.int64)  # int64 offsets: N * V exceeds 2^31 at the recipe's shapes
        z_row = z_ptr + row * z_row_stride
        dz_row = dz_ptr + row * V
        cols = tl.arange(0, BLOCK_V)
        t = tl.load(t_ptr + row * t_stride)
        if t == ignore_index:
            tl.store(loss_ptr + row, 0.0)
            if COMPUTE_GRAD:
                zero = tl.zeros((BLOCK_V,), dtype=dz_ptr.dtype.element_ty)
                for start in range(0, V, BLOCK_V):
                    tl.store(dz_row + start + cols, zero, mask=start + cols < V)
        else:
            bad = (t < 0) | (t >= V)
            # sweep 1: logsumexp of the softcapped logits, in fp32 (z kept in L2 for sweep 2)
            if FIXED_SHIFT:
                m = cap
                s = 0.0
                for start in range(0, V, BLOCK_V):
                    offs = start + cols
                    mask = offs < V
                    zf = tl.load(z_row + offs, mask=mask, other=0.0, eviction_policy="evict_last")
                    l = tl.where(mask, _softcap(zf.to(tl.float32), cap, inv_scale), float("-inf"))
                    s += tl.sum(tl.exp(l - cap), axis=0)
            else:
                m = float("-inf")
                s = 0.0
                for start in range(0, V, BLOCK_V):
                    offs = start + cols
                    mask = offs < V
                    zf = tl.load(z_row + offs, mask=mask, other=0.0, eviction_policy="evict_last")
                    l = tl.where(mask, _softcap(zf.to(tl.float32), cap, inv_scale), float("-inf"))
                    m_new = tl.maximum(m, tl.max(l, axis=0))
                    s = s * tl.exp(m - m_new) + tl.sum(tl.exp(l - m_new), axis=0)
                    m = m_new
            lse = m + tl.log(s)
            zt = tl.load(z_row + tl.where(bad, 0, t)).to(tl.float32)
            loss = lse - _softcap(zt, cap, inv_scale)
            tl.store(loss_ptr + row, tl.where(bad, float("nan"), loss))
            # sweep 2, over the row just read (likely still in L2): dz = (softmax(l) - onehot(t)) * dl/dz * gscale
            if COMPUTE_GRAD:
                if MEAN:
                    gscale = 1.0 / tl.load(n_valid_ptr).to(tl.float32)
                else:
                    gscale = 1.0
                gscale = tl.where(bad, float("nan"), gscale)
                for start in range(0, V, BLOCK_V):
                    offs = start + cols
                    mask = offs < V
                    zf = tl.load(z_row + offs, mask=mask, other=0.0, eviction_policy="evict_first")
                    l, dl = _softcap_and_grad(zf.to(tl.float32), cap, inv_scale)
                    p = tl.exp(l - lse)
                    g = (p - tl.where(offs == t, 1.0, 0.0)) * dl * gscale
                    tl.store(dz_row + offs, _rounded_for(g, dz_ptr), mask=mask)

    @triton.jit
    def _ce_fwd_rows_kernel(
        z_ptr, z_row_stride, t_ptr, t_stride, loss_ptr, dz_ptr, n_valid_ptr,  # as in _ce_fwd_kernel
        N, V, cap, inv_scale, ignore_index,
        BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr, FIXED_SHIFT: tl.constexpr, COMPUTE_GRAD: tl.constexpr,
        MEAN: tl.constexpr,
    ):
        """_ce_fwd_kernel on BLOCK_R rows per program ((BLOCK_R, BLOCK_V) tiles), for the CPU interpreter only,
        whose cost is per program and per op, not per element (see kernels.common.INTERPRETER_TILE); the
        GPU always runs _ce_fwd_kernel. Same math row by row; ignored rows are computed and then zeroed
        (no per-row branch), and rows past N read row N - 1 (finite data, no NaN) and are never stored.
        """
        cap, inv_scale = tl.cast(cap, tl.float32), tl.cast(inv_scale, tl.float32)  # as in _ce_fwd_kernel
        rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
        r_ok = rows < N
        rows_in = tl.minimum(rows, N - 1)
        z_rows = z_ptr + rows_in[:, None] * z_row_stride  # (BLOCK_R, 1)
        dz_rows = dz_ptr + rows[:, None] * V
        cols = tl.arange(0, BLOCK_V)
        t = tl.load(t_ptr + rows_in * t_stride)
        ignored = t == ignore_index
        bad = (~ignored) & ((t < 0) | (t >= V))
        if FIXED_SHIFT:
            m = tl.zeros((BLOCK_R,), dtype=tl.float32) + cap
            s = tl.zeros((BLOCK_R,), dtype=tl.float32)
            for start in range(0, V, BLOCK_V):
                offs = start + cols
                l = _softcapped_chunk(z_rows, offs, V, cap, inv_scale)
                s += tl.sum(tl.exp(l - cap), axis=1)
        else:
            m = tl.zeros((BLOCK_R,), dtype=tl.float32) + float("-inf")
            s = tl.zeros((BLOCK_R,), dtype=tl.float32)
            for start in range(0, V, BLOCK_V):
                offs = start + cols
                l = _softcapped_chunk(z_rows, offs, V, cap, inv_scale)
                m_new = tl.maximum(m, tl.max(l, axis=1))  # finite: every row has >= 1 column
                s = s * tl.exp(m - m_new) + tl.sum(tl.exp(l - m_new[:, None]), axis=1)
                m = m_new
        lse = m + tl.log(s)
        zt = tl.load(z_ptr + rows_in * z_row_stride + tl.where(bad | ignored, 0, t)).to(tl.float32)
        loss = tl.where(bad, float("nan"), lse - _softcap(zt, cap, inv_scale))
        tl.store(loss_ptr + rows, tl.where(ignored, 0.0, loss), mask=r_ok)
        if COMPUTE_GRAD:
            if MEAN:  # n_valid = 0 only when every row is ignored, and then gscale is unused
                gscale = 1.0 / tl.maximum(tl.load(n_valid_ptr), 1).to(tl.float32)
            else:
                gscale = 1.0
            gscale = tl.where(bad, float("nan"), tl.where(ignored, 0.0, gscale))  # (BLOCK_R,)
            for start in range(0, V, BLOCK_V):
                offs = start + cols
                mask = (offs < V)[None, :]
                zf = tl.load(z_rows + offs[None, :], mask=mask, other=0.0)
                l, dl = _softcap_and_grad(zf.to(tl.float32), cap, inv_scale)
                p = tl.exp(l - lse[:, None])
                g = (p - tl.where(offs[None, :] == t[:, None], 1.0, 0.0)) * dl * gscale[:, None]
                g = tl.where(ignored[:, None], 0.0, g)  # exactly 0, whatever z holds (even inf / NaN)
                tl.store(dz_rows + offs[None, :], _rounded_for(g, dz_ptr), mask=r_ok[:, None] & mask)

    @triton.jit
    def _ce_scale_rows_kernel(
        dz_ptr,  # (N, V) contiguous, in place: row r times g[r * g_stride]
        g_ptr, g_stride,  # fp32 grad_output: g_stride 0 for one value (mean, sum), else (N,) with that stride
        N, V,
        BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr,
    ):
        """The backward: dz *= grad_output, the product in fp32 rounded once to dz's dtype (PyTorch's
        ``dz.mul_(g)`` would first round g itself to dz's dtype on a GPU). BLOCK_R rows per program: 1 on a
        GPU, more under the CPU interpreter (as _ce_fwd_rows_kernel)."""
        rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
        r_ok = rows < N
        g = tl.load(g_ptr + rows * g_stride, mask=r_ok, other=0.0)
        dz_rows = dz_ptr + rows[:, None] * V
        for start in range(0, V, BLOCK_V):
            offs = start + tl.arange(0, BLOCK_V)
            mask = r_ok[:, None] & (offs < V)[None, :]
            d = tl.load(dz_rows + offs[None, :], mask=mask, other=0.0).to(tl.float32)
            tl.store(dz_rows + offs[None, :], _rounded_for(d * g[:, None], dz_ptr), mask=mask)


def _launch_config(V: int, block_v: int | None) -> tuple[int, int]:
    """(BLOCK_V, num_warps). Not autotuned (autotuning would benchmark inside a CUDA-graph capture) and
    NOT yet timed on a GPU; the reasoning: 4096-wide chunks (13 for V = 50304, the last 1152 wide) at 16
    warps give each thread 8 contiguous elements per chunk (one 16-byte load in bf16), and at most 4
    programs (rows) per SM at full thread occupancy, i.e. ~132 * 4 rows * 100 KB ~ 53 MB of bf16 rows in
    flight on an H100 -- about its L2, so sweep 2 should mostly re-read z from L2, not HBM. Under the CPU
    interpreter the chunk is up to 128 * kernels.common.INTERPRETER_TILE wide (4096 by default, read now)."""
    if block_v is None:
        block_v = min(128 * interpreter_tile() if interpreting() else 4096, max(16, triton.next_power_of_2(V)))
    if block_v < 16 or block_v & (block_v - 1):
        raise ValueError(f"block_v must be a power of two >= 16, got {block_v}")
    return block_v, 1 if interpreting() else 16


def _interpreter_rows(N: int, block_v: int) -> int:
    """Rows per program under the CPU interpreter: (INTERPRETER_TILE / 32)^2 -- 1 at the default tile (the
    GPU's one-row kernel, which the kernel tests thereby check), 64 at 256 (_ce_fwd_rows_kernel) -- but at
    most next_power_of_2(N) and at most 2^18 / block_v (a tile of <= 256K elements; Triton's limit is 2^20)."""
    return max(1, min((interpreter_tile() // 32) ** 2, triton.next_power_of_2(N), 2**18 // block_v))


def cross_entropy_fwd_triton(z, targets, cap, scale, ignore_index, reduction, compute_grad, block_v=None):
    """Host launcher: one program per row (_ce_fwd_kernel); under the CPU interpreter with tiles larger than
    the default (kernels.common.INTERPRETER_TILE, read now), several rows per program (_ce_fwd_rows_kernel).

    Returns ``(loss, dz)``: loss as the op documents (fp32: 0-dim for mean/sum, (N,) for none), and
    dz (N, V) contiguous in z's dtype, the gradient of ``loss`` w.r.t. z for grad_output = 1 (the mean's
    1/count already applied, ignored rows exactly 0), or None when ``compute_grad`` is False (then the
    kernel makes a single sweep). dz is always a new buffer, never z itself (z may still be needed).
    """
    check_cross_entropy_args(z, targets, cap, scale, reduction)
    if not triton_usable(z.device):
        raise ValueError(f"z is on {z.device}: the triton variant needs a CUDA GPU or TRITON_INTERPRET=1")
    N, V = z.shape
    if V == 0:
        raise ValueError("z must have at least one column (V >= 1)")
    if CHECK_TARGETS:  # host sync, on request only
        bad = (targets != ignore_index) & ((targets < 0) | (targets >= V))
        if bool(bad.any()):
            raise ValueError(f"targets must be in [0, {V}) or ignore_index={ignore_index}")
    if z.stride(1) != 1:
        z = z.contiguous()
    BLOCK_V, num_warps = _launch_config(V, block_v)
    n_valid = (targets != ignore_index).sum()  # () int64, on device
    loss = new_empty((N,), torch.float32, z.device)
    dz = new_empty((N, V), z.dtype, z.device) if compute_grad else None
    rows = _interpreter_rows(N, BLOCK_V) if interpreting() else 1
    flags = dict(BLOCK_V=BLOCK_V, FIXED_SHIFT=float(cap) <= FIXED_SHIFT_MAX_CAP, COMPUTE_GRAD=compute_grad,
                 MEAN=reduction == "mean", num_warps=num_warps)
    if N > 0 and rows == 1:
        _ce_fwd_kernel[(N,)](
            z, z.stride(0), targets, targets.stride(0), loss, dz if compute_grad else loss, n_valid,
            V, float(cap), 1.0 / float(scale), int(ignore_index), **flags,
        )
    elif N > 0:  # CPU interpreter with large tiles: several rows per program
        _ce_fwd_rows_kernel[(triton.cdiv(N, rows),)](
            z, z.stride(0), targets, targets.stride(0), loss, dz if compute_grad else loss, n_valid,
            N, V, float(cap), 1.0 / float(scale), int(ignore_index), BLOCK_R=rows, **flags,
        )
    if reduction == "mean":
        loss = loss.sum() / n_valid  # 0/0 = NaN when every target is ignored, as in PyTorch
    elif reduction == "sum":
        loss = loss.sum()
    return loss, dz


def scale_rows_triton(dz, grad_output):
    """dz (N, V) contiguous, scaled in place by ``grad_output`` (0-dim: every row; (N,): one value per row)
    with one rounding to dz's dtype (_ce_scale_rows_kernel). Returns dz."""
    N, V = dz.shape
    g = grad_output.float()
    if N > 0 and V > 0:
        BLOCK_V, num_warps = _launch_config(V, None)
        rows = _interpreter_rows(N, BLOCK_V) if interpreting() else 1
        _ce_scale_rows_kernel[(triton.cdiv(N, rows),)](
            dz, g, g.stride(0) if g.dim() else 0, N, V, BLOCK_R=rows, BLOCK_V=BLOCK_V, num_warps=num_warps)
    if not torch.compiler.is_compiling():  # what mul_ would do: a saved dz now reads as modified in place
        torch.autograd.graph.increment_version(dz)
    return dz


class CrossEntropyTriton(torch.autograd.Function):
    """Forward: the fused kernel (loss and dz in one launch; dz saved for backward).

    Backward recomputes nothing: it scales the saved dz by grad_output (a 0-dim tensor for mean/sum,
    (N,) per row for none) IN PLACE and returns it as z's gradient, so the op holds one (N, V) buffer in
    z's dtype from forward to backward and backward allocates nothing. Consequences: dz is rounded to z's
    dtype before the scaling (exact when grad_output is 1, the training case), and a second backward
    through the same graph (retain_graph=True) raises PyTorch's "modified by an inplace operation" error
    instead of returning a doubly-scaled gradient. No double backward. Tensors: z (N, V) and dz (N, V) in
    z's dtype; targets (N,) int64; loss and grad_output fp32, 0-dim (mean/sum) or (N,) (none).
    """

    @staticmethod
    def forward(ctx, z, targets, cap, scale, ignore_index, reduction, block_v, compute_grad):
        loss, dz = cross_entropy_fwd_triton(z, targets, cap, scale, ignore_index, reduction, compute_grad, block_v)
        ctx.reduction = reduction
        if dz is not None:
            ctx.save_for_backward(dz)
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        (dz,) = ctx.saved_tensors
        scale_rows_triton(dz, grad_output)
        return dz, None, None, None, None, None, None, None


def cross_entropy_triton(z, targets, cap=30.0, scale=7.5, ignore_index=-100, reduction="mean"):
    """Fused softcapped cross-entropy (the op's signature; see the module docstring).

    Fused: softcap (cap * sigmoid(z / scale), fp32), logsumexp over V, the target's logit, the loss and
    dloss/dz -- one kernel, one program per row, looping over V in BLOCK_V chunks twice: sweep 1 the
    logsumexp, sweep 2 (over the row just read, likely still in L2) the gradient
    (softmax(l) - onehot(target)) * (cap/scale) * sigmoid(z/scale) * sigmoid(-z/scale), stored in z's
    dtype. Memory: z is read twice, dz written once; no (N, V) fp32 intermediate.
    """
    return _cross_entropy_triton(z, targets, cap, scale, ignore_index, reduction)


def _cross_entropy_triton(z, targets, cap=30.0, scale=7.5, ignore_index=-100, reduction="mean", block_v=None):
    """cross_entropy_triton with the chunk width exposed (tests use small chunks to exercise the loop)."""
    check_cross_entropy_args(z, targets, cap, scale, reduction)
    # decided here: inside forward grad mode is always off, and needs_input_grad ignores torch.no_grad
    compute_grad = z.requires_grad and torch.is_grad_enabled()
    return CrossEntropyTriton.apply(z, targets, cap, scale, ignore_index, reduction, block_v, compute_grad)


if triton is not None:
    VARIANTS["triton"] = cross_entropy_triton
