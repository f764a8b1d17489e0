"""Record #89's ReLU^2 MLP with an FP8 forward and a bf16 backward (spec recipe-frontier.md 2.10, 6 rows 6-10).

The op (every variant has this signature)::

    mlp_fp8(x, w_fc, w_proj, up8, up_scale, down8, down_scale, act_scale) -> (out, post_amax)

    x           (T, d) bf16: the normed activations
    w_fc        (hidden, d) bf16, used as x w_fc^T;  w_proj (hidden, d) bf16, used as h w_proj (in x out)
    up8, up_scale       w_fc quantised by ``quantize_up`` (e4m3 (hidden, d), fp32 scalar)
    down8, down_scale   w_proj quantised by the quantize_down op (kernels/quantize_down.py: e4m3 (hidden, d),
                        row- or column-major; fp32 scalar)
    act_scale   fp32 scalar: the delayed scale of the down-projection's input (``activation_scale`` of an
                earlier call's post_amax)
    out         (T, d) in x's dtype;  post_amax: fp32 scalar, max(post) of this call

Forward (FP8, current scaling up, delayed scaling down):
    a = max(max|x|, 1e-12);  x8 = e4m3(x * (448 / a));  dq = up_scale * a / 448
    pre = bf16(dq * x8 up8^T);  post = bf16(relu(pre)^2)
    post8 = e4m3(min(post * (1 / act_scale), 448));  out = bf16(act_scale * down_scale * post8 down8)
Backward (bf16, the FP8 values are a detached side computation; gradients of the bf16 function at pre, post):
    dw_proj = post^T g;  u = bf16(g w_proj^T);  dpre = bf16(2 u relu(pre));  dw_fc = dpre^T x;  dx = dpre w_fc

Variants: ``torch`` (the reference: FP8 products emulated exactly, fp32 sums: kernels/fp8.py) and, when
Triton imports, ``triton`` (section below).
The up weights' quantisation (after every optimizer step; eager PyTorch in the record too) and the activation
scale (after every training forward) are here too: ``quantize_up``, ``activation_scale``. The down weights'
delayed-scaling quantisation is an op of its own: kernels/quantize_down.py.
"""

from __future__ import annotations

import torch

from kernels.fp8 import E4M3_MAX, scaled_mm, to_e4m3

ACTIVATION_HEADROOM = 1.8  # the down-projection input's delayed scale: 1.8 x the last amax / 448


def quantize_up(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Current scaling of up-projection weights w (..., hidden, d), per matrix: in w's dtype (bf16),
    s = max(max|w|, 1e-12) / 448 and w8 = e4m3(w / s); returns (w8, fp32 s of shape w.shape[:-2])."""
    scale = w.abs().amax(dim=(-2, -1)).clamp(min=1e-12) / E4M3_MAX
    return to_e4m3(w / scale[..., None, None]), scale.float()


def activation_scale(amax: torch.Tensor, headroom: float = ACTIVATION_HEADROOM) -> torch.Tensor:
    """A delayed scale from an observed amax: max(amax, 1e-12) * headroom / 448, fp32."""
    return amax.float().clamp(min=1e-12) * (headroom / E4M3_MAX)


class _MLPFp8(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w_fc, w_proj, up8, up_scale, down8, down_scale, act_scale):
        a = x.detach().abs().amax().clamp(min=1e-12).float()
        x8 = to_e4m3(x.detach().float() * (E4M3_MAX / a))
        pre = scaled_mm(x8, up8.T, up_scale * a / E4M3_MAX, x.dtype)
        post = torch.relu(pre.float()).square().to(x.dtype)
        post8 = to_e4m3(torch.clamp(post.float() * (1 / act_scale), max=E4M3_MAX))
        out = scaled_mm(post8, down8, act_scale * down_scale, x.dtype)
        ctx.save_for_backward(x, w_fc, w_proj, pre, post)
        post_amax = post.float().amax()
        ctx.mark_non_differentiable(post_amax)
        return out, post_amax

    @staticmethod
    def backward(ctx, g, _):
        x, w_fc, w_proj, pre, post = ctx.saved_tensors
        g32 = g.float()
        dw_proj = (post.float().T @ g32).to(w_proj.dtype)
        u = (g32 @ w_proj.float().T).to(x.dtype)
        dpre = (2 * u.float() * torch.relu(pre.float())).to(x.dtype)
        dw_fc = (dpre.float().T @ x.float()).to(w_fc.dtype)
        dx = (dpre.float() @ w_fc.float()).to(x.dtype)
        return dx, dw_fc, dw_proj, None, None, None, None, None


def check_mlp_fp8_args(x, w_fc, w_proj, up8, down8):
    if x.dim() != 2 or w_fc.shape != w_proj.shape or x.size(1) != w_fc.size(1):
        raise ValueError(f"x must be (T, d) and w_fc, w_proj (hidden, d); got {tuple(x.shape)}, "
                         f"{tuple(w_fc.shape)}, {tuple(w_proj.shape)}")
    if up8.dtype != torch.float8_e4m3fn or down8.dtype != torch.float8_e4m3fn:
        raise TypeError("up8 and down8 must be float8_e4m3fn (quantize_up / quantize_down)")
    if up8.shape != w_fc.shape or down8.shape != w_proj.shape:
        raise ValueError(f"up8 and down8 must have the weights' shape {tuple(w_fc.shape)}, got "
                         f"{tuple(up8.shape)} and {tuple(down8.shape)}")


def mlp_fp8_torch(x, w_fc, w_proj, up8, up_scale, down8, down_scale, act_scale):
    """Reference (see the module docstring)."""
    check_mlp_fp8_args(x, w_fc, w_proj, up8, down8)
    return _MLPFp8.apply(x, w_fc, w_proj, up8, up_scale, down8, down_scale, act_scale)


VARIANTS = {"torch": mlp_fp8_torch}


# ------------------------------------------------------------------------------------------------------
# Triton variant (the record's kernels' split, spec 2.10 and 6 rows 6-10).
#
#   a = amax|x|, x8 = e4m3(x 448 / a)           torch (one reduction, one elementwise pass)
#   pre, post, post8, partial amax               _fp8_up_kernel: x8 @ up8^T (e4m3 dots, fp32 accumulation)
#                                                with the dequant, ReLU^2 and the down input's quantisation in
#                                                its epilogue; one max(post) per program
#   post_amax = max(partials)                    torch (the reduce-to-scale step; activation_scale() of it
#                                                is the next call's act_scale)
#   out = act_scale down_scale post8 @ down8     torch._scaled_mm on a GPU, fast accumulation (fp8.scaled_mm_fast)
#   backward: d_pre = bf16(2 bf16(g w_proj^T) relu(pre))   kernels/mlp.py's matmul, EPILOGUE_DRELU_PRE
#             dw_proj = post^T g, dw_fc = d_pre^T x, dx = d_pre w_fc             torch matmuls (bf16)
#
# Every rounding of the epilogue is done on the fp32 bits (kernels/triton_rounding.py), so the CPU
# interpreter's results are the GPU's: pre, post and post8 equal the reference's up to the fp32 summation
# order of the dot. Scales are read from device memory (no sync, no recompile when they change).
# ------------------------------------------------------------------------------------------------------

try:
    import triton
    import triton.language as tl

    from kernels.common import interpreter_block, interpreting, new_empty, triton_usable
    from kernels.fp8 import scaled_mm_fast
    from kernels.matmul_tiles import dot_flags, grouped_tile, k_loop
    from kernels.mlp import EPILOGUE_DRELU_PRE, _matmul_epilogue
    from kernels.triton_rounding import round_e4m3, round_mantissa
except ImportError:  # no triton: only the reference is registered
    triton = None

if triton is not None:

    @triton.jit
    def _fp8_up_kernel(
        a_ptr, b_ptr,  # x8 (M, K) e4m3; up8 as B (K, N) = up8^T: any strides
        pre_ptr, post_ptr, post8_ptr,  # (M, N) contiguous outs: x's dtype (bf16 in the record) twice, e4m3
        amax_ptr, dq_ptr, inv_act_ptr,  # (programs,) fp32 out: max(post) per tile; fp32 scalars in
        M, N, K, stride_am, stride_ak, stride_bk, stride_bn,
        DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, EVEN_K: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    ):
        """pre = bf16(dq acc), post = bf16(relu(pre)^2), post8 = e4m3(min(post inv_act, 448)) for one
        (BLOCK_M, BLOCK_N) tile, in grouped order (as kernels/mlp.py's matmul); fp32 pre and post unrounded."""
        pid_m, pid_n = grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)

        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        a_ptrs = a_ptr + (offs_m % M).to(tl.int64)[:, None] * stride_am + offs_k[None, :] * stride_ak
        b_ptrs = b_ptr + offs_k[:, None] * stride_bk + (offs_n % N).to(tl.int64)[None, :] * stride_bn
        acc = k_loop(a_ptrs, b_ptrs, K, stride_ak, stride_bk, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K,
                     DOT_PRECISION, UPCAST)

        pre = acc * tl.load(dq_ptr)
        if pre_ptr.dtype.element_ty == tl.bfloat16:
            pre = round_mantissa(pre, 16)
        relu = tl.maximum(pre, 0.0)
        post = relu * relu
        if post_ptr.dtype.element_ty == tl.bfloat16:
            post = round_mantissa(post, 16)
        post8 = round_e4m3(tl.minimum(post * tl.load(inv_act_ptr), 448.0))
        mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
        c_offs = offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
        tl.store(pre_ptr + c_offs, pre.to(pre_ptr.dtype.element_ty), mask=mask)
        tl.store(post_ptr + c_offs, post.to(post_ptr.dtype.element_ty), mask=mask)
        tl.store(post8_ptr + c_offs, post8.to(post8_ptr.dtype.element_ty), mask=mask)
        tl.store(amax_ptr + tl.program_id(0), tl.max(tl.max(tl.where(mask, post, 0.0), axis=1), axis=0))

    def _up_projection(x8: torch.Tensor, up8: torch.Tensor, dq: torch.Tensor, inv_act: torch.Tensor,
                       dtype: torch.dtype):
        """(pre, post, post8, post_amax) for x8 (M, K) and up8 (N, K), both e4m3; dq, inv_act fp32 scalars;
        pre and post in ``dtype``."""
        M, K = x8.shape
        N = up8.shape[0]
        pre, post = (new_empty((M, N), dtype, x8.device) for _ in range(2))
        post8 = new_empty((M, N), torch.float8_e4m3fn, x8.device)
        if M == 0 or N == 0:
            return pre, post, post8, torch.zeros((), dtype=torch.float32, device=x8.device)
        if interpreting():  # tile sizes from kernels.common.INTERPRETER_TILE, read now
            bm, bn, bk, warps, stages = interpreter_block(M), interpreter_block(N), interpreter_block(K), 1, 1
        else:  # e4m3 tiles: (128 + 128) x 128 bytes per stage
            bm, bn, bk, warps, stages = 128, 128, 128, 8, 3
        programs = triton.cdiv(M, bm) * triton.cdiv(N, bn)
        partial = new_empty((programs,), torch.float32, x8.device)
        b = up8.t()
        _fp8_up_kernel[(programs,)](
            x8, b, pre, post, post8, partial, dq, inv_act, M, N, K,
            x8.stride(0), x8.stride(1), b.stride(0), b.stride(1), **dot_flags(torch.float8_e4m3fn),
            EVEN_K=K % bk == 0, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, num_warps=warps, num_stages=stages,
        )
        return pre, post, post8, partial.amax()

    class _MLPFp8Triton(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, w_fc, w_proj, up8, up_scale, down8, down_scale, act_scale):
            a = x.detach().abs().amax().clamp(min=1e-12).float()
            x8 = to_e4m3(x.detach().float() * (E4M3_MAX / a))
            dq = (up_scale * a / E4M3_MAX).float().reshape(())
            inv_act = (1 / act_scale).float().reshape(())
            pre, post, post8, post_amax = _up_projection(x8, up8, dq, inv_act, x.dtype)
            out = scaled_mm_fast(post8, down8, act_scale * down_scale, x.dtype, fast_accum=True)
            ctx.save_for_backward(x, w_fc, w_proj, pre, post)
            ctx.mark_non_differentiable(post_amax)
            return out, post_amax

        @staticmethod
        def backward(ctx, g, _):
            x, w_fc, w_proj, pre, post = ctx.saved_tensors
            g = g.to(x.dtype)
            dpre = _matmul_epilogue(g, w_proj.to(x.dtype).t(), EPILOGUE_DRELU_PRE, aux=pre)
            dw_proj = (post.t() @ g).to(w_proj.dtype)
            dw_fc = (dpre.t() @ x).to(w_fc.dtype)
            dx = dpre @ w_fc.to(x.dtype)
            return dx, dw_fc, dw_proj, None, None, None, None, None

    def mlp_fp8_triton(x, w_fc, w_proj, up8, up_scale, down8, down_scale, act_scale):
        """The Triton variant (see the section above); x bf16 (the record's) or fp32."""
        check_mlp_fp8_args(x, w_fc, w_proj, up8, down8)
        if x.dtype not in (torch.bfloat16, torch.float32):
            raise TypeError(f"the Triton variant takes bfloat16 or float32 x, got {x.dtype}")
        if not triton_usable(x.device):
            raise ValueError(f"x is on {x.device}, where the Triton kernels cannot run "
                             "(needs a CUDA GPU, or the CPU with TRITON_INTERPRET=1)")
        return _MLPFp8Triton.apply(x, w_fc, w_proj, up8, up_scale, down8, down_scale, act_scale)

    VARIANTS["triton"] = mlp_fp8_triton
