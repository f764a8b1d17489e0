"""Newton-Schulz: every registered variant vs the reference; the Triton building blocks vs float64.

On the CPU the Triton kernels run under the interpreter (its bf16 dots upcast to fp32 there); the
recipe-shape bf16 checks are GPU-only. Kernel outputs start as NaN (conftest.py), so a
lower-triangle tile the mirror store forgets fails the comparisons.
"""

import pytest
import torch
from kernel_testing import DEVICE, interpreter_only, needs_triton

import kernels
import kernels.common
from kernels import newton_schulz as ns
from kernels.newton_schulz import DEFAULT_COEFFS, newton_schulz_torch

VARIANTS = kernels.variants("newton_schulz")

# The CPU interpreter's default tiles are 32x32 (BLOCK_K 32): these cover m < tile, m and k not multiples
# of the tile, multiples of it, batch 1, odd batch (3), extra leading dims and plain 2-D.
XXT_SHAPES = [(1, 20, 9), (3, 40, 70), (70, 33), (2, 64, 64), (2, 1, 36, 50)]
SYM_SHAPES = [(1, 20), (3, 40), (70,), (2, 64), (2, 1, 36)]  # leading dims + m: A is (..., m, m)
# Full NS: square, wide, tall, the qkv batch of three, extra leading dims.
NS_SHAPES = [(48, 48), (40, 72), (72, 40), (3, 40, 40), (2, 1, 20, 36)]
REL_TOL = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}
# bf16 runs on the CPU too: under the interpreter the kernels upcast bf16 tiles to fp32 before tl.dot
# (the interpreter's bf16 dot is wrong); the bf16 MMA path itself is checked by the GPU tests.
CPU_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# The interpreter's tile edge (conftest.py's interpreter_tile fixture): the default, and for some cases
# the large one of model-level runs (one tile covering, and overhanging, these shapes).
TILE_SIZES = pytest.mark.parametrize("interpreter_tile", ["default", "large"], indirect=True)


def randn(*shape, dtype=torch.float32, seed=0, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(device, dtype)


def rand_symmetric(*shape, dtype, seed=0):
    """Symmetric A (..., m, m) scaled like the Gram matrix of a unit-norm X (spectral norm <= 1)."""
    R = randn(*shape, shape[-1], dtype=torch.float64, seed=seed)
    A = (R + R.mT) / 2
    return (A / torch.linalg.matrix_norm(A, keepdim=True)).to(dtype)


def ns_float64(G, steps=5, coeffs=DEFAULT_COEFFS, eps=1e-7):
    """newton_schulz_torch's iteration in float64 (its dtype check rejects float64)."""
    a, b, c = coeffs
    X = G.double()
    tall = X.size(-2) > X.size(-1)
    X = X.mT if tall else X
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + eps)
    for _ in range(steps):
        A = X @ X.mT
        X = a * X + (b * A + c * A @ A) @ X
    return X.mT if tall else X


def rel_err(got, ref):
    return ((got.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


# ------------------------------------------------------------------------------------- the op


@TILE_SIZES
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("shape", NS_SHAPES, ids=str)
def test_newton_schulz_matches_reference_fp32(variant, shape, interpreter_tile):
    G = randn(*shape)
    X = kernels.get("newton_schulz", variant)(G, dtype=torch.float32)
    ref = newton_schulz_torch(G, dtype=torch.float32)
    assert X.shape == G.shape and X.dtype == torch.float32
    torch.testing.assert_close(X, ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(X.double(), ns_float64(G), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("steps,coeffs", [(0, DEFAULT_COEFFS), (2, (2.0, -1.5, 0.5))])
def test_newton_schulz_steps_and_coeffs(variant, steps, coeffs):
    G = randn(3, 40, 24, dtype=torch.float16, seed=1)  # tall, fp16 input cast to fp32
    X = kernels.get("newton_schulz", variant)(G, steps=steps, coeffs=coeffs, dtype=torch.float32)
    torch.testing.assert_close(X, newton_schulz_torch(G, steps=steps, coeffs=coeffs, dtype=torch.float32),
                               rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_newton_schulz_half(variant, dtype):
    """In fp16/bf16 the error vs float64 is at most 2x the reference's own error in that dtype."""
    G = randn(3, 40, 72, seed=2)
    ref = ns_float64(G)
    X = kernels.get("newton_schulz", variant)(G, dtype=dtype)
    assert X.dtype == dtype
    err = (X.double() - ref).abs().max()
    err_torch = (newton_schulz_torch(G, dtype=dtype).double() - ref).abs().max()
    assert err <= 2 * err_torch, (err, err_torch)


@pytest.mark.parametrize("variant", VARIANTS)
def test_newton_schulz_orthogonalises(variant):
    """Five steps from a unit-norm start push singular values into ~[0.68, 1.2] unless they start tiny.

    A random square matrix has a near-zero smallest singular value (a 48x48 one ends near 0.06 after
    five steps, as with the reference), so [0.5, 1.5] is asserted for wide and tall matrices only, and
    the square case is compared with the reference's singular values.
    """
    fn = kernels.get("newton_schulz", variant)
    for shape in [(40, 120), (120, 40), (3, 24, 64)]:
        G = randn(*shape, seed=3)
        sv = torch.linalg.svdvals(fn(G, dtype=torch.float32).double())
        assert sv.min() >= 0.5 and sv.max() <= 1.5, (shape, sv.min(), sv.max())
    G = randn(48, 48, seed=3)
    sv = torch.linalg.svdvals(fn(G, dtype=torch.float32).double())
    sv_ref = torch.linalg.svdvals(newton_schulz_torch(G, dtype=torch.float32).double())
    torch.testing.assert_close(sv, sv_ref, rtol=1e-4, atol=1e-5)
    assert sv.max() <= 1.5


@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANTS)
def test_newton_schulz_larger(variant):
    """More tiles per side (4x4 at 128) and a longer K loop."""
    G = randn(3, 100, 130, seed=4)
    X = kernels.get("newton_schulz", variant)(G, dtype=torch.float32)
    torch.testing.assert_close(X, newton_schulz_torch(G, dtype=torch.float32), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("variant", VARIANTS)
def test_newton_schulz_misuse(variant):
    fn = kernels.get("newton_schulz", variant)
    G = randn(8, 12)
    with pytest.raises(TypeError, match="G"):
        fn(G.cpu().numpy())
    with pytest.raises(ValueError, match="G"):
        fn(G[0])
    with pytest.raises(TypeError, match="G"):
        fn(G.to(torch.int32))
    with pytest.raises(TypeError, match="dtype"):
        fn(G, dtype=torch.float64)
    with pytest.raises(ValueError, match="steps"):
        fn(G, steps=-1)


# -------------------------------------------------------------------------- the Triton blocks


@needs_triton
@TILE_SIZES
@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("shape", XXT_SHAPES, ids=str)
def test_xxt(dtype, shape, interpreter_tile):
    X = randn(*shape, dtype=dtype)
    A = ns.xxt_triton(X)
    ref = X.double() @ X.double().mT
    assert A.shape == ref.shape and A.dtype == dtype
    assert not A.isnan().any()  # every tile written, the mirrored lower triangle included
    assert rel_err(A, ref) <= REL_TOL[dtype]


@needs_triton
@TILE_SIZES
@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("shape", SYM_SHAPES, ids=str)
def test_ba_plus_caa(dtype, shape, interpreter_tile):
    A = rand_symmetric(*shape, dtype=dtype)
    b, c = DEFAULT_COEFFS[1:]
    B = ns.ba_plus_caa_triton(A, b, c)
    Ad = A.double()
    ref = b * Ad + c * Ad @ Ad
    assert B.shape == A.shape and B.dtype == dtype
    assert not B.isnan().any()
    assert rel_err(B, ref) <= REL_TOL[dtype]


@needs_triton
def test_xxt_strided_input():
    """A transposed (non-contiguous) X, as newton_schulz passes for tall matrices."""
    X = randn(2, 70, 40).mT
    torch.testing.assert_close(ns.xxt_triton(X).double(), X.double() @ X.double().mT, rtol=1e-5, atol=1e-4)


@needs_triton
@interpreter_only
def test_interpreter_tile_is_read_at_launch(monkeypatch):
    """BLOCK and BLOCK_K come from kernels.common.INTERPRETER_TILE at each launch, cut to m and k rounded up
    to powers of two."""
    seen = []
    real = ns._syrk_jit

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kw):
                seen.append((kw["BLOCK"], kw["BLOCK_K"]))
                return real[grid](*args, **kw)
            return launch

    monkeypatch.setattr(ns, "_syrk_jit", Spy())
    X = randn(2, 100, 300)
    for tile in (32, 256):
        monkeypatch.setattr(kernels.common, "INTERPRETER_TILE", tile)
        assert rel_err(ns.xxt_triton(X), X.double() @ X.double().mT) <= 1e-5
    assert seen == [(32, 32), (128, 256)]


@needs_triton
def test_block_misuse():
    X = randn(4, 6)
    with pytest.raises(ValueError, match="X"):
        ns.xxt_triton(X[0])
    with pytest.raises(TypeError, match="X"):
        ns.xxt_triton(X.to(torch.int64))
    with pytest.raises(TypeError, match="X"):
        ns.xxt_triton([[1.0]])
    with pytest.raises(ValueError, match="X is on meta"):
        ns.xxt_triton(X.to("meta"))
    with pytest.raises(ValueError, match="A must be square"):
        ns.ba_plus_caa_triton(X, 1.0, 1.0)
    with pytest.raises(TypeError, match="b"):
        ns.ba_plus_caa_triton(X[:, :4], torch.tensor(1.0), 1.0)
    with pytest.raises(TypeError, match="A"):
        ns.ba_plus_caa_triton(X[:, :4].double(), 1.0, 1.0)
    with pytest.raises(ValueError, match="G is on meta"):
        ns.newton_schulz_triton(X.to("meta"))


# ---------------------------------------------------------------------------------------- GPU only

RECIPE_SHAPES = [(3, 768, 768), (768, 3072), (3072, 768)]


def _max_err(x, ref):
    return (x.double() - ref).abs().max().item()


@pytest.mark.gpu
@needs_triton
@pytest.mark.parametrize("shape", RECIPE_SHAPES, ids=str)
def test_newton_schulz_recipe_bf16_gpu(shape):
    """bf16 at the recipe shapes: max error vs float64 at most 2x the reference's own bf16 error."""
    G = randn(*shape, device="cuda")
    ref = ns_float64(G)
    err = _max_err(ns.newton_schulz_triton(G, dtype=torch.bfloat16), ref)
    err_torch = _max_err(newton_schulz_torch(G, dtype=torch.bfloat16), ref)
    assert err <= 2 * err_torch, (err, err_torch)


@pytest.mark.gpu
@needs_triton
@pytest.mark.parametrize("shape", RECIPE_SHAPES, ids=str)
def test_blocks_recipe_bf16_gpu(shape):
    X = randn(*shape, device="cuda")
    X = X.mT if X.size(-2) > X.size(-1) else X
    X = (X / X.norm(dim=(-2, -1), keepdim=True)).to(torch.bfloat16)
    ref = X.double() @ X.double().mT
    A = ns.xxt_triton(X)
    assert _max_err(A, ref) <= 2 * _max_err(ns.xxt_torch(X), ref)
    b, c = DEFAULT_COEFFS[1:]
    ref = b * A.double() + c * A.double() @ A.double()
    assert _max_err(ns.ba_plus_caa_triton(A, b, c), ref) <= 2 * _max_err(ns.ba_plus_caa_torch(A, b, c), ref)


@pytest.mark.gpu
@needs_triton
def test_newton_schulz_no_host_sync_gpu():
    G = randn(3, 768, 768, device="cuda")
    ns.newton_schulz_triton(G)  # compile and autotune first (tuning synchronises)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        ns.newton_schulz_triton(G)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("shape", [(0, 8), (8, 0), (2, 0, 5)])
def test_empty_matrices_give_empty_results(variant, shape):
    out = kernels.get("newton_schulz", variant)(torch.zeros(shape, device=DEVICE), dtype=torch.float32)
    assert out.shape == shape and out.dtype == torch.float32


@needs_triton
def test_triton_variant_refuses_to_be_differentiated():
    """Its result used to carry a graph through the kernels' inputs whose gradient was wrong (87% off)."""
    G = randn(24, 40, seed=5).requires_grad_()
    out = ns.newton_schulz_triton(G, dtype=torch.float32)
    with pytest.raises(RuntimeError, match="has no backward"):
        out.sum().backward()
    reference = newton_schulz_torch(G, dtype=torch.float32)  # the reference differentiates through torch ops
    reference.sum().backward()
    assert G.grad is not None and G.grad.isfinite().all()
