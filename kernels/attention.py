"""Document-causal, block-windowed attention for packed sequences.

The op (every variant has this signature)::

    attention(q, k, v, doc_ids, window_blocks, scale, block_size=128) -> out

    q, k, v        (B, T, H, D) float32 / float16 / bfloat16, same dtype and device (float64: reference only)
    doc_ids        (B, T) int32, non-decreasing along T: the document each token belongs to
                   (the running count of <|endoftext|> tokens up to and including the token)
    window_blocks  int, or a 0-dim integer tensor (so a growing window never forces a recompile):
                   the window in blocks of ``block_size`` tokens; 0 behaves as 1
    scale          softmax scale (the recipe uses 0.12)
    out            (B, T, H, D), dtype of q

The mask: query token i may attend key token j iff

    j <= i  and  doc(j) == doc(i)  and  j // block_size >= i // block_size - max(window_blocks, 1) + 1

This is exactly the recipe's block-sparse rule (spec: "Mask"), derived as follows. For a query block Q
the recipe keeps the nearest min(n_full, w-1) "full" key blocks (K < Q, K and Q inside one document) and
the nearest min(n_partial, max(1, w - n_full)) "partial" ones (every other block overlapping Q's
documents, the diagonal included). Because documents are contiguous, the full blocks form a contiguous
run just before Q and the partial ones are Q itself plus, for a single-document Q, the one block where
that document starts; for a multi-document Q every candidate is partial. In every case the kept blocks
are the contiguous range [max(first candidate, Q - w + 1), Q], and the token rule inside kept blocks
then makes the first-candidate bound redundant. So the rule above is the recipe's mask, token for token.

Triton variant (``attention_triton``): flash attention, forward and backward, O(T * window) work and no
T x T matrix in memory. The kernels are in kernels/attention_kernels.py.

    layouts   q, k, v: any (B, T, H, D) strides with a unit stride on D (e.g. views of a packed qkv tensor);
              a non-unit D stride is copied with .contiguous(). The output and dq, dk, dv are contiguous.
    dtypes    float16 / bfloat16 (fp32 accumulation; P and dS are rounded to the input dtype before their
              matmuls, as in every flash attention), float32 (exact fp32 matmuls, input_precision="ieee").
              bfloat16 is refused under the CPU interpreter, where its tl.dot is wrong.
    head dim  64 or 128.
    doc_ids   must be non-decreasing along T (not checked: that needs a host sync; set CHECK_DOC_IDS = True
              to check). Per-token document start/end indices are derived from it with torch ops (no sync).
    window    int or integer tensor (any device, one element); moved to a 0-dim int32 device tensor clamped
              to [1, T // block_size + 1] with device ops, and read by the kernels from memory: changing it
              neither recompiles nor syncs. (A negative tensor value behaves as 1, as in the reference.)

Fused: forward = QK^T, mask, online softmax, PV in one kernel; it writes out and the log-sum-exp
LSE (B, H, T) fp32, saved for the backward with q, k, v, out. Backward: a preprocess kernel
(delta = rowsum(dO * out), (B, H, T) fp32), a dK/dV kernel (one program per key tile, looping over the
query tiles that see it) and a dQ kernel (one program per query tile, looping over its key tiles); both
recompute P = exp(scale * QK^T - LSE) tile by tile with the forward's mask. No atomics.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.common import compile_static, interpreter_block, interpreting, new_empty, triton_usable

try:
    import triton

    from kernels import attention_kernels as _k
except ImportError:  # no Triton: only the torch variant
    triton = None

# When True the triton launcher checks that doc_ids is non-decreasing (a host sync); off by default.
CHECK_DOC_IDS = False
HEAD_DIMS = (64, 128)  # head dims the triton kernels are built for


def check_attention_args(q, k, v, doc_ids, window_blocks, block_size):
    """Validate the op's inputs; raises ValueError/TypeError naming the argument."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must have shape (B, T, H, D), got {tuple(t.shape)}")
        if t.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
            raise TypeError(f"{name} must be float32, float16 or bfloat16 (float64: reference only), got {t.dtype}")
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k, v shapes differ: {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if not isinstance(doc_ids, torch.Tensor) or doc_ids.dtype not in (torch.int32, torch.int64):
        raise TypeError("doc_ids must be an int32 or int64 tensor")
    if k.device != q.device or v.device != q.device or doc_ids.device != q.device:
        raise ValueError(f"q, k, v, doc_ids must be on one device, got {q.device}, {k.device}, "
                         f"{v.device}, {doc_ids.device}")
    if doc_ids.shape != q.shape[:2]:
        raise ValueError(f"doc_ids must have shape (B, T) = {tuple(q.shape[:2])}, got {tuple(doc_ids.shape)}")
    if isinstance(window_blocks, torch.Tensor):
        if window_blocks.numel() != 1 or window_blocks.dtype.is_floating_point:
            raise TypeError("window_blocks tensor must be a single integer element")
    elif not isinstance(window_blocks, int) or isinstance(window_blocks, bool):
        raise TypeError(f"window_blocks must be an int or an integer tensor, got {type(window_blocks).__name__}")
    elif window_blocks < 0:
        raise ValueError(f"window_blocks must be >= 0, got {window_blocks}")
    if not isinstance(block_size, int) or block_size <= 0:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")


def attention_mask(doc_ids: torch.Tensor, window_blocks, block_size: int, q_start: int = 0,
                   q_end: int | None = None, k_start: int = 0, k_end: int | None = None) -> torch.Tensor:
    """Boolean mask (B, q_end - q_start, k_end - k_start) of the rule in the module docstring."""
    T = doc_ids.shape[1]
    q_end = T if q_end is None else q_end
    k_end = T if k_end is None else k_end
    w = max(int(window_blocks), 1)
    qi = torch.arange(q_start, q_end, device=doc_ids.device)[:, None]
    kj = torch.arange(k_start, k_end, device=doc_ids.device)[None, :]
    allowed = (kj <= qi) & (kj // block_size >= qi // block_size - w + 1)
    same_doc = doc_ids[:, q_start:q_end, None] == doc_ids[:, None, k_start:k_end]
    return allowed[None] & same_doc


def attention_torch(q, k, v, doc_ids, window_blocks, scale, block_size=128, query_chunk=2048):
    """Reference: fp32 math (fp64 for float64 inputs) on a materialised mask, in query chunks so memory is
    O(T * window). fp32 goes through F.scaled_dot_product_attention with that boolean mask (every row keeps
    its diagonal, so no row is empty); float64 is spelled out as matmul, masked_fill, softmax, matmul.

    Only the keys a chunk can see (its window, block-granular) are materialised, so this also runs the
    real preset's 64K-token sequences. Reads ``window_blocks`` on the host (a sync): a reference, not a
    kernel.
    """
    check_attention_args(q, k, v, doc_ids, window_blocks, block_size)
    B, T, H, D = q.shape
    w = max(int(window_blocks), 1)
    ct = torch.float64 if q.dtype == torch.float64 else torch.float32
    qf, kf, vf = (t.to(ct).transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
    outs = []
    for q0 in range(0, T, query_chunk):
        q1 = min(T, q0 + query_chunk)
        k0 = max(0, (q0 // block_size - w + 1) * block_size)
        mask = attention_mask(doc_ids, w, block_size, q0, q1, k0, q1)  # (B, q, k)
        if ct == torch.float64:  # spelled out: the fp64 ground truth the tests compare every variant with
            s = torch.matmul(qf[:, :, q0:q1], kf[:, :, k0:q1].transpose(-1, -2)) * scale
            s = s.masked_fill(~mask[:, None], float("-inf"))
            outs.append(torch.matmul(torch.softmax(s, dim=-1), vf[:, :, k0:q1]))
        else:  # the same math through PyTorch's fused attention: ~3x faster on CPU for the tiny preset
            outs.append(F.scaled_dot_product_attention(qf[:, :, q0:q1], kf[:, :, k0:q1], vf[:, :, k0:q1],
                                                       attn_mask=mask[:, None], scale=scale))
    return torch.cat(outs, dim=2).transpose(1, 2).to(q.dtype)


def attention_sdpa(q, k, v, doc_ids, window_blocks, scale, block_size=128):
    """What plain PyTorch offers: F.scaled_dot_product_attention in the inputs' dtype on the full
    materialised (B, 1, T, T) boolean mask. O(T^2) memory (2 GiB of mask per 46K-token row); reads
    ``window_blocks`` on the host. The output is a (B, T, H, D) view of SDPA's (B, H, T, D) result."""
    check_attention_args(q, k, v, doc_ids, window_blocks, block_size)
    mask = attention_mask(doc_ids, window_blocks, block_size)[:, None]
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=mask, scale=scale)
    return out.transpose(1, 2)


_compiled_flex = None


def attention_flex(q, k, v, doc_ids, window_blocks, scale, block_size=128):
    """PyTorch's flex_attention with the mask as a ``mask_mod`` and a BlockMask built for each call (the
    doc ids change every batch, as in training). On CUDA both flex_attention and the BlockMask are
    compiled (the only way flex_attention is fast). Registered only where CUDA is (PyTorch has no CPU
    backward for it). ``window_blocks`` stays on the device (no sync)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    global _compiled_flex
    check_attention_args(q, k, v, doc_ids, window_blocks, block_size)
    B, T, H, D = q.shape
    window = torch.as_tensor(window_blocks, device=q.device).reshape(()).clamp(min=1)
    docs = doc_ids.to(torch.int32)

    def mask_mod(b, h, qi, kj):
        same_doc = docs[b, qi] == docs[b, kj]
        return (kj <= qi) & same_doc & (kj // block_size >= qi // block_size - window + 1)

    if _compiled_flex is None:
        _compiled_flex = compile_static(flex_attention)
    block_mask = create_block_mask(mask_mod, B, None, T, T, device=q.device, _compile=True)
    out = _compiled_flex(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=block_mask, scale=scale)
    return out.transpose(1, 2)


VARIANTS = {"torch": attention_torch, "sdpa": attention_sdpa}
if torch.cuda.is_available():  # flex_attention has no CPU backward
    VARIANTS["flex"] = attention_flex

def _doc_bounds(doc_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(doc_start, doc_end), (B, T) int32 contiguous: first index of each token's document and one past its
    last, for non-decreasing doc_ids. Torch ops only (no host sync)."""
    B, T = doc_ids.shape
    idx = torch.arange(T, device=doc_ids.device).expand(B, T)
    change = doc_ids[:, 1:] != doc_ids[:, :-1]  # (B, T - 1): a new document starts at t + 1
    first = torch.cat([torch.ones_like(doc_ids[:, :1], dtype=torch.bool), change], 1)
    last = torch.cat([change, torch.ones_like(doc_ids[:, :1], dtype=torch.bool)], 1)
    start = torch.where(first, idx, 0).cummax(1).values
    end = torch.where(last, idx + 1, T).flip(1).cummin(1).values.flip(1)
    return start.to(torch.int32).contiguous(), end.to(torch.int32).contiguous()


def _tiles(kernel: str, head_dim: int, dtype: torch.dtype, T: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of ``kernel`` ("fwd", "dkdv", "dq") for sequences of T tokens.
    BLOCK_M tiles queries, BLOCK_N keys. Not autotuned (autotuning would benchmark inside a CUDA-graph
    capture). The GPU choices were checked only by compiling for sm_90 and sm_80 without a GPU: 16-bit
    configs use <= 66 KB of shared memory and 196-255 registers with no spills on sm_90 (the D=128 forward:
    8 bytes); they are untimed. Under the CPU interpreter: t = kernels.common.INTERPRETER_TILE (read now,
    cut to T rounded up to a power of two), (t, t/2) and (t/2, t), unequal so both orders get tested."""
    if interpreting():  # (32, 16) / (16, 32) at the default tile
        t = interpreter_block(T)
        return {"fwd": (t, t // 2), "dkdv": (t // 2, t), "dq": (t, t // 2)}[kernel] + (1, 1)
    wide = head_dim == 128
    if dtype == torch.float32:  # exact fp32 dots (FMA, no tensor cores): small tiles, for tests and CPU-sized runs
        return {"fwd": (32, 32, 4, 2) if wide else (64, 32, 8, 2), "dkdv": (32, 32, 8, 2),
                "dq": (32, 16, 4, 2)}[kernel]
    return {"fwd": (128, 64, 8, 3),
            "dkdv": (16, 64, 8, 3) if wide else (32, 128, 8, 3),
            "dq": (64, 32, 8, 2) if wide else (64, 32, 4, 3)}[kernel]


def _strides(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _launch(kernel: str, tiles, D: int, dtype: torch.dtype, T: int):
    """(BLOCK_M, BLOCK_N, launch kwargs) for ``kernel``; ``tiles`` = (BLOCK_M, BLOCK_N) overrides the sizes."""
    bm, bn, warps, stages = _tiles(kernel, D, dtype, T)
    if tiles is not None:
        bm, bn = tiles
    prec = "ieee" if dtype == torch.float32 else "tf32"
    return bm, bn, dict(HEAD_DIM=D, BLOCK_M=bm, BLOCK_N=bn, DOT_PREC=prec, num_warps=warps, num_stages=stages)


def attention_triton_fwd(q, k, v, doc_ids, window_blocks, scale, block_size=128, *, tiles=None):
    """Forward launcher: validates, prepares, runs the forward kernel.

    Returns (out, lse, saved): out (B, T, H, D) contiguous in q's dtype; lse (B, H, T) fp32, the natural-log
    log-sum-exp of each query's scaled, masked scores; saved = (q, k, v, doc_start, doc_end, window) as the
    kernels used them (window: 0-dim int32, scale 0-dim fp32 device tensors), for ``attention_triton_bwd``.
    """
    check_attention_args(q, k, v, doc_ids, window_blocks, block_size)
    if q.dtype == torch.float64:
        raise TypeError("q, k, v: the triton attention takes float32, float16 or bfloat16, not float64")
    if not triton_usable(q.device):
        raise ValueError(f"q is on {q.device}, where the Triton kernels cannot run "
                         "(needs a CUDA GPU, or the CPU with TRITON_INTERPRET=1)")
    if q.dtype == torch.bfloat16 and interpreting():
        raise TypeError("q: bfloat16 is not supported under the Triton CPU interpreter (its bf16 dot is wrong)")
    B, T, H, D = q.shape
    if D not in HEAD_DIMS:
        raise ValueError(f"head dim D={D} is not supported by the triton attention (supported: {HEAD_DIMS})")
    if tiles is not None and any(t < 16 or t & (t - 1) for t in tiles):
        raise ValueError(f"tiles must be two powers of two >= 16, got {tiles}")
    if CHECK_DOC_IDS and T > 1 and bool((doc_ids[:, 1:] < doc_ids[:, :-1]).any()):
        raise ValueError("doc_ids must be non-decreasing along T")
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    wmax = T // block_size + 1  # any larger window sees every earlier key
    if isinstance(window_blocks, torch.Tensor):
        window = window_blocks.reshape(()).to(q.device).clamp(1, wmax).to(torch.int32)
    else:
        window = torch.full((), min(max(window_blocks, 1), wmax), dtype=torch.int32, device=q.device)
    doc_start, doc_end = _doc_bounds(doc_ids)
    if isinstance(scale, torch.Tensor):  # from device memory: a new value is neither a recompile nor a sync
        scale_t = scale.reshape(()).to(q.device, torch.float32)
    else:
        scale_t = torch.full((), scale, dtype=torch.float32, device=q.device)
    out = new_empty((B, T, H, D), q.dtype, q.device)
    lse = new_empty((B, H, T), torch.float32, q.device)
    if B * T * H > 0:
        bm, _, kw = _launch("fwd", tiles, D, q.dtype, T)
        _k.attn_fwd_kernel[(triton.cdiv(T, bm), B * H)](
            q, k, v, out, lse, doc_start, window, *_strides(q), *_strides(k), *_strides(v), *_strides(out),
            T, H, scale_t, block_size, **kw)
    return out, lse, (q, k, v, doc_start, doc_end, window, scale_t)


def attention_triton_bwd(dout, out, lse, saved, block_size, *, tiles=None):
    """Backward launcher: (dq, dk, dv), each (B, T, H, D) contiguous in q's dtype. ``dout`` is like ``out``
    (any strides with a unit D stride; copied otherwise)."""
    q, k, v, doc_start, doc_end, window, scale = saved
    B, T, H, D = q.shape
    dout = _unit_last(dout.to(q.dtype))
    delta = new_empty((B, H, T), torch.float32, q.device)
    dq, dk, dv = (new_empty((B, T, H, D), q.dtype, q.device) for _ in range(3))
    if B * T * H == 0:
        return dq, dk, dv
    pre_m = interpreter_block(T) // 2 if interpreting() else 64
    _k.attn_bwd_preprocess_kernel[(triton.cdiv(T, pre_m), B * H)](
        out, dout, delta, *_strides(out), *_strides(dout), T, H, HEAD_DIM=D, BLOCK_M=pre_m)
    common = (*_strides(q), *_strides(k), *_strides(v), *_strides(dout), *_strides(dq), T, H, scale, block_size)
    _, bn, kw = _launch("dkdv", tiles, D, q.dtype, T)
    _k.attn_bwd_dkdv_kernel[(triton.cdiv(T, bn), B * H)](
        q, k, v, dout, dk, dv, lse, delta, doc_start, doc_end, window, *common, **kw)
    bm, _, kw = _launch("dq", tiles, D, q.dtype, T)
    _k.attn_bwd_dq_kernel[(triton.cdiv(T, bm), B * H)](
        q, k, v, dout, dq, lse, delta, doc_start, window, *common, **kw)
    return dq, dk, dv


class _AttentionTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, doc_ids, window_blocks, scale, block_size, tiles):
        out, lse, saved = attention_triton_fwd(q, k, v, doc_ids, window_blocks, scale, block_size, tiles=tiles)
        ctx.save_for_backward(out, lse, *saved)
        ctx.block_size, ctx.tiles = block_size, tiles
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        out, lse, *saved = ctx.saved_tensors
        dq, dk, dv = attention_triton_bwd(dout, out, lse, saved, ctx.block_size, tiles=ctx.tiles)
        return dq, dk, dv, None, None, None, None, None


def attention_triton(q, k, v, doc_ids, window_blocks, scale, block_size=128, *, tiles=None):
    """The op with the Triton kernels (module docstring: layouts, dtypes, what is fused and recomputed);
    differentiable in q, k, v. ``tiles`` = (BLOCK_M, BLOCK_N), powers of two >= 16, overrides the tile
    sizes (tests, tuning)."""
    return _AttentionTriton.apply(q, k, v, doc_ids, window_blocks, scale, block_size, tiles)


if triton is not None:
    VARIANTS["triton"] = attention_triton
