"""Polar Express (NorMuon's orthogonalisation): every registered variant against a float64 iteration written
from the spec (recipe-frontier.md 3.2), and the dtype semantics the record uses (one rounding per A, B, X).

On the CPU the Triton building blocks run under the interpreter (kernel outputs start as NaN: conftest.py).
"""

import pytest
import torch
from kernel_testing import DEVICE

import kernels
from kernels.polar_express import polar_express_torch
from speedrun.config import OptimConfig

VARIANTS = kernels.variants("polar_express")
COEFFS = OptimConfig().polar_express_coeffs
# wide (Q/K-like), square (V/O-like), tall (MLP-like), a batch of banks, extra leading dims, and a matrix of
# more than 1024 rows (the split last step)
SHAPES = [(16, 40), (40, 40), (72, 24), (3, 24, 56), (2, 1, 20, 36), (1100, 24)]


def randn(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64)


def polar_express_float64(G):
    """The spec's iteration in float64, plain: normalise, then per (a, b, c) on the smaller Gram matrix."""
    X = G.double()
    X = X / (X.norm(dim=(-2, -1), keepdim=True) * 1.02 + 1e-6)
    for a, b, c in COEFFS:
        if X.size(-2) > X.size(-1):
            A = X.mT @ X
            X = a * X + X @ (b * A + c * A @ A)
        else:
            A = X @ X.mT
            X = a * X + (b * A + c * A @ A) @ X
    return X


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("shape", SHAPES)
def test_fp32_matches_float64(variant, shape):
    G = randn(*shape, seed=sum(shape))
    got = kernels.get("polar_express", variant)(G.float().to(DEVICE), COEFFS, dtype=torch.float32)
    want = polar_express_float64(G)
    assert got.dtype == torch.float32 and got.shape == G.shape
    err = (got.double().cpu() - want).abs().max() / want.abs().max()
    # Polar Express multiplies small singular values by ~1000 over 5 iterations: fp32 keeps ~1e-5 of them.
    assert err < 2e-5, err


@pytest.mark.parametrize("shape", [(16, 40), (72, 24)])
def test_result_is_nearly_orthogonal(shape):
    X = polar_express_torch(randn(*shape, seed=3).float(), COEFFS, dtype=torch.float32)
    s = torch.linalg.svdvals(X.double())
    assert 0.6 < s.min() and s.max() < 1.25, s


def test_bf16_rounds_where_the_record_rounds():
    """In bf16 the output is bf16, and one iteration equals the float64 formula applied to the bf16 inputs
    with A, B and X each rounded once to bf16 (fused last step for <= 1024 rows)."""
    G = randn(24, 56, seed=5).float()
    one = ((1.0, -0.5, 0.25),)
    got = polar_express_torch(G, one, dtype=torch.bfloat16)
    X = G.bfloat16().double()
    X = (X / (X.norm() * 1.02 + 1e-6)).bfloat16().double()
    A = (X @ X.mT).bfloat16().double()
    B = (-0.5 * A + 0.25 * A @ A).bfloat16().double()
    want = (1.0 * X + B @ X).bfloat16()
    assert got.dtype == torch.bfloat16
    mismatched = (got != want).float().mean().item()
    assert mismatched < 0.02, mismatched  # bf16 gemm accumulation order may flip a few last bits


@pytest.mark.parametrize("variant", VARIANTS)
def test_zero_matrix_stays_zero(variant):
    """Padding matrices of a bank: a zero gradient gives a zero update (no NaN from the normalisation)."""
    got = kernels.get("polar_express", variant)(torch.zeros(2, 16, 40, device=DEVICE), COEFFS, dtype=torch.float32)
    assert torch.equal(got.cpu(), torch.zeros(2, 16, 40))


def test_bad_arguments():
    G = torch.ones(4, 4)
    with pytest.raises(ValueError, match="at least 2 dims"):
        polar_express_torch(torch.ones(4), COEFFS)
    with pytest.raises(TypeError, match="floating-point"):
        polar_express_torch(G.long(), COEFFS)
    with pytest.raises(TypeError, match="dtype must be"):
        polar_express_torch(G, COEFFS, dtype=torch.float64)
    with pytest.raises(ValueError, match="triples"):
        polar_express_torch(G, [(1.0, 2.0)])
    with pytest.raises(ValueError, match="triples"):
        polar_express_torch(G, [])


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("shape", [(0, 8), (8, 0), (2, 0, 5)])
def test_empty_matrices_give_empty_results(variant, shape):
    out = kernels.get("polar_express", variant)(torch.zeros(shape, device=DEVICE), COEFFS, dtype=torch.float32)
    assert out.shape == shape and out.dtype == torch.float32


@pytest.mark.parametrize("variant", [v for v in VARIANTS if v != "torch"])
def test_kernel_variants_refuse_to_be_differentiated(variant):
    """The Triton variant has no backward: asking for one raises instead of returning a wrong gradient."""
    G = randn(16, 40, seed=4).float().to(DEVICE).requires_grad_()
    out = kernels.get("polar_express", variant)(G, COEFFS, dtype=torch.float32)
    with pytest.raises(RuntimeError, match="has no backward"):
        out.sum().backward()
    with torch.no_grad():  # as the optimizer calls it: a plain result
        assert not kernels.get("polar_express", variant)(G, COEFFS, dtype=torch.float32).requires_grad
