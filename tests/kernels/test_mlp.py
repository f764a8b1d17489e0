"""The MLP op: every registered variant vs a float64 reference, forward and backward; the fused kernels alone.

On the CPU the Triton variant runs under the interpreter (its bf16 dots upcast to fp32 there); the
recipe-shape bf16/fp16/fp32 checks are GPU-only. Kernel outputs start as NaN (conftest.py).
"""

import pytest
import torch
import torch.nn.functional as F
from kernel_testing import DEVICE, interpreter_only, needs_triton

import kernels
import kernels.common
from kernels import mlp as mlp_mod
from kernels.mlp import mlp_torch

VARIANTS = kernels.variants("mlp")

# Max error relative to the reference's largest magnitude.
REL_TOL = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}

# bf16 runs on the CPU too: under the interpreter the kernels upcast bf16 tiles to fp32 before tl.dot
# (the interpreter's bf16 dot is wrong), so this checks bf16 loads, epilogues and stores; the bf16 MMA
# path itself is checked by the GPU tests.
CPU_DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# (x shape, hidden); dim = x.shape[-1]. The CPU interpreter's default tiles are 32x32x32, so these cover
# M, N, K not multiples of the tile, K < tile, K a multiple of the tile (the unmasked K loop), and one token.
CASES = [((3, 37, 40), 72), ((1, 40), 72), ((1, 1, 20), 33), ((2, 33, 64), 96)]

# The interpreter's tile edge (conftest.py's interpreter_tile fixture): the default, and for a few cases
# the large one of model-level runs (one tile covering, and overhanging, these shapes).
TILE_SIZES = pytest.mark.parametrize("interpreter_tile", ["default", "large"], indirect=True)


def mlp_float64(x, w_fc, w_proj):
    """mlp_torch's formula without its dtype check (which rejects float64)."""
    return F.linear(F.relu(F.linear(x, w_fc.type_as(x))).square(), w_proj.type_as(x))


def make_inputs(x_shape, hidden, dtype, w_dtype=None, device=DEVICE, seed=0):
    """Fresh random x, w_fc, w_proj, dout (never zeros), scaled so pre-activations and outputs are O(1)."""
    g = torch.Generator().manual_seed(seed)
    dim = x_shape[-1]
    w_dtype = w_dtype or dtype
    x = torch.randn(x_shape, generator=g).to(device, dtype)
    w_fc = (torch.randn(hidden, dim, generator=g) / dim**0.5).to(device, w_dtype)
    w_proj = (torch.randn(dim, hidden, generator=g) / hidden**0.5).to(device, w_dtype)
    dout = torch.randn(x_shape, generator=g).to(device, dtype)
    return x, w_fc, w_proj, dout


def run(fn, x, w_fc, w_proj, dout, dtype=None):
    """out, dx, dw_fc, dw_proj of fn on leaf copies (cast to ``dtype`` if given)."""
    leaves = [t.detach().to(dtype or t.dtype).requires_grad_() for t in (x, w_fc, w_proj)]
    out = fn(*leaves)
    out.backward(dout.to(out.dtype))
    return [out.detach()] + [t.grad for t in leaves]


def rel_err(got, ref):
    return ((got.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


def test_outputs_are_poisoned():
    assert kernels.common.POISON_OUTPUTS
    assert kernels.common.new_empty((2,), torch.float32, "cpu").isnan().all()


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("x_shape,hidden", CASES, ids=str)
def test_mlp_matches_float64(variant, dtype, x_shape, hidden):
    x, w_fc, w_proj, dout = make_inputs(x_shape, hidden, dtype)
    got = run(kernels.get("mlp", variant), x, w_fc, w_proj, dout)
    ref = run(mlp_float64, x, w_fc, w_proj, dout, dtype=torch.float64)
    for name, g, r, t in zip(("out", "dx", "dw_fc", "dw_proj"), got, ref, (x, x, w_fc, w_proj), strict=True):
        assert g.shape == r.shape and g.dtype == t.dtype, name
        assert rel_err(g, r) <= REL_TOL[dtype], (name, rel_err(g, r))


def test_float64_reference_is_mlp_torch():
    x, w_fc, w_proj, _ = make_inputs((5, 40), 72, torch.float32)
    torch.testing.assert_close(mlp_float64(x, w_fc, w_proj), mlp_torch(x, w_fc, w_proj))


@TILE_SIZES
@pytest.mark.parametrize("variant", VARIANTS)
def test_mlp_mixed_dtypes_and_strides(variant, interpreter_tile):
    """fp16 activations (non-contiguous), fp32 weights: out in fp16, weight grads in fp32."""
    x, w_fc, w_proj, dout = make_inputs((37, 40), 72, torch.float16, w_dtype=torch.float32)
    x, dout = x.t().contiguous().t(), dout.t().contiguous().t()  # column-major (37, 40)
    assert not x.is_contiguous()
    got = run(kernels.get("mlp", variant), x, w_fc, w_proj, dout)
    ref = run(mlp_float64, x, w_fc, w_proj, dout, dtype=torch.float64)
    assert [t.dtype for t in got] == [torch.float16, torch.float16, torch.float32, torch.float32]
    for g, r in zip(got, ref, strict=True):
        assert rel_err(g, r) <= REL_TOL[torch.float16]


@pytest.mark.parametrize("variant", VARIANTS)
def test_mlp_frozen_weights(variant):
    """Only x needs a gradient: the backward skips the weight gradients."""
    x, w_fc, w_proj, dout = make_inputs((3, 7, 40), 72, torch.float32)
    x = x.requires_grad_()
    kernels.get("mlp", variant)(x, w_fc, w_proj).backward(dout)
    xr = x.detach().double().requires_grad_()
    mlp_float64(xr, w_fc.double(), w_proj.double()).backward(dout.double())
    assert rel_err(x.grad, xr.grad) <= REL_TOL[torch.float32]
    assert w_fc.grad is None and w_proj.grad is None


@needs_triton
@TILE_SIZES
@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("m,k,n", [(37, 40, 72), (1, 20, 33), (64, 64, 64)])
def test_linear_relu2_kernel(dtype, m, k, n, interpreter_tile):
    x, w, _, _ = make_inputs((m, k), n, dtype)
    post = mlp_mod.linear_relu2(x, w)
    ref = F.relu(x.double() @ w.double().t()).square()
    assert post.shape == (m, n) and post.dtype == dtype
    assert rel_err(post, ref) <= REL_TOL[dtype]


@needs_triton
@TILE_SIZES
@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
def test_relu2_backward_matmul_kernel(dtype, interpreter_tile):
    """d_pre = (dout @ w_proj) * 2 sqrt(post) equals autograd through relu(pre)^2."""
    x, w_fc, w_proj, dout = make_inputs((37, 40), 72, dtype)
    post = mlp_mod.linear_relu2(x, w_fc)
    d_pre = mlp_mod.relu2_backward_matmul(dout, w_proj, post)
    pre = (x.double() @ w_fc.double().t()).requires_grad_()
    F.linear(F.relu(pre).square(), w_proj.double()).backward(dout.double())
    assert d_pre.shape == (37, 72) and d_pre.dtype == dtype
    assert rel_err(d_pre, pre.grad) <= REL_TOL[dtype]


@needs_triton
def test_plain_matmul_epilogue():
    x, w, _, _ = make_inputs((37, 40), 72, torch.float32)
    c = mlp_mod._matmul_epilogue(x, w.t(), mlp_mod.EPILOGUE_NONE)
    assert rel_err(c, x.double() @ w.double().t()) <= 1e-6


@needs_triton
@interpreter_only
def test_interpreter_tile_is_read_at_launch(monkeypatch):
    """The block sizes come from kernels.common.INTERPRETER_TILE when the kernel is launched, cut to each
    dimension rounded up to a power of two."""
    seen = []
    real = mlp_mod._matmul_epilogue_jit

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kw):
                seen.append((kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_K"]))
                return real[grid](*args, **kw)
            return launch

    monkeypatch.setattr(mlp_mod, "_matmul_epilogue_jit", Spy())
    x, w, _, _ = make_inputs((300, 40), 72, torch.float32)
    for tile in (32, 256):
        monkeypatch.setattr(kernels.common, "INTERPRETER_TILE", tile)
        assert rel_err(mlp_mod.linear_relu2(x, w), F.relu(x.double() @ w.double().t()).square()) <= 1e-5
    assert seen == [(32, 32, 32), (256, 128, 64)]


@pytest.mark.parametrize("variant", VARIANTS)
def test_mlp_misuse(variant):
    fn = kernels.get("mlp", variant)
    x, w_fc, w_proj, _ = make_inputs((2, 5, 8), 16, torch.float32)
    with pytest.raises(TypeError, match="x"):
        fn(x.cpu().numpy(), w_fc, w_proj)
    with pytest.raises(TypeError, match="x"):
        fn(x.to(torch.int32), w_fc, w_proj)
    with pytest.raises(TypeError, match="w_fc"):
        fn(x, w_fc.double(), w_proj)
    with pytest.raises(ValueError, match="w_fc"):
        fn(x, w_fc[None], w_proj)
    with pytest.raises(ValueError, match="x"):
        fn(x[..., :7], w_fc, w_proj)
    with pytest.raises(ValueError, match="w_proj"):
        fn(x, w_fc, w_proj[:, :15])
    with pytest.raises(ValueError, match="one device"):
        fn(x, w_fc, w_proj.to("meta"))


@needs_triton
def test_triton_misuse():
    x, w_fc, w_proj, dout = make_inputs((5, 8), 16, torch.float32)
    with pytest.raises(ValueError, match="x is on meta"):
        mlp_mod.mlp_triton(x.to("meta"), w_fc.to("meta"), w_proj.to("meta"))
    with pytest.raises(ValueError, match="x must be 2-D"):
        mlp_mod.linear_relu2(x[None], w_fc)
    with pytest.raises(TypeError, match="w must be"):
        mlp_mod.linear_relu2(x, w_fc.to(torch.int64))
    with pytest.raises(ValueError, match=r"x.shape\[1\]"):
        mlp_mod.linear_relu2(x, w_fc[:, :7])
    with pytest.raises(ValueError, match="one device"):
        mlp_mod.linear_relu2(x, w_fc.to("meta"))
    post = mlp_mod.linear_relu2(x, w_fc)
    with pytest.raises(ValueError, match="post"):
        mlp_mod.relu2_backward_matmul(dout, w_proj, post[:4])
    with pytest.raises(ValueError, match="post"):
        mlp_mod.relu2_backward_matmul(dout, w_proj, post.half())


# ---------------------------------------------------------------------------------------- GPU only


@pytest.mark.gpu
@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("w_dtype", ["same", torch.float32], ids=str)
def test_mlp_recipe_shape_gpu(dtype, w_dtype):
    """x 8192x768, W_fc 3072x768: the kernel's max error vs float64 is at most 2x PyTorch's own error."""
    x, w_fc, w_proj, dout = make_inputs((8192, 768), 3072, dtype, w_dtype=None if w_dtype == "same" else w_dtype,
                                        device="cuda")
    ref = run(mlp_float64, x, w_fc, w_proj, dout, dtype=torch.float64)
    torch_res = run(mlp_torch, x, w_fc, w_proj, dout)
    triton_res = run(mlp_mod.mlp_triton, x, w_fc, w_proj, dout)
    for name, k, t, r in zip(("out", "dx", "dw_fc", "dw_proj"), triton_res, torch_res, ref, strict=True):
        assert k.dtype == t.dtype, name
        err_k = (k.double() - r).abs().max().item()
        err_t = (t.double() - r).abs().max().item()
        assert err_k <= 2 * err_t + 1e-12 * r.abs().max().item(), (name, err_k, err_t)


@pytest.mark.gpu
@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_linear_relu2_recipe_shape_gpu(dtype):
    x, w, _, _ = make_inputs((8192, 768), 3072, dtype, device="cuda")
    ref = F.relu(x.double() @ w.double().t()).square()
    err_k = (mlp_mod.linear_relu2(x, w).double() - ref).abs().max()
    err_t = (F.relu(x @ w.t()).square().double() - ref).abs().max()
    assert err_k <= 2 * err_t


@needs_triton
@pytest.mark.parametrize("scale", [1.0, 1e-2, 1e-3, 1e-4])
def test_fp16_gradients_within_twice_pytorchs_error_at_every_scale(scale):
    """Small inputs make post = relu(pre)^2 subnormal or zero in fp16: the gradients must still be within
    2x PyTorch's own fp16 error against fp32 (Tri Dao's rule), output and every gradient separately."""
    x, w_fc, w_proj, dout = make_inputs((2, 37, 40), 72, torch.float32, seed=11)
    x = x * scale
    ref = run(mlp_float64, x.double(), w_fc.double(), w_proj.double(), dout.double())
    torch16 = run(mlp_torch, x, w_fc, w_proj, dout, dtype=torch.float16)
    triton16 = run(mlp_mod.mlp_triton, x, w_fc, w_proj, dout, dtype=torch.float16)
    for name, got, pytorch, r in zip(("out", "dx", "dw_fc", "dw_proj"), triton16, torch16, ref, strict=True):
        own = (pytorch.double() - r).abs().max().item()
        err = (got.double() - r).abs().max().item()
        assert err <= 2 * own + 1e-12 * r.abs().max().item(), (name, err, own)
