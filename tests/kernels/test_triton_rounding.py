"""kernels/triton_rounding.py: the kernels' roundings onto the bf16, e5m2 and e4m3 grids equal PyTorch's casts
(round to nearest even) on every kind of value: ties, subnormals, zeros, both signs, the largest finite."""

import pytest
import torch
from kernel_testing import DEVICE, needs_triton, on_device

triton = pytest.importorskip("triton")
tl = triton.language
from kernels.triton_rounding import round_e4m3, round_e5m2, round_mantissa  # noqa: E402


@triton.jit
def _round_kernel(x_ptr, out_ptr, N, FORMAT: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    v = tl.load(x_ptr + offs, mask=offs < N, other=0.0)
    if FORMAT == 0:
        r = round_mantissa(v, 16)
    elif FORMAT == 1:
        r = round_e5m2(v)
    else:
        r = round_e4m3(v)
    tl.store(out_ptr + offs, r, mask=offs < N)


def values(largest: float, smallest_subnormal: float) -> torch.Tensor:
    """Random magnitudes over the whole range, every grid point's exact ties, and the edges, both signs."""
    g = torch.Generator().manual_seed(0)
    spread = torch.exp2(torch.empty(4000).uniform_(-30, torch.log2(torch.tensor(largest)).item(), generator=g))
    ties = torch.arange(1, 200) * smallest_subnormal * 0.5  # half-way points among the subnormals
    edges = torch.tensor([0.0, smallest_subnormal, largest, 2.0**-6, 2.0**-14, 1.0, 1.0 + 2.0**-8, 1.5])
    v = torch.cat([spread, ties, edges])
    return torch.cat([v, -v]).clamp(-largest, largest)


@needs_triton
@pytest.mark.parametrize(("fmt", "dtype", "largest", "subnormal"), [
    (0, torch.bfloat16, 1e30, 2.0**-133),
    (1, torch.float8_e5m2, 57344.0, 2.0**-16),
    (2, torch.float8_e4m3fn, 448.0, 2.0**-9),
])
def test_rounding_equals_torchs_cast(fmt, dtype, largest, subnormal):
    x = on_device(values(largest, subnormal))
    out = torch.full_like(x, float("nan"))
    _round_kernel[(triton.cdiv(x.numel(), 256),)](x, out, x.numel(), FORMAT=fmt, BLOCK=256)
    want = x.to(dtype).float()
    assert torch.equal(out, want), x[out != want][:5]
    assert out.device.type == DEVICE.type  # "cuda:0" on a GPU, DEVICE is "cuda"
