"""Record #89's FP8 copy of the MLP down-projection weights, with delayed scaling (spec recipe-frontier.md
2.10 step 10, 6 rows "reduce_mlp_activation_scales" and "quantize_transpose_mlp_down_weights"). Run after
every optimizer step on the whole bank of down weights.

The op (every variant has this signature)::

    quantize_down(w, next_scale, bootstrap) -> (w8, used, next)

    w           (L, hidden, d) or (hidden, d), bf16 (the record's) or fp32, any strides: the down weights
    next_scale  fp32 of shape w.shape[:-2]: the scale the previous call returned as ``next``; ignored (may be
                None) with ``bootstrap``
    bootstrap   current scaling instead (the record's first 16 steps, the build and the warm-up reset):
                used = max(max|w|, 1e-12) / 448 computed in w's dtype (bf16 arithmetic for bf16 w)
    w8          float8_e4m3fn of w's shape: e4m3(clamp(fp32(w) / used, +-448)) (a division, not a product
                with the reciprocal); the Triton variant stores each matrix column-major ("transposed", as
                the record does), the layout torch._scaled_mm wants for its second operand
    used        fp32, shape w.shape[:-2]: the scale w8 was made with (the MLP's ``down_scale``)
    next        fp32, shape w.shape[:-2]: 1.12 max(max|w|, 1e-12) / 448, for the next call

Variants: ``torch`` (the reference) and, when Triton imports, ``triton``: one kernel quantises 64 x 64
tiles and writes each tile's max|w|, a second reduces the tile maxima of each matrix to its scale (the
record's reduce-to-scale step; also run first, without the quantisation, when bootstrapping).
"""

from __future__ import annotations

import torch

from kernels.fp8 import E4M3_MAX, to_e4m3

WEIGHT_HEADROOM = 1.12  # next = 1.12 x the weights' amax / 448: the following step's weights may grow a little
AMAX_FLOOR = 1e-12  # an all-zero matrix (the down weights start at zero) gets a tiny scale, not a division by 0


def check_quantize_down_args(w, next_scale, bootstrap):
    if not isinstance(w, torch.Tensor) or w.dim() not in (2, 3) or w.dtype not in (torch.bfloat16, torch.float32):
        raise TypeError(f"w must be a bf16 or fp32 (L, hidden, d) or (hidden, d) tensor, got "
                        f"{getattr(w, 'dtype', type(w).__name__)} {tuple(getattr(w, 'shape', ()))}")
    if w.numel() == 0:
        raise ValueError(f"w must not be empty, got shape {tuple(w.shape)}")
    if not isinstance(bootstrap, bool):
        raise TypeError(f"bootstrap must be a bool, got {bootstrap!r}")
    if not bootstrap:
        if not isinstance(next_scale, torch.Tensor) or next_scale.dtype != torch.float32 \
                or next_scale.shape != w.shape[:-2] or next_scale.device != w.device:
            raise ValueError(f"next_scale must be fp32 of shape {tuple(w.shape[:-2])} on {w.device} (the previous "
                             f"call's next), got {getattr(next_scale, 'dtype', None)} "
                             f"{tuple(getattr(next_scale, 'shape', ()))}")


def quantize_down_torch(w: torch.Tensor, next_scale, bootstrap: bool):
    """Reference (see the module docstring)."""
    check_quantize_down_args(w, next_scale, bootstrap)
    amax = w.abs().amax(dim=(-2, -1))
    # a tensor divisor: PyTorch on a GPU multiplies by the reciprocal of a Python-number divisor (one bit off
    # the spec's division; seen on the H100, 2026-11-27)
    used = (amax.clamp(min=AMAX_FLOOR) / amax.new_tensor(E4M3_MAX)).float() if bootstrap else next_scale
    w8 = to_e4m3(w.float() / used[..., None, None])
    return w8, used, amax.float().clamp(min=AMAX_FLOOR) * (WEIGHT_HEADROOM / E4M3_MAX)


VARIANTS = {"torch": quantize_down_torch}

try:
    import triton
    import triton.language as tl

    from kernels.common import interpreter_block, interpreting, new_empty, triton_usable
    from kernels.triton_rounding import round_e4m3, round_mantissa
except ImportError:  # no triton: only the reference is registered
    triton = None

if triton is not None:

    @triton.jit
    def _quantize_tiles_kernel(
        w_ptr, w8_ptr,  # (L, H, D) in, any strides; (L, H, D) e4m3 out, any strides
        scale_ptr, tile_max_ptr,  # (L,) fp32 in (read when QUANTIZE); (L, tiles) fp32 out
        H, D, stride_wl, stride_wh, stride_wd, stride_ol, stride_oh, stride_od,
        QUANTIZE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        """One (BLOCK_H, BLOCK_D) tile of matrix program_id(1): its max|w|, and with QUANTIZE its e4m3 copy."""
        tile, layer = tl.program_id(0), tl.program_id(1)
        tiles_d = tl.cdiv(D, BLOCK_D)
        offs_h = (tile // tiles_d) * BLOCK_H + tl.arange(0, BLOCK_H)
        offs_d = (tile % tiles_d) * BLOCK_D + tl.arange(0, BLOCK_D)
        mask = (offs_h[:, None] < H) & (offs_d[None, :] < D)
        w_ptrs = w_ptr + layer.to(tl.int64) * stride_wl + offs_h[:, None] * stride_wh + offs_d[None, :] * stride_wd
        w = tl.load(w_ptrs, mask=mask, other=0.0).to(tl.float32)
        tl.store(tile_max_ptr + layer * tl.num_programs(0) + tile, tl.max(tl.max(tl.abs(w), axis=1), axis=0))
        if QUANTIZE:
            q = tl.math.div_rn(w, tl.load(scale_ptr + layer))  # a division, as the record's kernel
            w8 = round_e4m3(tl.minimum(tl.maximum(q, -448.0), 448.0))
            w8_ptrs = (w8_ptr + layer.to(tl.int64) * stride_ol + offs_h[:, None] * stride_oh
                       + offs_d[None, :] * stride_od)
            tl.store(w8_ptrs, w8.to(w8_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _tile_max_to_scale_kernel(
        tile_max_ptr, scale_ptr,  # (L, n) fp32 in; (L,) fp32 out
        n, factor,  # the scale: max(amax, floor) * factor, or with CURRENT max(amax, floor) / 448
        FLOOR: tl.constexpr, CURRENT: tl.constexpr, ROUND_BF16: tl.constexpr, BLOCK: tl.constexpr,
    ):
        """scale[l] from the max of tile_max[l, :]; CURRENT with ROUND_BF16 rounds as bf16 arithmetic does."""
        factor = tl.cast(factor, tl.float32)  # Inductor may pass floats as fp64
        row = tl.program_id(0)
        amax = tl.zeros((BLOCK,), dtype=tl.float32)
        for start in range(0, n, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            amax = tl.maximum(amax, tl.load(tile_max_ptr + row * n + offs, mask=offs < n, other=0.0))
        amax = tl.max(amax, axis=0)
        if CURRENT:  # (for bf16 w, amax is a bf16 value; bf16(1e-12) / 448 rounds to bf16 as 1e-12 / 448 does)
            scale = tl.math.div_rn(tl.maximum(amax, FLOOR), 448.0)
            if ROUND_BF16:
                scale = round_mantissa(scale, 16)
        else:
            scale = tl.maximum(amax, FLOOR) * factor
        tl.store(scale_ptr + row, scale)

    def _tile_maxima_to_scale(tile_max: torch.Tensor, current: bool, bf16: bool) -> torch.Tensor:
        """(L,) fp32 scales from (L, n) tile maxima: current scaling (bf16: in bf16 arithmetic), or next's."""
        scale = new_empty(tile_max.shape[:1], torch.float32, tile_max.device)
        _tile_max_to_scale_kernel[(tile_max.size(0),)](
            tile_max, scale, tile_max.size(1), WEIGHT_HEADROOM / E4M3_MAX, FLOOR=AMAX_FLOOR, CURRENT=current,
            ROUND_BF16=bf16, BLOCK=interpreter_block(tile_max.size(1)) if interpreting() else 1024)
        return scale

    def quantize_down_triton(w: torch.Tensor, next_scale, bootstrap: bool):
        """The Triton variant (see the module docstring)."""
        check_quantize_down_args(w, next_scale, bootstrap)
        if not triton_usable(w.device):
            raise ValueError(f"w is on {w.device}, where the Triton kernels cannot run "
                             "(needs a CUDA GPU, or the CPU with TRITON_INTERPRET=1)")
        w3 = w if w.dim() == 3 else w[None]
        L, H, D = w3.shape
        w8 = new_empty((L, D, H), torch.float8_e4m3fn, w.device).transpose(1, 2)  # column-major matrices
        bh, bd = (interpreter_block(H), interpreter_block(D)) if interpreting() else (64, 64)
        tiles = triton.cdiv(H, bh) * triton.cdiv(D, bd)
        tile_max = new_empty((L, tiles), torch.float32, w.device)
        strides = (*w3.stride(), *w8.stride())
        if bootstrap:  # current scaling: every tile's max first
            _quantize_tiles_kernel[(tiles, L)](w3, w8, tile_max, tile_max, H, D, *strides, QUANTIZE=False,
                                               BLOCK_H=bh, BLOCK_D=bd)
            used = _tile_maxima_to_scale(tile_max, current=True, bf16=w.dtype == torch.bfloat16)
        else:
            used = next_scale.reshape(L)
        _quantize_tiles_kernel[(tiles, L)](w3, w8, used, tile_max, H, D, *strides, QUANTIZE=True,
                                           BLOCK_H=bh, BLOCK_D=bd)
        nxt = _tile_maxima_to_scale(tile_max, current=False, bf16=False)
        shape = w.shape[:-2]
        return (w8 if w.dim() == 3 else w8[0]), used.reshape(shape), nxt.reshape(shape)

    VARIANTS["triton"] = quantize_down_triton
