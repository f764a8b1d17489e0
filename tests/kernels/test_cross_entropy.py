"""Softcapped cross-entropy: every registered variant against a float64 reference.

The reference here is the op's formula evaluated in float64 (``_reference64``); it cannot be
``cross_entropy_torch`` itself, which rejects float64 z and computes the logits in fp32 by design.

Tolerances (``_check``). The loss is fp32 for every z dtype, and so is dz for fp32 z: max |out - ref64|
<= max(2 * PyTorch's own max error, 1e-5 * max |ref64|), where "PyTorch's own error" is that of
``cross_entropy_torch`` on the same z with autograd; the 1e-5 relative floor (fp32 sums over V) is what
binds in practice. dz in fp16/bf16 (unit roundoff u = 2^-11 / 2^-8) is elementwise

    |dz - ref64| <= k * u * (1 + u) * |ref64| + 1e-5 * max |ref64|

with k the number of roundings to z's dtype: 1 when grad_output is 1 (the kernel's fp32 value rounded
once, like PyTorch's own gradient, which is also rounded to z's dtype, error <= u |x|); 2 when
grad_output is not 1 (the backward scales the already rounded dz in fp32 and rounds again, see
CrossEntropyTriton). The kernels round to nearest even under the CPU interpreter too (its own fp32 -> bf16
cast truncates; kernels/triton_rounding.py), so the bounds are the GPU's. With a single correct rounding
(k == 1) dz must also meet the brief's rule, max error <= 2 * PyTorch's own max error in that dtype (the GPU
recipe-shape test checks exactly this on real bf16 hardware rounding).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from kernel_testing import DEVICE, interpreter_only, needs_triton, on_device

import kernels
import kernels.common
from kernels import cross_entropy as ce

VARIANTS = kernels.variants("cross_entropy")
HAS_TRITON = "triton" in VARIANTS
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# per-row magnitudes of z: small, moderate, and two that saturate the softcap (|z| / 7.5 >> 1)
ROW_SCALES = (0.5, 3.0, 10.0, 60.0, 1.5)
# Every variant with the CPU interpreter's default tile, plus triton with the large tile of model-level runs
# (conftest.py's interpreter_tile fixture), where the kernel takes several rows per program
# (_ce_fwd_rows_kernel): rows past N, ignored and out-of-range rows inside a multi-row tile.
VARIANT_TILES = [pytest.param(v, "default", id=v) for v in VARIANTS] + (
    [pytest.param("triton", "large", id="triton-large_interpreter_tile")] if HAS_TRITON else [])
TILE_SIZES = pytest.mark.parametrize("interpreter_tile", ["default", "large"], indirect=True)


def _make(N, V, dtype=torch.float32, seed=0, ignore=(), ignore_index=-100):
    """(z (N, V) in ``dtype``, targets (N,)) on DEVICE, from a seeded CPU generator."""
    g = torch.Generator().manual_seed(seed)
    scales = torch.tensor([ROW_SCALES[i % len(ROW_SCALES)] for i in range(N)], dtype=torch.float64)
    z = (torch.randn(N, V, generator=g, dtype=torch.float64) * scales[:, None]).to(dtype)
    t = torch.randint(0, V, (N,), generator=g)
    for i in ignore:
        t[i] = ignore_index
    return on_device(z, t)


def _reference64(z, t, cap=30.0, scale=7.5, ignore_index=-100, reduction="mean", grad_out=None):
    """(loss, dz) of the op's formula in float64, on z's values upcast exactly."""
    z64 = z.detach().double().requires_grad_()
    loss = F.cross_entropy(cap * torch.sigmoid(z64 / scale), t, ignore_index=ignore_index, reduction=reduction)
    loss.backward(torch.ones_like(loss) if grad_out is None else grad_out.double())
    return loss.detach(), z64.grad


def _run(fn, z, t, grad_out=None, **kw):
    """(loss, dz) of ``fn`` with autograd; grad_out defaults to ones. z keeps its strides (no clone)."""
    z = z.detach().requires_grad_()
    loss = fn(z, t, **kw)
    loss.backward(torch.ones_like(loss) if grad_out is None else grad_out)
    return loss.detach(), z.grad


def _check(out, ref64, torch_out, rescaled=False):
    """``out`` against the float64 reference, per the module docstring; ``rescaled``: grad_output != 1."""
    ref_max = ref64.abs().max().item()
    err = (out.double() - ref64).abs()
    err_torch = (torch_out.double() - ref64).abs().max().item()
    if out.dtype in (torch.float16, torch.bfloat16):
        u = 2.0**-11 if out.dtype == torch.float16 else 2.0**-8
        k = 1 + rescaled
        worst = (err - k * u * (1 + u) * ref64.abs()).max().item()  # (1 + u): a rounding of a rounded value
        assert worst <= 1e-5 * ref_max, f"{out.dtype} error above {k} roundings by {worst:.3g}"
        if k > 1:
            return
    bound = max(2 * err_torch, 1e-5 * ref_max)
    assert err.max() <= bound, f"max error {err.max():.3g} > {bound:.3g} (PyTorch's own error {err_torch:.3g})"


def _check_variant(variant, z, t, grad_out=None, **kw):
    loss, dz = _run(kernels.get("cross_entropy", variant), z, t, grad_out, **kw)
    loss_t, dz_t = _run(ce.cross_entropy_torch, z, t, grad_out, **kw)
    loss64, dz64 = _reference64(z, t, grad_out=grad_out, **kw)
    assert loss.dtype == torch.float32 and loss.shape == loss64.shape
    assert dz.dtype == z.dtype and dz.shape == z.shape
    _check(loss, loss64, loss_t)
    _check(dz, dz64, dz_t, rescaled=grad_out is not None)
    return loss, dz


def _grad_out(reduction, N, seed=1):
    g = torch.Generator().manual_seed(seed)
    return on_device(torch.rand((N,) if reduction == "none" else (), generator=g) + 0.5)


SHAPES = [
    (1, 1000),
    (7, 1000),
    pytest.param(3, 50304, id="3-50304"),
    pytest.param(3, 50257, marks=pytest.mark.slow, id="3-50257"),
]


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("N,V", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("variant,interpreter_tile", VARIANT_TILES, indirect=["interpreter_tile"])
def test_matches_float64_reference(variant, dtype, N, V, reduction, interpreter_tile):
    z, t = _make(N, V, dtype, seed=N * V)
    # mean: grad_output 1 (the training case, one rounding of dz); sum/none: a grad_output to apply
    grad_out = None if reduction == "mean" else _grad_out(reduction, N)
    _check_variant(variant, z, t, grad_out, reduction=reduction)


@pytest.mark.parametrize("cap,scale", [(30.0, 7.5), (15.0, 2.0), (5.0, 30.0), (100.0, 10.0), (300.0, 1.0)])
@pytest.mark.parametrize("variant,interpreter_tile", VARIANT_TILES, indirect=["interpreter_tile"])
def test_cap_and_scale(variant, cap, scale, interpreter_tile):
    # caps above ce.FIXED_SHIFT_MAX_CAP take the kernel's online-max path
    z, t = _make(6, 1000, seed=3)
    _check_variant(variant, z, t, _grad_out("sum", 6), cap=cap, scale=scale, reduction="sum")


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("ignore_index", [-100, -1, 3])
@pytest.mark.parametrize("variant,interpreter_tile", VARIANT_TILES, indirect=["interpreter_tile"])
def test_ignored_rows(variant, ignore_index, reduction, interpreter_tile):
    z, t = _make(7, 1000, seed=4, ignore=(0, 3, 4), ignore_index=ignore_index)
    loss, dz = _check_variant(variant, z, t, _grad_out(reduction, 7), ignore_index=ignore_index,
                              reduction=reduction)
    ignored = t == ignore_index
    assert (dz[ignored] == 0).all()
    if reduction == "none":
        assert (loss[ignored] == 0).all()


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("variant,interpreter_tile", VARIANT_TILES, indirect=["interpreter_tile"])
def test_all_rows_ignored(variant, reduction, interpreter_tile):
    z, t = _make(3, 1000, seed=5, ignore=(0, 1, 2))
    loss, dz = _run(kernels.get("cross_entropy", variant), z, t, reduction=reduction)
    if reduction == "mean":
        assert loss.isnan()  # 0 / 0, as PyTorch
    else:
        assert (loss == 0).all()
    assert (dz == 0).all()  # PyTorch's gradient is 0 too, also for mean


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_empty_batch(variant, reduction):
    z, t = _make(0, 1000)
    loss, dz = _run(kernels.get("cross_entropy", variant), z, t, reduction=reduction)
    ref = F.cross_entropy(z, t, reduction=reduction)
    torch.testing.assert_close(loss, ref, equal_nan=True)
    assert dz.shape == (0, 1000)


@needs_triton
@TILE_SIZES
@pytest.mark.parametrize("cap", [30.0, 100.0])
@pytest.mark.parametrize("V,block_v", [(1000, 128), (200, 16), (1, 16), (50, 16), (1024, 256)])
def test_triton_chunk_loop(V, block_v, cap, interpreter_tile):
    """Many chunks, a partial last chunk, and V smaller than one chunk; both logsumexp paths."""
    z, t = _make(5, V, seed=V + block_v, ignore=(2,))
    for reduction in ("mean", "none"):
        g = _grad_out(reduction, 5)
        fn = lambda z, t, **kw: ce._cross_entropy_triton(z, t, block_v=block_v, **kw)  # noqa: E731
        loss, dz = _run(fn, z, t, g, cap=cap, reduction=reduction)
        loss_t, dz_t = _run(ce.cross_entropy_torch, z, t, g, cap=cap, reduction=reduction)
        loss64, dz64 = _reference64(z, t, cap=cap, reduction=reduction, grad_out=g)
        if V == 1:  # one class: loss and gradient are exactly 0 but computed as differences of O(cap) terms
            assert (loss64 == 0).all() and (dz64 == 0).all()
            assert loss.abs().max() <= 1e-4 and dz.abs().max() <= 1e-4, (loss, dz)
            continue
        _check(loss, loss64, loss_t)
        _check(dz, dz64, dz_t, rescaled=True)


@pytest.mark.parametrize("V", [1, 5])
@pytest.mark.parametrize("variant,interpreter_tile", VARIANT_TILES, indirect=["interpreter_tile"])
def test_fewer_classes_than_the_smallest_chunk(variant, V, interpreter_tile):
    """The op's own launch configuration (no block_v) for V below the 16-wide minimum chunk."""
    z, t = _make(4, V, seed=20 + V)
    if V > 1:
        _check_variant(variant, z, t, _grad_out("none", 4), reduction="none")
        return
    loss, dz = _run(kernels.get("cross_entropy", variant), z, t, _grad_out("none", 4), reduction="none")
    assert loss.abs().max() <= 1e-4 and dz.abs().max() <= 1e-4, (loss, dz)  # one class: exactly 0 in exact math


@needs_triton
@TILE_SIZES
def test_triton_no_host_sync(monkeypatch, interpreter_tile):
    """Forward and backward never read a device value on the host (CUDA graphs / torch.compile safe)."""
    z, t = _make(5, 1000, seed=6, ignore=(1,))

    def sync(*_a, **_k):
        raise AssertionError("host sync")

    for reduction in ("mean", "sum", "none"):
        zz = z.clone().requires_grad_()
        g = _grad_out(reduction, 5)
        with monkeypatch.context() as m:
            for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "numpy"):
                m.setattr(torch.Tensor, name, sync)
            loss = ce.cross_entropy_triton(zz, t, reduction=reduction)
            loss.backward(g)
        loss64, dz64 = _reference64(z, t, reduction=reduction, grad_out=g)
        torch.testing.assert_close(loss.double(), loss64, rtol=1e-5, atol=1e-6)


@needs_triton
@TILE_SIZES
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_triton_out_of_range_target_is_nan(reduction, monkeypatch, interpreter_tile):
    z, t = _make(4, 1000, seed=7)
    t[1], t[2] = 1000, -5
    loss, dz = _run(ce.cross_entropy_triton, z, t, reduction=reduction)
    if reduction == "none":
        assert loss[1:3].isnan().all() and loss[[0, 3]].isfinite().all()
        assert dz[1:3].isnan().all() and dz[[0, 3]].isfinite().all()
    else:
        assert loss.isnan()
    if DEVICE.type == "cpu":  # on a GPU PyTorch's own check is a device-side assert, fatal to the process
        with pytest.raises(IndexError):
            ce.cross_entropy_torch(z, t, reduction=reduction)
    monkeypatch.setattr(ce, "CHECK_TARGETS", True)
    with pytest.raises(ValueError, match="targets"):
        ce.cross_entropy_triton(z, t, reduction=reduction)


@pytest.mark.parametrize("layout", ["row_strided", "transposed", "row_stride_0"])
@pytest.mark.parametrize("variant,interpreter_tile", VARIANT_TILES, indirect=["interpreter_tile"])
def test_non_contiguous_z(variant, layout, interpreter_tile):
    z, t = _make(5, 1000, seed=8)
    if layout == "row_strided":  # a column slice of a wider buffer: rows read in place
        z = torch.cat([z, on_device(torch.randn(5, 24, generator=torch.Generator().manual_seed(1)))], dim=1)[:, :1000]
    elif layout == "transposed":  # column stride != 1: copied
        z = z.t().contiguous().t()
    else:
        z = z[:1].expand(5, 1000)
    _check_variant(variant, z, t, _grad_out("none", 5), reduction="none")


@pytest.mark.parametrize("variant,interpreter_tile", VARIANT_TILES, indirect=["interpreter_tile"])
def test_without_grad(variant, interpreter_tile):
    z, t = _make(5, 1000, seed=9, ignore=(2,))
    fn = kernels.get("cross_entropy", variant)
    with torch.no_grad():
        loss = fn(z, t, reduction="none")
    loss2 = fn(z, t, reduction="none")  # z does not require grad
    loss64, _ = _reference64(z, t, reduction="none")
    for out in (loss, loss2):
        assert not out.requires_grad
        torch.testing.assert_close(out.double(), loss64, rtol=1e-5, atol=1e-5)


@needs_triton
@interpreter_only
def test_interpreter_tile_is_read_at_launch(monkeypatch):
    """Rows per program and the chunk width come from kernels.common.INTERPRETER_TILE at each launch: the
    one-row kernel at the default tile, (tile / 32)^2 rows (at most N rounded up to a power of two) at 256."""
    seen = []
    for name in ("_ce_fwd_kernel", "_ce_fwd_rows_kernel"):
        real = getattr(ce, name)

        class Spy:
            def __getitem__(self, grid, name=name, real=real):
                def launch(*args, **kw):
                    seen.append((name, grid, kw.get("BLOCK_R"), kw["BLOCK_V"]))
                    return real[grid](*args, **kw)
                return launch

        monkeypatch.setattr(ce, name, Spy())
    z, t = _make(5, 1000, seed=11, ignore=(1,))
    for tile in (32, 256):
        monkeypatch.setattr(kernels.common, "INTERPRETER_TILE", tile)
        _check_variant("triton", z, t)
    assert seen == [("_ce_fwd_kernel", (5,), None, 1024), ("_ce_fwd_rows_kernel", (1,), 8, 1024)]


@needs_triton
def test_triton_skips_gradient_when_not_needed(monkeypatch):
    """No dz buffer or gradient sweep under torch.no_grad or for z without requires_grad."""
    seen = []
    real = ce.cross_entropy_fwd_triton
    monkeypatch.setattr(ce, "cross_entropy_fwd_triton", lambda *a: seen.append(a[6]) or real(*a))
    z, t = _make(3, 100)
    with torch.no_grad():
        ce.cross_entropy_triton(z.clone().requires_grad_(), t)
    ce.cross_entropy_triton(z, t)
    ce.cross_entropy_triton(z.clone().requires_grad_(), t)
    assert seen == [False, False, True]


@needs_triton
def test_triton_second_backward_raises():
    """The backward scales the saved gradient in place, so a second backward must fail, not be wrong."""
    z, t = _make(3, 1000, seed=10)
    z.requires_grad_()
    loss = ce.cross_entropy_triton(z, t)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="inplace"):
        loss.backward()


@pytest.mark.parametrize(
    "kind,exc",
    [
        ("z_1d", ValueError), ("z_int", TypeError), ("z_float64", TypeError), ("targets_int32", TypeError),
        ("targets_shape", ValueError), ("cap", ValueError), ("scale", ValueError), ("reduction", ValueError),
    ],
)
@pytest.mark.parametrize("variant", VARIANTS)
def test_misuse(variant, kind, exc):
    z, t = _make(3, 100)
    kw = {}
    if kind == "z_1d":
        z = z[0]
    elif kind == "z_int":
        z = z.long()
    elif kind == "z_float64":
        z = z.double()
    elif kind == "targets_int32":
        t = t.int()
    elif kind == "targets_shape":
        t = t[:2]
    elif kind in ("cap", "scale"):
        kw[kind] = 0.0 if kind == "cap" else -1.0
    else:
        kw["reduction"] = "avg"
    name = kind.split("_")[0]
    with pytest.raises(exc, match=name):
        kernels.get("cross_entropy", variant)(z, t, **kw)


@needs_triton
def test_triton_empty_vocab_rejected():
    with pytest.raises(ValueError, match="V >= 1"):
        ce.cross_entropy_triton(torch.zeros(2, 0, device=DEVICE), torch.zeros(2, dtype=torch.int64, device=DEVICE))


# ---- GPU only -------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_gpu_recipe_shape_bf16(variant, reduction):
    """bf16 z of the recipe's shape: error vs the float64 reference <= 2x PyTorch's own bf16 error."""
    N, V = 8192, 50304
    g = torch.Generator(device="cuda").manual_seed(0)
    z = (torch.randn(N, V, device="cuda", generator=g) * 4).bfloat16()
    z[::7] *= 20  # saturated rows
    t = torch.randint(0, V, (N,), device="cuda", generator=g)
    t[::11] = -100
    grad_out = torch.rand((N,) if reduction == "none" else (), device="cuda", generator=g) + 0.5
    _check_variant(variant, z, t, grad_out, reduction=reduction)


@pytest.mark.gpu
@needs_triton
def test_gpu_cuda_graph_capture():
    """Forward + backward captured in a CUDA graph (fails if anything syncs) and replayed on new data."""
    N, V = 512, 50304
    g = torch.Generator(device="cuda").manual_seed(0)
    z = torch.randn(N, V, device="cuda", dtype=torch.bfloat16, generator=g, requires_grad=True)
    t = torch.randint(0, V, (N,), device="cuda", generator=g)
    torch.cuda.set_sync_debug_mode("error")
    try:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):  # warm-up (compiles the kernel) outside the capture
            ce.cross_entropy_triton(z, t).backward()
        torch.cuda.current_stream().wait_stream(s)
        z.grad = None
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            loss = ce.cross_entropy_triton(z, t)
            loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for seed in (1, 2):
        g = torch.Generator(device="cuda").manual_seed(seed)
        with torch.no_grad():
            z.copy_(torch.randn(N, V, device="cuda", generator=g) * 5)
            t.copy_(torch.randint(0, V, (N,), device="cuda", generator=g))
            t[::5] = -100
        graph.replay()
        loss64, dz64 = _reference64(z, t)
        _check(loss, loss64, ce.cross_entropy_torch(z, t).double())
        assert (z.grad.double() - dz64).abs().max() <= 2 ** -7 * dz64.abs().max()
