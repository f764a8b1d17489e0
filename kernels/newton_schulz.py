"""Newton-Schulz orthogonalisation for Muon.

The op (every variant has this signature)::

    newton_schulz(G, steps=5, coeffs=(3.4445, -4.7750, 2.0315), eps=1e-7, dtype=torch.bfloat16) -> X

    G      (..., m, n) float tensor, batched over any leading dims
    X      (..., m, n) in ``dtype``: approximately U V^T for G = U S V^T, singular values in ~[0.5, 1.5]

Each step, on the wide orientation (m <= n, transposing when m > n), with X normalised to unit
Frobenius norm per matrix first:  A = X X^T;  B = b A + c A A;  X = a X + B X.
The building blocks, which the Triton variant implements as kernels, are ``xxt`` (A = X X^T) and
``ba_plus_caa`` (B = b A + c A A for symmetric A).

Variants: ``torch`` (the reference) and, when Triton imports, ``triton``: ``xxt_triton`` and
``ba_plus_caa_triton`` are one upper-triangle-only Triton kernel (see the section below), and
X = a X + B X is a torch.baddbmm (cuBLAS, a X fused as beta).
"""

from __future__ import annotations

import torch

from kernels.common import interpreter_block, interpreting, new_empty, refuse_backward, triton_usable

DEFAULT_COEFFS = (3.4445, -4.7750, 2.0315)


def check_matrices(G, dtype):
    """G is a float tensor of matrices (..., m, n) and ``dtype`` a compute dtype (shared with Polar Express)."""
    if not isinstance(G, torch.Tensor):
        raise TypeError(f"G must be a torch.Tensor, got {type(G).__name__}")
    if G.dim() < 2:
        raise ValueError(f"G must have at least 2 dims (..., m, n), got shape {tuple(G.shape)}")
    if not G.dtype.is_floating_point:
        raise TypeError(f"G must be a floating-point tensor, got {G.dtype}")
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"dtype must be float32, float16 or bfloat16, got {dtype}")


def check_newton_schulz_args(G, steps, dtype):
    check_matrices(G, dtype)
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


# ------------------------------------------------------------------------------------------------------
# Triton variant.
#
# Both building blocks are one kernel, a batched symmetric rank-k product with an optional epilogue:
#
#     C = alpha * X X^T + beta * A        X (batch, m, k), A and C (batch, m, m)
#
#   xxt          X = X, alpha = 1, no A                     A = X X^T
#   ba_plus_caa  X = A, alpha = c, beta = b, A = A           B = c A A + b A   (A A = A A^T for symmetric A)
#
# C is symmetric, so only the upper triangle of (BLOCK, BLOCK) output tiles is computed: programs with
# tile-row > tile-col return at once, and each off-diagonal program stores its tile and, transposed,
# the mirror tile of the lower triangle. That halves the matmul work. Accumulation is fp32; C is in the
# input's dtype; fp32 inputs use IEEE fp32 dots on the GPU (not TF32).
#
# The third step of an iteration, X = a X + B X, is torch.baddbmm(X, B, X, beta=a): one cuBLAS batched
# matmul with the a X term fused by cuBLAS (beta), not a Triton kernel.
# The K loop and the dot flags (IEEE fp32 dots; bf16 upcast under the CPU interpreter) are shared with the
# other matmul kernels: kernels/matmul_tiles.py.
# ------------------------------------------------------------------------------------------------------

try:
    import triton
    import triton.language as tl

    from kernels.matmul_tiles import dot_flags, k_loop
except ImportError:  # no Triton: only the torch variant
    triton = None

if triton is not None:

    def _syrk_configs():
        """The GPU configs. Under the CPU interpreter the autotuner is bypassed (see _syrk)."""
        return [
            triton.Config({"BLOCK": 128, "BLOCK_K": 64}, num_warps=8, num_stages=3),
            triton.Config({"BLOCK": 128, "BLOCK_K": 32}, num_warps=8, num_stages=4),
            triton.Config({"BLOCK": 64, "BLOCK_K": 64}, num_warps=4, num_stages=4),
            triton.Config({"BLOCK": 64, "BLOCK_K": 32}, num_warps=4, num_stages=4),
        ]

    @triton.heuristics({"EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0})
    @triton.jit
    def _syrk_jit(
        x_ptr, a_ptr, c_ptr, M, K, alpha, beta,
        stride_xb, stride_xm, stride_xk, stride_ab, stride_am, stride_an, stride_cb, stride_cm, stride_cn,
        HAS_A: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
        BLOCK: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
    ):
        """C[z] = alpha X[z] X[z]^T (+ beta A[z] if HAS_A): X (batch, M, K), A and C (batch, M, M), any strides.

        Grid (T*T, batch) with T = cdiv(M, BLOCK); program (i, j) with i > j does nothing, (i, j) with
        i < j writes tiles (i, j) and (j, i).
        """
        alpha, beta = tl.cast(alpha, tl.float32), tl.cast(beta, tl.float32)  # Inductor may pass floats as fp64
        pid = tl.program_id(0)
        z = tl.program_id(1).to(tl.int64)
        num_t = tl.cdiv(M, BLOCK)
        pid_m = pid // num_t
        pid_n = pid % num_t
        if pid_m > pid_n:  # lower triangle: written by the mirror store of program (pid_n, pid_m)
            return

        offs_m = pid_m * BLOCK + tl.arange(0, BLOCK)
        offs_n = pid_n * BLOCK + tl.arange(0, BLOCK)
        rows_m = (offs_m % M).to(tl.int64)  # past the edge: wrap (in-bounds loads), masked at the store
        rows_n = (offs_n % M).to(tl.int64)
        offs_k = tl.arange(0, BLOCK_K)
        x_base = x_ptr + z * stride_xb
        a_ptrs = x_base + rows_m[:, None] * stride_xm + offs_k[None, :] * stride_xk
        b_ptrs = x_base + offs_k[:, None] * stride_xk + rows_n[None, :] * stride_xm
        acc = k_loop(a_ptrs, b_ptrs, K, stride_xk, stride_xk, BLOCK, BLOCK, BLOCK_K, EVEN_K,
                     DOT_PRECISION, UPCAST)

        mask = (offs_m[:, None] < M) & (offs_n[None, :] < M)
        acc = acc * alpha
        if HAS_A:
            a_in = tl.load(a_ptr + z * stride_ab + rows_m[:, None] * stride_am + rows_n[None, :] * stride_an,
                           mask=mask, other=0.0)
            acc += beta * a_in.to(tl.float32)
        out = acc.to(c_ptr.dtype.element_ty)
        c_base = c_ptr + z * stride_cb
        om = offs_m.to(tl.int64)
        on = offs_n.to(tl.int64)
        tl.store(c_base + om[:, None] * stride_cm + on[None, :] * stride_cn, out, mask=mask)
        if pid_m < pid_n:  # the mirror tile (pid_n, pid_m) = this tile transposed
            mask_t = (offs_n[:, None] < M) & (offs_m[None, :] < M)
            tl.store(c_base + on[:, None] * stride_cm + om[None, :] * stride_cn, tl.trans(out), mask=mask_t)

    # GPU: autotuned over _syrk_configs(). CPU interpreter: _syrk_jit with the block sizes passed
    # explicitly from kernels.common.INTERPRETER_TILE at each launch (autotune configs are fixed when the
    # module is imported, and tuning under the interpreter would only waste time).
    _syrk_kernel = triton.autotune(configs=_syrk_configs(), key=["M", "K", "HAS_A"])(_syrk_jit)

    def _syrk(X: torch.Tensor, alpha: float, beta: float = 0.0, A: torch.Tensor | None = None) -> torch.Tensor:
        """Launch on X (batch, m, k) [and A (batch, m, m)]; returns C (batch, m, m) in X's dtype."""
        batch, m, k = X.shape
        C = new_empty((batch, m, m), X.dtype, X.device)
        if C.numel() == 0:
            return C
        a = A if A is not None else C  # never read without HAS_A
        grid = lambda meta: (triton.cdiv(m, meta["BLOCK"]) ** 2, batch)
        if interpreting():  # tile sizes from kernels.common.INTERPRETER_TILE, read now; no tuning
            kernel, blocks = _syrk_jit, dict(BLOCK=interpreter_block(m), BLOCK_K=interpreter_block(k))
        else:
            kernel, blocks = _syrk_kernel, {}
        kernel[grid](
            X, a, C, m, k, float(alpha), float(beta),
            X.stride(0), X.stride(1), X.stride(2), a.stride(0), a.stride(1), a.stride(2),
            C.stride(0), C.stride(1), C.stride(2),
            HAS_A=A is not None, **dot_flags(X.dtype), **blocks,
        )
        return C

    def _check_triton_matrix(t, name: str):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() < 2:
            raise ValueError(f"{name} must have at least 2 dims (..., m, n), got shape {tuple(t.shape)}")
        if t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")
        if not triton_usable(t.device):
            raise ValueError(f"{name} is on {t.device}, where the Triton kernels cannot run "
                             "(needs a CUDA GPU, or the CPU with TRITON_INTERPRET=1)")

    def xxt_triton(X: torch.Tensor) -> torch.Tensor:
        """A = X X^T for X (..., m, n) float32/float16/bfloat16 -> A (..., m, m) in X's dtype (fp32 accumulation).

        Upper-triangle tiles only, mirrored into the lower triangle in the same kernel; leading dims flattened.
        """
        _check_triton_matrix(X, "X")
        m, n = X.shape[-2:]
        return _syrk(X.reshape(-1, m, n), 1.0).reshape(*X.shape[:-2], m, m)

    def ba_plus_caa_triton(A: torch.Tensor, b: float, c: float) -> torch.Tensor:
        """B = b A + c A A for symmetric A (..., m, m) float32/float16/bfloat16 -> B (..., m, m) in A's dtype.

        A's symmetry is assumed, not checked (that would need a host sync): the kernel computes A A^T and
        reads only A's upper-triangle tiles for the b A epilogue. Upper-triangle tiles only, mirrored.
        """
        _check_triton_matrix(A, "A")
        m = A.shape[-1]
        if A.shape[-2] != m:
            raise ValueError(f"A must be square (..., m, m), got shape {tuple(A.shape)}")
        for name, v in (("b", b), ("c", c)):
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise TypeError(f"{name} must be a Python float, got {type(v).__name__}")
        A3 = A.reshape(-1, m, m)
        return _syrk(A3, c, b, A3).reshape(A.shape)

    def newton_schulz_triton(G, steps=5, coeffs=DEFAULT_COEFFS, eps=1e-7, dtype=torch.bfloat16):
        """The op (signature and semantics of newton_schulz_torch): per step, A = xxt_triton(X),
        B = ba_plus_caa_triton(A, b, c), X = torch.baddbmm(X, B, X, beta=a). No host sync.

        G (..., m, n) any float dtype -> X (..., m, n) in ``dtype``. Tall matrices are transposed so the
        Gram matrices are (min(m, n), min(m, n)). No gradient: differentiating the result raises.
        """
        check_newton_schulz_args(G, steps, dtype)
        if not triton_usable(G.device):
            raise ValueError(f"G is on {G.device}, where the Triton kernels cannot run "
                             "(needs a CUDA GPU, or the CPU with TRITON_INTERPRET=1)")
        if G.numel() == 0:
            return G.detach().to(dtype)
        with torch.no_grad():
            X = _newton_schulz_triton(G, steps, coeffs, eps, dtype)
        return refuse_backward(G, X, "newton_schulz (triton variant)")

    def _newton_schulz_triton(G, steps, coeffs, eps, dtype):
        a, b, c = (float(v) for v in coeffs)
        X = G.to(dtype)
        tall = X.size(-2) > X.size(-1)
        if tall:
            X = X.mT
        X = (X / (X.norm(dim=(-2, -1), keepdim=True) + eps)).contiguous()  # row-major: k-contiguous loads
        shape = X.shape
        X = X.reshape(-1, *shape[-2:])  # (batch, m, n), m <= n
        for _ in range(steps):
            A = _syrk(X, 1.0)  # (batch, m, m) = X X^T
            B = _syrk(A, c, b, A)  # b A + c A A
            X = torch.baddbmm(X, B, X, beta=a)  # a X + B X
        X = X.reshape(shape)
        return X.mT if tall else X

    VARIANTS["triton"] = newton_schulz_triton
