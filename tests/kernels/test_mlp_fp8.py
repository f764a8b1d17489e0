"""mlp_fp8 (record #89's FP8-forward, bf16-backward ReLU^2 MLP) and its quantisation, against the spec's
formulas (recipe-frontier.md 2.10, 6 rows 6-10) with the FP8 roundings done on the formats' grids
(test_fp8.round_to), bf16 roundings by PyTorch, sums in float64."""

import pytest
import torch
from kernel_testing import DEVICE, assert_close_where_roundings_may_flip, needs_triton, on_device
from test_fp8 import E4M3, round_to

import kernels
from kernels.mlp_fp8 import activation_scale, quantize_up
from kernels.quantize_down import quantize_down_torch as quantize_down

VARIANTS = kernels.variants("mlp_fp8")


def e4m3(t: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(round_to(t.double().numpy(), E4M3))


def bf16(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.bfloat16).double()


def weights(seed, hidden=48, d=16):
    g = torch.Generator().manual_seed(seed)
    w_fc = (torch.randn(hidden, d, generator=g) * d**-0.5).bfloat16()
    w_proj = (torch.randn(hidden, d, generator=g) * hidden**-0.5).bfloat16()
    return w_fc, w_proj


def test_weight_quantisation():
    w_fc, w_proj = weights(0)
    up8, up_scale = quantize_up(w_fc)
    s = bf16(bf16(w_fc.double().abs().max()) / 448)  # bf16 arithmetic, as the record's eager code
    assert up_scale.dtype == torch.float32 and up_scale.double() == s
    assert torch.equal(up8.double(), e4m3(bf16(w_fc.double() / s)))
    assert activation_scale(torch.tensor(3.5)) == torch.tensor(3.5) * torch.tensor(1.8 / 448)
    assert activation_scale(torch.tensor(0.0)) == torch.tensor(1e-12) * torch.tensor(1.8 / 448)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("act_scale", [0.02, 1e-4])  # a fitting delayed scale, and one that saturates post8
def test_forward_and_backward(variant, act_scale):
    w_fc, w_proj = weights(1)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(24, 16, generator=g).bfloat16()
    up8, up_scale = quantize_up(w_fc)
    down8, down_scale, _ = quantize_down(w_proj, torch.tensor(0.0), bootstrap=True)
    act = torch.tensor(act_scale, dtype=torch.float32)
    x_d, w_fc_p, w_proj_p = (on_device(t).clone().requires_grad_() for t in (x, w_fc, w_proj))
    out, amax = kernels.get("mlp_fp8", variant)(x_d, w_fc_p, w_proj_p,
                                                *on_device(up8, up_scale, down8, down_scale, act))
    out, amax = out.cpu(), amax.cpu()
    # reference forward
    a = x.float().abs().max()
    x8 = e4m3((x.float() * (448 / a)).double())
    dq = (up_scale * a / 448).double()
    pre = bf16(dq * (x8 @ up8.double().T))
    post = bf16(torch.relu(pre) ** 2)
    post8 = e4m3(torch.clamp((post.float() * (1 / act)).double(), max=448))
    want = bf16((act * down_scale).double() * (post8 @ down8.double()))
    assert out.dtype == torch.bfloat16
    # the Triton variant on a GPU: Hopper's FP8 dots accumulate with fewer bits (as the record's kernel does)
    fast_fp8 = variant == "triton" and DEVICE.type == "cuda"
    if fast_fp8:
        assert_close_where_roundings_may_flip(out, want, 2**-5, "out")
        assert (amax - post.max()).abs() <= 2**-7 * post.max()
    else:
        assert ((out.double() - want).abs() <= 2**-8 * want.abs()).all()
        assert (out.double() == want).float().mean() > 0.95
        assert amax == post.max().float()
    # reference backward (bf16 function at the FP8 forward's pre and post)
    grad = torch.randn(24, 16, generator=g).bfloat16()
    out.backward(grad)
    dx, dw_fc, dw_proj = (t.grad.cpu() for t in (x_d, w_fc_p, w_proj_p))
    u = bf16(grad.double() @ w_proj.double().T)
    dpre = bf16(2 * u * torch.relu(pre))
    for got, ref in ((dw_proj, post.T @ grad.double()), (dw_fc, dpre.T @ x.double()), (dx, dpre @ w_fc.double())):
        assert got.dtype == torch.bfloat16
        if fast_fp8:  # pre and post, the backward's inputs, may differ by a rounding
            assert_close_where_roundings_may_flip(got, ref, 2**-5)
        else:
            assert ((got.double() - ref).abs() <= 2**-7 * ref.abs().max()).all()


def _run(variant, x, w_fc, w_proj, act_scale, grad):
    """(out, post_amax, dx, dw_fc, dw_proj) on DEVICE, back on the CPU."""
    up8, up_scale = quantize_up(w_fc)
    down8, down_scale, _ = quantize_down(w_proj, torch.tensor(0.0), bootstrap=True)
    leaves = [on_device(t).clone().requires_grad_() for t in (x, w_fc, w_proj)]
    out, amax = kernels.get("mlp_fp8", variant)(*leaves, *on_device(up8, up_scale, down8, down_scale,
                                                                     torch.tensor(act_scale)))
    out.backward(on_device(grad))
    return [out.detach().cpu(), amax.cpu(), *(t.grad.cpu() for t in leaves)]


@needs_triton
@pytest.mark.parametrize("act_scale", [0.02, 1e-4])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_triton_equals_the_reference_on_ragged_tiles(act_scale, dtype):
    """T = 70, hidden 160, d 48: ragged row, column and K tiles. Every rounding of the Triton epilogue is the
    reference's, so on the CPU the results differ only by fp32 summation order (bf16: where it flips a
    rounding, at most one bf16 step anywhere and on at most 1% of the entries); post_amax agrees. On a GPU
    the FP8 dots accumulate with Hopper's fewer bits (as the record's do): a relative error of 2^-5."""
    w_fc, w_proj = weights(3, hidden=160, d=48)
    g = torch.Generator().manual_seed(4)
    x, grad = (torch.randn(70, 48, generator=g).bfloat16().to(dtype) for _ in range(2))
    ref = _run("torch", x, w_fc.to(dtype), w_proj.to(dtype), act_scale, grad)
    tri = _run("triton", x, w_fc.to(dtype), w_proj.to(dtype), act_scale, grad)
    if DEVICE.type == "cuda":
        assert (tri[1] - ref[1]).abs() <= 2**-7 * ref[1]
        for name, r, t in zip(("out", "dx", "dw_fc", "dw_proj"), ref[:1] + ref[2:], tri[:1] + tri[2:], strict=True):
            assert t.dtype == r.dtype == dtype, name
            assert_close_where_roundings_may_flip(t, r, 2**-5, name)
        return
    assert (tri[1] - ref[1]).abs() <= 1e-6 * ref[1]
    for name, r, t in zip(("out", "dx", "dw_fc", "dw_proj"), ref[:1] + ref[2:], tri[:1] + tri[2:], strict=True):
        assert t.dtype == r.dtype == dtype, name
        diff = (t.double() - r.double()).abs()
        if dtype == torch.bfloat16:
            assert (diff <= 2**-7 * r.double().abs().max()).all(), name
            assert (diff > 0).float().mean() <= 0.01, name
        else:
            assert (diff <= 1e-5 * r.double().abs().max()).all(), name


@needs_triton
def test_triton_misuse():
    w_fc, w_proj = weights(5)
    up8, up_scale = quantize_up(w_fc)
    down8, down_scale, _ = quantize_down(w_proj, torch.tensor(0.0), bootstrap=True)
    op = kernels.get("mlp_fp8", "triton")
    args = on_device(w_fc, w_proj, up8, up_scale, down8, down_scale, torch.tensor(0.02))
    with pytest.raises(TypeError, match="bfloat16 or float32 x"):
        op(torch.randn(4, 16, device=DEVICE).half(), *args)
    with pytest.raises(ValueError, match="weights' shape"):
        op(torch.randn(4, 16, device=DEVICE).bfloat16(), *args[:2], args[2][:8], *args[3:])
