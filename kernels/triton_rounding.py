"""Round-to-nearest-even onto the bf16, e5m2 and e4m3 grids, on fp32 values, in Triton.

Kernels round with these before storing to a narrower dtype: the value is then on the target's grid and the
cast is exact on the GPU and under the CPU interpreter alike. (The interpreter's own fp32 -> bf16 / fp8 casts
truncate, so a plain cast would make CPU results differ from the GPU's, and from PyTorch's.)

    round_mantissa(v, DROP)   v with its DROP low mantissa bits rounded off (16: bf16's grid); finite v
    round_e5m2(v)             e5m2's grid (|v| <= 57344: callers clamp)
    round_e4m3(v)             float8_e4m3fn's grid (|v| <= 448: callers clamp)
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def round_mantissa(v, DROP: tl.constexpr):
    """fp32 ``v`` rounded to nearest even with its DROP low mantissa bits cleared."""
    bits = v.to(tl.uint32, bitcast=True)
    bits = ((bits + ((1 << (DROP - 1)) - 1) + ((bits >> DROP) & 1)) >> DROP) << DROP
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _round_to_multiple(v, STEP_INV: tl.constexpr):
    """v rounded to nearest even on the multiples of 1 / STEP_INV (|v| * STEP_INV < 2^22: the 1.5 * 2^23 trick)."""
    q = v * STEP_INV
    return ((q + 12582912.0) - 12582912.0) * (1.0 / STEP_INV)


@triton.jit
def round_e5m2(v):
    """e5m2: 2 mantissa bits from 2^-14 up, multiples of 2^-16 below (the subnormals)."""
    return tl.where(tl.abs(v) < 6.103515625e-05, _round_to_multiple(v, 65536.0), round_mantissa(v, 21))


@triton.jit
def round_e4m3(v):
    """float8_e4m3fn: 3 mantissa bits from 2^-6 up, multiples of 2^-9 below (the subnormals)."""
    return tl.where(tl.abs(v) < 0.015625, _round_to_multiple(v, 512.0), round_mantissa(v, 20))
