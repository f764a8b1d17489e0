"""The tiled matmul inner loop shared by the Triton matmul kernels (kernels/mlp.py, kernels/newton_schulz.py,
kernels/mlp_fp8.py), their tile order, and the dot flags they all use.

    acc = k_loop(a_ptrs, b_ptrs, K, stride_ak, stride_bk, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, DOT_PRECISION, UPCAST)
    pid_m, pid_n = grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)

fp32 accumulation. bf16 tl.dot is wrong under Triton's CPU interpreter, so there (only) bf16 tiles are
upcast to fp32 before the dot (UPCAST): CPU runs check bf16 loads, epilogues and stores, not the bf16 MMA
path. fp32 inputs use IEEE fp32 dots (not TF32), like PyTorch's default.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.common import interpreting


@triton.jit
def grouped_tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n): this program's tile of an (M, N) output, in grouped order (GROUP_M tile-rows sweep the
    tile-columns together, so the B tiles they share stay in L2)."""
    pid = tl.program_id(0)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    first_pid_m = (pid // num_pid_in_group) * GROUP_M
    group_size_m = min(tl.cdiv(M, BLOCK_M) - first_pid_m, GROUP_M)
    return first_pid_m + ((pid % num_pid_in_group) % group_size_m), (pid % num_pid_in_group) // group_size_m


@triton.jit
def k_loop(a_ptrs, b_ptrs, K, stride_ak, stride_bk,
           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
           EVEN_K: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """fp32 (BLOCK_M, BLOCK_N) = sum over K of the A tile (BLOCK_M, BLOCK_K) @ the B tile (BLOCK_K, BLOCK_N).

    The pointers address the first K block and advance by BLOCK_K * stride along K; the last block is
    masked to zeros unless EVEN_K. UPCAST: the tiles are cast to fp32 before the dot (interpreter only).
    """
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            k_left = K - k * BLOCK_K
            a = tl.load(a_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
            b = tl.load(b_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
        if UPCAST:  # bf16 (and e4m3) under the CPU interpreter, whose bf16 tl.dot is wrong
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    return acc


def dot_flags(dtype: torch.dtype) -> dict:
    """DOT_PRECISION and UPCAST for inputs of ``dtype``: IEEE fp32 dots for fp32 (not TF32); bf16 and e4m3 are
    upcast to fp32 under the CPU interpreter (exactly: every product of two such values is an fp32)."""
    upcast = dtype in (torch.bfloat16, torch.float8_e4m3fn) and interpreting()
    return {"DOT_PRECISION": "ieee" if dtype == torch.float32 or upcast else "tf32", "UPCAST": upcast}
