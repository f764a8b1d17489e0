"""quantize_down (record #89's delayed-scaling FP8 copy of the MLP down weights) against the spec's formulas
(recipe-frontier.md 2.10 step 10, 6 "quantize_transpose_mlp_down_weights"): max|w| in float64 (exact), the
bf16 arithmetic of the bootstrap by rounding float64 results, the fp32 division by PyTorch, and e4m3 by
rounding to the format's grid (test_fp8.round_to)."""

import pytest
import torch
from kernel_testing import DEVICE, on_device
from test_fp8 import E4M3, round_to

import kernels

VARIANTS = kernels.variants("quantize_down")


def bf16(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.bfloat16).double()


def reference(w: torch.Tensor, next_scale: torch.Tensor, bootstrap: bool):
    """(w8 as float64, used, next) from the spec's formulas."""
    amax = w.double().abs().amax(dim=(-2, -1))
    if bootstrap:  # fp32(bf16(bf16(max(amax, 1e-12)) / 448)) for bf16 weights; fp32 arithmetic for fp32 ones
        if w.dtype == torch.bfloat16:
            used = bf16(bf16(amax.clamp(min=1e-12)) / 448).float()
        else:
            used = amax.float().clamp(min=1e-12) / 448
    else:
        used = next_scale
    quotient = (w.float() / used[..., None, None]).double()  # fp32 division (a division, not a reciprocal)
    w8 = torch.from_numpy(round_to(quotient.numpy(), E4M3))  # saturates at +-448
    nxt = amax.float().clamp(min=1e-12) * torch.tensor(1.12 / 448)  # fp32 times fp32(1.12 / 448)
    return w8, used, nxt


def bank(seed: int, dtype: torch.dtype, layers=3, hidden=70, d=40) -> torch.Tensor:
    """The down weights as the model holds them: slot 1 of a (layers, 2, hidden, d) bank (a strided view),
    one matrix all zeros (the record's initial down weights), one with a single large entry."""
    g = torch.Generator().manual_seed(seed)
    full = (torch.randn(layers, 2, hidden, d, generator=g) * hidden**-0.5).to(dtype)
    full[0, 1] = 0
    full[layers - 1, 1, hidden - 1, d - 1] = 3.0  # the max in the last (ragged) tile
    return full[:, 1]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("bootstrap", [True, False])
def test_matches_the_spec(variant, dtype, bootstrap):
    w = bank(0, dtype)
    g = torch.Generator().manual_seed(1)
    # a delayed scale from slightly smaller weights: some quotients exceed 448 and saturate
    next_scale = w.float().abs().amax(dim=(-2, -1)).clamp(min=1e-12) * (torch.rand(3, generator=g) + 0.5) / 448
    w8, used, nxt = kernels.get("quantize_down", variant)(*on_device(w, next_scale), bootstrap)
    want8, want_used, want_next = reference(w, next_scale, bootstrap)
    assert w8.dtype == torch.float8_e4m3fn and w8.shape == w.shape
    assert used.dtype == nxt.dtype == torch.float32 and used.shape == nxt.shape == (3,)
    assert torch.equal(used.cpu(), want_used) and torch.equal(nxt.cpu(), want_next)
    assert torch.equal(w8.cpu().double(), want8)
    if not bootstrap:
        assert w8.float().abs().max() == 448  # saturated, not NaN
    if variant == "triton":  # stored transposed (column-major), the layout torch._scaled_mm takes
        assert w8.stride(-2) == 1 and w8.stride(-1) == w.size(-2)


@pytest.mark.parametrize("variant", VARIANTS)
def test_quotients_on_e4m3_ties_round_to_even(variant):
    """w = s t for every tie t between e4m3 neighbours in [1, 448) and scales s = 3, 7, 11, 13: w / s is exactly
    t and rounds to the even neighbour; w x fp32(1 / s) lands beside t (for 7 and 11 often beyond fp32's
    rounding back to t) and would round the other way."""
    grid = torch.tensor(E4M3[0])
    ties = ((grid[1:] + grid[:-1]) / 2)[(grid[:-1] >= 1) & (grid[1:] <= 448)]
    scales = torch.tensor([3.0, 7.0, 11.0, 13.0])
    w = torch.cat([ties, -ties]).float()[None, None, :] * scales[:, None, None]  # <= 8 significant bits: bf16
    for dtype in (torch.bfloat16, torch.float32):
        w8, _, _ = kernels.get("quantize_down", variant)(*on_device(w.to(dtype), scales), False)
        assert torch.equal(w8.cpu().double(), reference(w.to(dtype), scales, False)[0])


@pytest.mark.parametrize("variant", VARIANTS)
def test_one_matrix_and_delayed_chain(variant):
    """A (hidden, d) matrix gives 0-dim scales; next of one call is the used of the following one."""
    op = kernels.get("quantize_down", variant)
    w = on_device(bank(2, torch.bfloat16, layers=1, hidden=33, d=97)[0])
    _, used, nxt = op(w, None, True)
    assert used.shape == nxt.shape == ()
    w8, used2, _ = op(w * 1.01, nxt, False)
    assert torch.equal(used2, nxt)
    assert torch.equal(w8.cpu().double(), reference((w * 1.01).cpu(), nxt.cpu(), False)[0])


@pytest.mark.parametrize("variant", VARIANTS)
def test_misuse(variant):
    op = kernels.get("quantize_down", variant)
    w = on_device(bank(3, torch.float32)).contiguous()
    good = torch.ones(3, device=DEVICE)
    with pytest.raises(TypeError, match="bf16 or fp32"):
        op(w.half(), good, False)
    with pytest.raises(TypeError, match="bf16 or fp32"):
        op(w[None], good, False)
    with pytest.raises(ValueError, match="next_scale must be fp32 of shape"):
        op(w, None, False)
    with pytest.raises(ValueError, match="next_scale must be fp32 of shape"):
        op(w, torch.ones(4, device=DEVICE), False)
    with pytest.raises(ValueError, match="next_scale must be fp32 of shape"):
        op(w, good.double(), False)
    with pytest.raises(TypeError, match="bootstrap must be a bool"):
        op(w, good, 1)
    with pytest.raises(ValueError, match="must not be empty"):
        op(w[:, :0], good, False)
