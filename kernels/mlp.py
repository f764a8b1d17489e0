"""The MLP block: relu(x @ W_fc^T)^2 @ W_proj^T.

The op (every variant has this signature)::

    mlp(x, w_fc, w_proj) -> out

    x       (..., dim) float32 / float16 / bfloat16 activations
    w_fc    (hidden, dim) weight of the up-projection, any float dtype (cast to x's dtype when used)
    w_proj  (dim, hidden) weight of the down-projection, any float dtype (cast to x's dtype when used)
    out     (..., dim), dtype of x

Gradients flow to x, w_fc and w_proj (in the weights' own dtypes).

Variants: ``torch`` (the reference) and, when Triton imports, ``triton``: one autograd.Function whose
up-projection is a Triton matmul with relu^2 fused into its epilogue, and whose backward produces the
pre-activation gradient in one Triton matmul with the relu^2 derivative fused into the epilogue
(relu(pre) recomputed as sqrt(post)); the other matmuls are torch (see the section below).
Also exported: ``linear_relu2`` and ``relu2_backward_matmul``, the two fused kernels on their own.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.common import interpreter_block, interpreting, new_empty, triton_usable


def check_mlp_args(x, w_fc, w_proj):
    for name, t in (("x", x), ("w_fc", w_fc), ("w_proj", w_proj)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")
    if w_fc.dim() != 2 or w_proj.dim() != 2:
        raise ValueError(f"w_fc and w_proj must be 2-D, got {tuple(w_fc.shape)} and {tuple(w_proj.shape)}")
    if x.dim() < 1 or x.shape[-1] != w_fc.shape[1]:
        last = x.shape[-1] if x.dim() else None
        raise ValueError(f"x's last dim ({last}) must equal w_fc.shape[1] ({w_fc.shape[1]})")
    if w_proj.shape != (w_fc.shape[1], w_fc.shape[0]):
        raise ValueError(f"w_proj must have shape {(w_fc.shape[1], w_fc.shape[0])}, got {tuple(w_proj.shape)}")
    if w_fc.device != x.device or w_proj.device != x.device:
        raise ValueError(f"x, w_fc, w_proj must be on one device, got {x.device}, {w_fc.device}, {w_proj.device}")


def mlp_torch(x, w_fc, w_proj):
    """Reference: three plain PyTorch ops."""
    check_mlp_args(x, w_fc, w_proj)
    h = F.relu(F.linear(x, w_fc.type_as(x))).square()
    return F.linear(h, w_proj.type_as(x))


VARIANTS = {"torch": mlp_torch}


# ------------------------------------------------------------------------------------------------------
# Triton variant.
#
#   forward   post  = relu(x @ W1^T)^2         Triton matmul, relu^2 fused into the epilogue   (M, H)
#             out   = post @ W2^T              torch matmul                                    (M, D)
#   saved     x, w_fc, w_proj, post            (bf16, fp32: pre = x @ W1^T is never stored)
#   backward  d_pre = (dout @ W2) * 2 sqrt(post)   Triton matmul, the relu^2 derivative fused into the
#                                                  epilogue: relu(pre) = sqrt(post) is recomputed there
#
# fp16 saves relu(pre) too (written by the same forward kernel) and the backward's epilogue multiplies by
# 2 relu(pre): fp16's narrow exponent flushes post = relu(pre)^2 to zero or a subnormal for |pre| below
# ~8e-3, and sqrt(post) then loses the gradient of small units (5x PyTorch's error at input scale 1e-2,
# ~1100x at 1e-4). bf16 has fp32's exponent range: its post keeps 8 bits either way, so it keeps the
# cheaper sqrt.
#             dW2   = dout^T @ post            torch matmul                                    (D, H)
#             dW1   = d_pre^T @ x              torch matmul                                    (H, D)
#             dx    = d_pre @ W1               torch matmul                                    (M, D)
#
# M = prod(x.shape[:-1]) tokens, D = dim, H = hidden; W1 (H, D) and W2 (D, H) are w_fc and w_proj cast to
# x's dtype (re-cast in the backward, not saved). Every matmul accumulates in fp32; tensors are in x's
# dtype, so in fp16 post = inf where relu(pre) > 256, as in the reference (whose backward stays finite
# there; this one does not). fp32 inputs use IEEE fp32 dots on the GPU (not TF32), like PyTorch's default.
# The K loop and the dot flags (IEEE fp32 dots; bf16 upcast under the CPU interpreter) are shared with the
# other matmul kernels: kernels/matmul_tiles.py.
# ------------------------------------------------------------------------------------------------------

try:
    import triton
    import triton.language as tl

    from kernels.matmul_tiles import dot_flags, grouped_tile, k_loop
    from kernels.triton_rounding import round_mantissa
except ImportError:  # no Triton: only the torch variant
    triton = None

EPILOGUE_NONE, EPILOGUE_RELU2, EPILOGUE_DRELU2 = 0, 1, 2
EPILOGUE_RELU2_SAVE, EPILOGUE_DRELU = 3, 4  # fp16: also write relu(acc) to aux; d_pre = acc * 2 aux
EPILOGUE_DRELU_PRE = 5  # record #89's FP8 MLP backward: d_pre = 2 u relu(aux), u = acc rounded to C's dtype

if triton is not None:

    def _matmul_configs():
        """The GPU configs. Under the CPU interpreter the autotuner is bypassed (see _matmul_epilogue)."""
        return [
            triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=3),
            triton.Config({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=3),
            triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32, "GROUP_M": 8}, num_warps=4, num_stages=4),
            triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=4, num_stages=4),
            triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8}, num_warps=4, num_stages=4),
        ]

    @triton.heuristics({"EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0})
    @triton.jit
    def _matmul_epilogue_jit(
        a_ptr, b_ptr, c_ptr, aux_ptr, M, N, K,
        stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
        EPILOGUE: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
        EVEN_K: tl.constexpr,
    ):
        """C = epilogue(A @ B): A (M, K), B (K, N), C and aux (M, N) with C's strides; any strides for A, B.

        EPILOGUE_NONE: C = acc;  EPILOGUE_RELU2: C = relu(acc)^2;  EPILOGUE_DRELU2: C = acc * 2 sqrt(aux);
        EPILOGUE_RELU2_SAVE: C = relu(acc)^2 and aux = relu(acc);  EPILOGUE_DRELU: C = acc * 2 aux;
        EPILOGUE_DRELU_PRE: C = 2 u relu(aux) with u = acc (bf16 C: u and C rounded to bf16 as they are made).
        One program per (BLOCK_M, BLOCK_N) tile of C, in grouped order (GROUP_M tile-rows sweep the
        tile-columns together, so the B tiles they share stay in L2).
        """
        pid_m, pid_n = grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)

        # Rows/cols past the edge wrap around (loads stay in bounds, no mask); the store masks them.
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_am = (offs_m % M).to(tl.int64)
        offs_bn = (offs_n % N).to(tl.int64)
        offs_k = tl.arange(0, BLOCK_K)
        a_ptrs = a_ptr + offs_am[:, None] * stride_am + offs_k[None, :] * stride_ak
        b_ptrs = b_ptr + offs_k[:, None] * stride_bk + offs_bn[None, :] * stride_bn
        acc = k_loop(a_ptrs, b_ptrs, K, stride_ak, stride_bk, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K,
                     DOT_PRECISION, UPCAST)

        c_offs = offs_m.to(tl.int64)[:, None] * stride_cm + offs_n.to(tl.int64)[None, :] * stride_cn
        mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
        if EPILOGUE == 1:  # relu^2
            acc = tl.maximum(acc, 0.0)
            acc = acc * acc
        elif EPILOGUE == 2:  # d pre = d post * 2 relu(pre), relu(pre) = sqrt(post)
            post = tl.load(aux_ptr + c_offs, mask=mask, other=0.0).to(tl.float32)
            acc = acc * (2.0 * tl.sqrt(post))
        elif EPILOGUE == 3:  # relu^2, and relu(pre) written for the backward
            acc = tl.maximum(acc, 0.0)
            tl.store(aux_ptr + c_offs, acc.to(aux_ptr.dtype.element_ty), mask=mask)
            acc = acc * acc
        elif EPILOGUE == 4:  # d pre = d post * 2 relu(pre), relu(pre) read as saved
            relu_pre = tl.load(aux_ptr + c_offs, mask=mask, other=0.0).to(tl.float32)
            acc = acc * (2.0 * relu_pre)
        elif EPILOGUE == 5:  # d pre = 2 u relu(pre), u = acc; bf16: both rounded here (so the store is exact)
            pre = tl.maximum(tl.load(aux_ptr + c_offs, mask=mask, other=0.0).to(tl.float32), 0.0)
            if c_ptr.dtype.element_ty == tl.bfloat16:
                acc = round_mantissa(2.0 * round_mantissa(acc, 16) * pre, 16)
            else:
                acc = 2.0 * acc * pre
        tl.store(c_ptr + c_offs, acc.to(c_ptr.dtype.element_ty), mask=mask)

    # An A100 (sm_80) block has 166,912 bytes of shared memory; the pipelined K loop keeps (stages - 1) A and
    # B tiles there. fp32's 128 x 256 x 64 tiles need 196,608 (bench/results/aot/aot.md): such configs are
    # dropped before tuning rather than failing to launch.
    MAX_SHARED_BYTES = 166_912

    def _fit_shared_memory(configs, element_size: int):
        fit = [c for c in configs if (c.kwargs["BLOCK_M"] + c.kwargs["BLOCK_N"]) * c.kwargs["BLOCK_K"] * element_size
               * max(c.num_stages - 1, 1) <= MAX_SHARED_BYTES]
        return fit or configs[-1:]

    # GPU: autotuned over _matmul_configs(), one autotuner per dtype with the configs that fit pruned ahead.
    # (Not Triton's prune_configs_by: torch.compile in torch 2.11 cannot trace an autotuned heuristics
    # kernel that has one, "Can't construct an AttrSource without a valid base source";
    # tests/test_compile_graph.py traces every kernel set.) CPU interpreter: _matmul_epilogue_jit with the
    # block sizes passed explicitly from kernels.common.INTERPRETER_TILE at each launch (autotune configs
    # are fixed when the module is imported, and tuning under the interpreter would only waste time).
    _matmul_epilogue_kernels = {
        dtype: triton.autotune(configs=_fit_shared_memory(_matmul_configs(), dtype.itemsize),
                               key=["M", "N", "K", "EPILOGUE"])(_matmul_epilogue_jit)
        for dtype in (torch.float32, torch.float16, torch.bfloat16)
    }

    def _matmul_epilogue(a: torch.Tensor, b: torch.Tensor, epilogue: int, aux: torch.Tensor | None = None):
        """Launch: C (M, N) = epilogue(a @ b) in a's dtype, for a (M, K) and b (K, N) of one dtype (any strides,
        so pass ``w.t()`` views for x @ w^T). ``aux`` (M, N): read by EPILOGUE_DRELU2, EPILOGUE_DRELU and
        EPILOGUE_DRELU_PRE, written by EPILOGUE_RELU2_SAVE (then it must be contiguous, like C)."""
        M, K = a.shape
        N = b.shape[1]
        c = new_empty((M, N), a.dtype, a.device)
        if M == 0 or N == 0:
            return c
        if aux is None:
            aux = c  # never read
        elif aux.stride() != c.stride():
            if epilogue == EPILOGUE_RELU2_SAVE:
                raise ValueError("the aux output of EPILOGUE_RELU2_SAVE must have C's strides")
            aux = aux.contiguous()
        grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)
        if interpreting():  # tile sizes from kernels.common.INTERPRETER_TILE, read now; no tuning
            blocks = dict(BLOCK_M=interpreter_block(M), BLOCK_N=interpreter_block(N), BLOCK_K=interpreter_block(K))
            kernel, blocks = _matmul_epilogue_jit, dict(blocks, GROUP_M=4)
        else:
            kernel, blocks = _matmul_epilogue_kernels[a.dtype], {}
        kernel[grid](
            a, b, c, aux, M, N, K,
            a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1),
            EPILOGUE=epilogue, **dot_flags(a.dtype), **blocks,
        )
        return c

    def _check_triton_device(t: torch.Tensor, name: str):
        if not triton_usable(t.device):
            raise ValueError(f"{name} is on {t.device}, where the Triton kernels cannot run "
                             "(needs a CUDA GPU, or the CPU with TRITON_INTERPRET=1)")

    def linear_relu2(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """post = relu(x @ w^T)^2 in one kernel (forward only).

        x (M, K) float32/float16/bfloat16; w (N, K) any of those (cast to x's dtype); post (M, N) in x's
        dtype, accumulated in fp32 with the square taken before the single rounding.
        """
        _check_2d_pair(x, "x", w, "w", x_dim=1, w_dim=1)
        return _matmul_epilogue(x, w.to(x.dtype).t(), EPILOGUE_RELU2)

    def relu2_backward_matmul(dout: torch.Tensor, w_proj: torch.Tensor, post: torch.Tensor) -> torch.Tensor:
        """d_pre = (dout @ w_proj) * 2 sqrt(post) in one kernel: the gradient through relu^2 and the
        down-projection, with relu(pre) recomputed from post.

        dout (M, D) float32/float16/bfloat16; w_proj (D, H) (cast to dout's dtype); post (M, H) =
        relu(pre)^2 in dout's dtype; d_pre (M, H) in dout's dtype.
        """
        _check_2d_pair(dout, "dout", w_proj, "w_proj", x_dim=1, w_dim=0)
        _check_2d_pair(post, "post", w_proj, "w_proj", x_dim=1, w_dim=1)
        if post.dtype != dout.dtype or post.shape[0] != dout.shape[0]:
            raise ValueError(f"post must be ({dout.shape[0]}, {w_proj.shape[1]}) in {dout.dtype}, "
                             f"got {tuple(post.shape)} in {post.dtype}")
        return _matmul_epilogue(dout, w_proj.to(dout.dtype), EPILOGUE_DRELU2, aux=post)

    def _check_2d_pair(x, x_name, w, w_name, x_dim, w_dim):
        """x and w are 2-D float tensors on one Triton-usable device with x.shape[x_dim] == w.shape[w_dim]."""
        for name, t in ((x_name, x), (w_name, w)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            if t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
                raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")
            if t.dim() != 2:
                raise ValueError(f"{name} must be 2-D, got shape {tuple(t.shape)}")
        if x.shape[x_dim] != w.shape[w_dim]:
            raise ValueError(f"{x_name}.shape[{x_dim}] ({x.shape[x_dim]}) must equal "
                             f"{w_name}.shape[{w_dim}] ({w.shape[w_dim]})")
        if x.device != w.device:
            raise ValueError(f"{x_name} and {w_name} must be on one device, got {x.device} and {w.device}")
        _check_triton_device(x, x_name)

    class _MLPTriton(torch.autograd.Function):
        """The MLP block; see the table above for what each step runs on."""

        @staticmethod
        def forward(ctx, x, w_fc, w_proj):
            x2 = x.reshape(-1, x.shape[-1])  # (M, D)
            w1, w2 = w_fc.to(x.dtype), w_proj.to(x.dtype)  # (H, D), (D, H); no copy when dtypes match
            if x.dtype == torch.float16:  # relu(pre) kept for the backward (see the table above)
                relu_pre = new_empty((x2.shape[0], w1.shape[0]), x.dtype, x.device)
                post = _matmul_epilogue(x2, w1.t(), EPILOGUE_RELU2_SAVE, aux=relu_pre)  # (M, H)
            else:
                relu_pre, post = None, _matmul_epilogue(x2, w1.t(), EPILOGUE_RELU2)  # (M, H)
            out = torch.mm(post, w2.t(), out=new_empty((x2.shape[0], w2.shape[0]), x.dtype, x.device))
            # The weights are saved as given and re-cast in the backward (a cheap cast, no extra memory).
            ctx.save_for_backward(x2, w_fc, w_proj, post, relu_pre)
            ctx.x_shape = x.shape
            return out.reshape(*x.shape[:-1], w2.shape[0])

        @staticmethod
        @torch.autograd.function.once_differentiable
        def backward(ctx, dout):
            x2, w_fc, w_proj, post, relu_pre = ctx.saved_tensors
            w1, w2 = w_fc.to(x2.dtype), w_proj.to(x2.dtype)
            dout2 = dout.reshape(-1, dout.shape[-1]).to(x2.dtype)  # (M, D)
            dx = dw_fc = dw_proj = None
            if ctx.needs_input_grad[2]:
                dw_proj = (dout2.t() @ post).to(w_proj.dtype)  # (D, H)
            if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
                if relu_pre is None:
                    d_pre = _matmul_epilogue(dout2, w2, EPILOGUE_DRELU2, aux=post)  # (M, H)
                else:
                    d_pre = _matmul_epilogue(dout2, w2, EPILOGUE_DRELU, aux=relu_pre)
                if ctx.needs_input_grad[1]:
                    dw_fc = (d_pre.t() @ x2).to(w_fc.dtype)  # (H, D)
                if ctx.needs_input_grad[0]:
                    dx = (d_pre @ w1).reshape(ctx.x_shape)  # (..., D)
            return dx, dw_fc, dw_proj

    def mlp_triton(x, w_fc, w_proj):
        """The MLP op (signature in the module docstring): fused relu^2 up-projection, torch down-projection,
        and a backward that recovers relu(pre) from the saved post-activation (fp16: saves it)."""
        check_mlp_args(x, w_fc, w_proj)
        _check_triton_device(x, "x")
        return _MLPTriton.apply(x, w_fc, w_proj)

    VARIANTS["triton"] = mlp_triton
