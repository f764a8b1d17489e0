"""varlen_attention (record #89's document-masked sliding-window attention): every variant against a dense
float64 attention whose mask is built element by element from the spec (recipe-frontier.md 6, row 1)."""

import pytest
import torch
from kernel_testing import DEVICE, on_device

import kernels
from kernels.varlen_attention import varlen_attention_torch

VARIANTS = kernels.variants("varlen_attention")


def reference(q, k, v, cu, window, scale):
    """Dense float64 on the CPU tensors q, k, v (differentiable): query t sees key j iff both lie in one
    segment [c_d, c_{d+1}) and t - window <= j <= t."""
    T = q.size(0)
    bounds = cu.cpu().tolist()
    segment = [next(d for d in range(len(bounds) - 1) if bounds[d] <= t < bounds[d + 1]) for t in range(T)]
    mask = torch.tensor([[segment[t] == segment[j] and t - window <= j <= t for j in range(T)] for t in range(T)])
    scores = scale * torch.einsum("thd,jhd->htj", q.double(), k.double())
    p = scores.masked_fill(~mask, float("-inf")).softmax(-1)
    return torch.einsum("htj,jhd->thd", p, v.double())


def case(T, H, D, cu, seed):
    """q, k, v (T, H, D) fp32 leaves and cu_seqlens on DEVICE, from a seeded CPU generator."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (on_device(torch.randn(T, H, D, generator=g)).requires_grad_() for _ in range(3))
    return q, k, v, on_device(torch.tensor(cu, dtype=torch.int32))


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("window", [0, 3, 17, 1000])
def test_forward_and_gradients_match_the_dense_reference(variant, window):
    """Documents of 1, 7, 30 and 40 tokens, empty segments (repeated boundaries, the recipe's padding),
    windows from the diagonal alone to wider than any document."""
    q, k, v, cu = case(78, 2, 64, [0, 1, 8, 8, 38, 78, 78, 78], seed=window)
    out = kernels.get("varlen_attention", variant)(q, k, v, cu, window, 0.3)
    q64, k64, v64 = (t.detach().cpu().double().requires_grad_() for t in (q, k, v))
    want = reference(q64, k64, v64, cu, window, 0.3)
    assert out.dtype == torch.float32 and (out.detach().cpu().double() - want).abs().max() < 1e-5
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    out.backward(g.to(DEVICE))
    want.backward(g.double())
    for got, ref in zip((q, k, v), (q64, k64, v64), strict=True):  # fp32: 2e-5 of the scale (SDPA: 1.1e-5)
        assert (got.grad.cpu().double() - ref.grad).abs().max() < 2e-5 * max(1.0, ref.grad.abs().max())


def test_small_query_blocks_give_the_same_result():
    q, k, v, cu = case(50, 1, 4, [0, 50], seed=3)
    whole = varlen_attention_torch(q, k, v, cu, 9, 0.5)
    blocked = varlen_attention_torch(q, k, v, cu, 9, 0.5, query_block=7)
    assert torch.allclose(whole, blocked, atol=1e-6)


def test_bad_arguments():
    q, k, v, cu = case(8, 1, 4, [0, 8], seed=0)
    with pytest.raises(ValueError, match="end at T = 8"):
        varlen_attention_torch(q, k, v, torch.tensor([0, 5], dtype=torch.int32), 2, 1.0)
    with pytest.raises(ValueError, match="never decrease"):
        varlen_attention_torch(q, k, v, torch.tensor([0, 6, 4, 8], dtype=torch.int32), 2, 1.0)
    with pytest.raises(TypeError, match="int32"):
        varlen_attention_torch(q, k, v, cu.long(), 2, 1.0)
    with pytest.raises(ValueError, match="window"):
        varlen_attention_torch(q, k, v, cu, -1, 1.0)
    with pytest.raises(ValueError, match="one shape"):
        varlen_attention_torch(q, k[:4], v, cu, 2, 1.0)


@pytest.mark.parametrize("variant", VARIANTS)
def test_many_tiles_against_the_reference(variant):
    """T = 300 over several query and key tiles, documents of 1 to 150 tokens, a window across tile edges."""
    q, k, v, cu = case(300, 2, 64, [0, 150, 151, 152, 230, 300, 300], seed=5)
    out = kernels.get("varlen_attention", variant)(q, k, v, cu, 45, 0.125)
    q64, k64, v64 = (t.detach().cpu().double().requires_grad_() for t in (q, k, v))
    want = reference(q64, k64, v64, cu, 45, 0.125)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
    out.backward(g.to(DEVICE))
    want.backward(g.double())
    assert (out.detach().cpu().double() - want).abs().max() < 1e-5
    for got, ref in zip((q, k, v), (q64, k64, v64), strict=True):  # fp32: 2e-5 of the scale (SDPA: 1.1e-5)
        assert (got.grad.cpu().double() - ref.grad).abs().max() < 2e-5 * max(1.0, ref.grad.abs().max())


def sdpa(q, k, v, cu, window, scale):
    """What PyTorch offers in q's dtype: F.scaled_dot_product_attention on the dense (T, T) mask."""
    t = torch.arange(q.size(0), device=q.device)
    segment = torch.searchsorted(cu, t.to(torch.int32), right=True)
    mask = (segment[:, None] == segment[None, :]) & (t[None, :] <= t[:, None]) & (t[:, None] - t[None, :] <= window)
    out = torch.nn.functional.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                                           attn_mask=mask, scale=scale)
    return out.transpose(0, 1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.skipif("triton" not in VARIANTS, reason="triton is not installed")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_low_precision_within_twice_pytorchs_error(dtype):
    """The record's dtype (bf16) and fp16: the Triton variant's output and gradients err at most 2x as much
    as PyTorch's SDPA in that dtype, both against the fp32 reference on the same rounded inputs (Tri Dao's
    rule)."""
    T, window = 2048, 384
    q, k, v, cu = case(T, 6, 128, [0, 700, 701, 1500, 2048, 2048], seed=9)
    g = torch.randn(T, 6, 128, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    results = {}
    for name, fn, run_dtype in (("exact", varlen_attention_torch, torch.float32), ("sdpa", sdpa, dtype),
                                ("triton", kernels.get("varlen_attention", "triton"), dtype)):
        inputs = [t.detach().to(dtype).to(run_dtype).requires_grad_() for t in (q, k, v)]
        out = fn(*inputs, cu, window, 0.12)
        results[name] = [out, *torch.autograd.grad(out, inputs, g.to(run_dtype))]
    for i, name in enumerate(("out", "dq", "dk", "dv")):
        want = results["exact"][i].double()
        torch_err = (results["sdpa"][i].double() - want).abs().max()
        tri_err = (results["triton"][i].double() - want).abs().max()
        assert tri_err <= 2 * torch_err, (name, float(tri_err), float(torch_err))


@pytest.mark.skipif("triton" not in VARIANTS, reason="triton is not installed")
def test_triton_misuse():
    op = kernels.get("varlen_attention", "triton")
    q, k, v, cu = case(8, 1, 8, [0, 8], seed=0)
    with pytest.raises(ValueError, match="head dim D=8"):
        op(q, k, v, cu, 2, 1.0)
    q, k, v, cu = case(8, 1, 64, [0, 8], seed=0)
    with pytest.raises(ValueError, match="window"):
        op(q, k, v, cu, -1, 1.0)


@pytest.mark.parametrize("variant", VARIANTS)
def test_window_and_scale_as_device_tensors_equal_the_numbers(variant):
    """The schedule changes both during a run: as 0-dim device tensors the Triton variant reads them from
    memory (no recompile under torch.compile, no sync); the results are the same."""
    op = kernels.get("varlen_attention", variant)
    q, k, v, cu = case(90, 2, 64, [0, 33, 90], seed=6)
    numbers = op(q, k, v, cu, 21, 0.2)
    tensors = op(q, k, v, cu, torch.tensor(21, device=DEVICE), torch.tensor(0.2, device=DEVICE))
    torch.testing.assert_close(tensors, numbers, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="0-dim integer tensor"):
        op(q, k, v, cu, torch.tensor([21], device=DEVICE), 0.2)
    with pytest.raises(ValueError, match="0-dim float tensor"):
        op(q, k, v, cu, 21, torch.tensor(1, device=DEVICE))
