"""FP8 number formats as record #89 uses them (spec recipe-frontier.md 6: "FP8 grids"), for the ops' PyTorch
references: saturating casts and the scaled matmul, emulated exactly (products of FP8 values accumulated
in fp32).

    e4m3   float8_e4m3fn, max 448, round to nearest even; values beyond +-448 saturate to +-448, as the
           GPU's cvt.rn.satfinite does (PyTorch's own eager cast gives NaN above 464 instead)
    e5m2   float8_e5m2, max 57344, likewise
"""

from __future__ import annotations

import torch

E4M3_MAX = 448.0
E5M2_MAX = 57344.0


def to_e4m3(x: torch.Tensor) -> torch.Tensor:
    """x rounded to float8_e4m3fn, saturating at +-448 (NaN stays NaN)."""
    return x.clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)


def to_e5m2(x: torch.Tensor) -> torch.Tensor:
    """x rounded to float8_e5m2, saturating at +-57344."""
    return x.clamp(-E5M2_MAX, E5M2_MAX).to(torch.float8_e5m2)


def scaled_mm(a8: torch.Tensor, b8: torch.Tensor, scale, out_dtype: torch.dtype) -> torch.Tensor:
    """out_dtype(scale * (a8 @ b8)) for FP8 a8 (M, K) and b8 (K, N): every product exact, sums in fp32 (what
    torch._scaled_mm computes, up to the GPU's accumulation order); ``scale`` a float or fp32 tensor."""
    return (scale * (a8.float() @ b8.float())).to(out_dtype)


def scaled_mm_fast(a8: torch.Tensor, b8: torch.Tensor, scale, out_dtype: torch.dtype,
                   fast_accum: bool = False) -> torch.Tensor:
    """What ``scaled_mm`` computes, by torch._scaled_mm on a CUDA GPU where its rules allow it (every
    dimension a multiple of 16; a8 is made row-major and b8 column-major, as it requires), else by the
    emulation. For the Triton variants' library matmuls. ``fast_accum``: Hopper's reduced-precision
    accumulation, as record #89's FP8 lm_head forward and MLP down product use (recipe-frontier.md section 6);
    the emulation sums in fp32."""
    if a8.is_cuda and all(n % 16 == 0 for n in (*a8.shape, b8.shape[1])):
        one = torch.ones((), dtype=torch.float32, device=a8.device)
        scale = torch.as_tensor(scale, dtype=torch.float32, device=a8.device).reshape(())
        return torch._scaled_mm(a8.contiguous(), b8.t().contiguous().t(), scale_a=scale, scale_b=one,
                                out_dtype=out_dtype, use_fast_accum=fast_accum)
    return scaled_mm(a8, b8, scale, out_dtype)
