"""Every registered attention variant against the fp64 reference, forward and backward; the triton
variant's tile skipping, window handling and argument checks.

Tolerances. fp32 (CPU): 1e-5 abs + 1e-5 rel against fp64. Values and gradients are O(1) and every
output is a sum of at most T fp32 products accumulated in fp32 (unit roundoff 6e-8); the observed error is
~1e-6. fp16 / bf16: the kernel's max error against the high-precision reference must be at most twice
PyTorch's own error in that dtype, measured with PyTorch's attention kernel (scaled_dot_product_attention
with the same boolean mask) on the same low-precision inputs. Not the reference op run in that dtype: it
upcasts to fp32 and rounds only its results, so its "error" is pure output rounding, while every flash
attention (PyTorch's too) also rounds P and dS to the input dtype before their matmuls; against that
rounding-only error the gradients of this kernel and of PyTorch's SDPA alike are 1.3x-2.6x off (measured
on CPU in fp16), against SDPA's error the kernel is within 1.4x.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from kernel_testing import DEVICE, TRITON_RUNS, WHY_NOT, interpreter_only, needs_triton

import kernels
import kernels.attention as A
import kernels.common

try:
    import triton
    import triton.language as tl

    from kernels import attention_kernels as K
except ImportError:
    triton = None

VARIANTS = kernels.variants("attention")
SCALE = 0.12


# flex_attention (CUDA only) compiles for every shape and dtype (~20 s each): it is checked on these cases only.
FLEX_CASES = ("window_gt_tile", "gpu-recipe-T4096-w14-bfloat16")


def _skip_unless_runs(variant: str, dtype: torch.dtype = torch.float32, case: str | None = None):
    if variant == "flex" and case not in FLEX_CASES:
        pytest.skip(f"flex_attention compiles per shape: checked on {', '.join(FLEX_CASES)} only")
    if variant == "triton" and not TRITON_RUNS:
        pytest.skip(WHY_NOT)
    if variant == "triton" and dtype == torch.bfloat16 and DEVICE.type == "cpu":
        pytest.skip("bf16 tl.dot is wrong under the Triton CPU interpreter")


def _docs(T: int, lengths, device=DEVICE) -> torch.Tensor:
    """(T,) int32 doc ids from document lengths; the last document takes the remaining tokens."""
    lengths = [n for n in lengths if n > 0]
    ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths, dtype=torch.long))[:T]
    ids = torch.cat([ids, torch.full((T - len(ids),), len(lengths))])
    return ids.to(torch.int32).to(device)


def _inputs(B, T, H, D, dtype, seed=0, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    q, k, v, do = (torch.randn(B, T, H, D, generator=g).to(dtype).to(device) for _ in range(4))
    return q, k, v, do


def _run(fn, q, k, v, do, doc_ids, window, block_size, dtype, **kw):
    """out, dq, dk, dv of ``fn`` on fresh leaf copies of q, k, v in ``dtype``."""
    leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    out = fn(*leaves, doc_ids, window, SCALE, block_size, **kw)
    grads = torch.autograd.grad(out, leaves, do.to(dtype))
    return (out, *grads)


NAMES = ("out", "dq", "dk", "dv")

# B, T, H, D, block_size, window, document lengths (a list per batch row, or one list for all)
CASES = {
    "T_not_tile_multiple": (1, 83, 2, 64, 16, 3, [5, 35, 1]),
    "window0": (1, 70, 2, 64, 16, 0, []),
    "window1": (1, 70, 2, 64, 16, 1, [30]),
    "window_eq_tile": (1, 96, 2, 64, 16, 2, [50]),
    "window_gt_tile": (1, 100, 2, 64, 16, 5, [17, 1, 40]),
    "window_gt_T": (1, 64, 2, 64, 16, 50, [20]),
    "one_doc_long": (1, 160, 1, 64, 16, 3, []),
    "tiny_docs": (1, 60, 2, 64, 8, 4, [1, 2, 1, 3, 1, 1, 2, 3, 1, 2, 2, 1, 1, 3, 2, 1, 1, 1, 2, 3, 1, 2]),
    "block_size_1": (1, 50, 1, 64, 1, 20, [25]),
    "block_size_7": (1, 77, 1, 64, 7, 3, [9, 30]),
    "block_size_gt_T": (1, 90, 1, 64, 128, 1, [33, 1, 2]),
    "batch3": (3, 57, 2, 64, 16, 2, [[57], [10, 1, 20], [1, 1, 1, 30]]),
    "head_dim_128": (1, 40, 1, 128, 16, 2, [13]),
    "T1": (1, 1, 2, 64, 16, 1, []),
    "recipe_block_size": (1, 700, 1, 64, 128, 3, [90, 1, 300, 2, 150]),
    "recipe_block_size_d128": (1, 400, 1, 128, 128, 2, [200, 1, 20]),
}
TILES = {"T_not_tile_multiple": (16, 16), "window_gt_tile": (64, 32), "batch3": (16, 64)}
SLOW = {"tiny_docs", "block_size_1", "one_doc_long", "recipe_block_size", "recipe_block_size_d128"}
FP16_CASES = ("T_not_tile_multiple", "window_gt_tile", "batch3", "head_dim_128", "recipe_block_size_d128")
# Cases also run (triton only) with the large interpreter tile of model-level runs (conftest.py's
# interpreter_tile fixture): one tile larger than T, T1, and T = 700 in tiles of 256 / 128.
LARGE_TILE_CASES = ("T_not_tile_multiple", "window_gt_tile", "tiny_docs", "batch3", "head_dim_128", "T1",
                    "recipe_block_size")
LARGE_TILE_FP16_CASES = ("window_gt_tile",)


def _case(name, dtype=torch.float64):
    B, T, H, D, bs, w, lengths = CASES[name]
    rows = lengths if lengths and isinstance(lengths[0], list) else [lengths] * B
    doc_ids = torch.stack([_docs(T, r) for r in rows])
    q, k, v, do = _inputs(B, T, H, D, dtype, seed=len(name))
    return q, k, v, do, doc_ids, w, bs


def _params(names, with_tiles, large=()):
    """(variant, name, tiles, interpreter_tile) for each case; the names in ``large`` also run (triton only,
    no tile override) with the large interpreter tile."""
    out = []
    for variant in VARIANTS:
        for name in names:
            marks = [pytest.mark.slow] if name in SLOW else []
            tiles = [None] + ([TILES[name]] if with_tiles and name in TILES and variant == "triton" else [])
            for t in tiles:
                out.append(pytest.param(variant, name, t, "default", marks=marks, id=f"{variant}-{name}-tiles{t}"))
            if variant == "triton" and name in large:
                out.append(pytest.param(variant, name, None, "large", marks=marks,
                                        id=f"{variant}-{name}-large_interpreter_tile"))
    return out


@pytest.mark.parametrize("variant,name,tiles,interpreter_tile",
                         _params(CASES, with_tiles=True, large=LARGE_TILE_CASES), indirect=["interpreter_tile"])
def test_fp32_matches_fp64_reference(variant, name, tiles, interpreter_tile):
    _skip_unless_runs(variant)
    q, k, v, do, doc_ids, w, bs = _case(name)
    ref = _run(A.attention_torch, q, k, v, do, doc_ids, w, bs, torch.float64)
    kw = {"tiles": tiles} if tiles else {}
    got = _run(kernels.get("attention", variant), q, k, v, do, doc_ids, w, bs, torch.float32, **kw)
    for n, g, r in zip(NAMES, got, ref, strict=True):
        assert g.dtype == torch.float32 and g.shape == r.shape, n
        torch.testing.assert_close(g.double(), r, atol=1e-5, rtol=1e-5, msg=lambda m, n=n: f"{n}: {m}")


def _sdpa(q, k, v, doc_ids, window, scale, block_size):
    """PyTorch's own attention kernel with the op's mask, (B, T, H, D) in and out."""
    mask = A.attention_mask(doc_ids, window, block_size)[:, None]
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale).transpose(1, 2)


def _lowp_check(variant, q, k, v, do, doc_ids, w, bs, dtype, ref_dtype):
    """Kernel error vs the ref_dtype reference <= 2x PyTorch's SDPA error in ``dtype`` (module docstring)."""
    q, k, v, do = (t.to(dtype).to(ref_dtype) for t in (q, k, v, do))  # exactly representable in dtype
    ref = _run(A.attention_torch, q, k, v, do, doc_ids, w, bs, ref_dtype)
    own = _run(_sdpa, q, k, v, do, doc_ids, w, bs, dtype)
    got = _run(kernels.get("attention", variant), q, k, v, do, doc_ids, w, bs, dtype)
    for n, g, o, r in zip(NAMES, got, own, ref, strict=True):
        assert g.dtype == dtype, n
        err = (g.to(ref_dtype) - r).abs().max().item()
        torch_err = (o.to(ref_dtype) - r).abs().max().item()
        assert err <= 2 * torch_err, f"{n}: max error {err:.3g} > 2 x PyTorch's {dtype} error {torch_err:.3g}"


@pytest.mark.parametrize("variant,name,tiles,interpreter_tile",
                         _params(FP16_CASES, with_tiles=False, large=LARGE_TILE_FP16_CASES),
                         indirect=["interpreter_tile"])
def test_fp16_within_twice_torch_error(variant, name, tiles, interpreter_tile):
    _skip_unless_runs(variant, torch.float16, name)
    q, k, v, do, doc_ids, w, bs = _case(name)
    _lowp_check(variant, q, k, v, do, doc_ids, w, bs, torch.float16, torch.float64)


@pytest.mark.parametrize("variant", VARIANTS)
def test_strided_inputs(variant):
    """q, k, v as views of a packed (B, T, 3, H, D) tensor, v with a non-unit D stride, dout transposed."""
    _skip_unless_runs(variant)
    B, T, H, D = 1, 45, 2, 64
    g = torch.Generator().manual_seed(1)
    qkv = torch.randn(B, T, 3, H, D, generator=g).to(DEVICE)
    q, k, _ = qkv.unbind(2)
    v = torch.randn(B, T, D, H, generator=g).to(DEVICE).transpose(-1, -2)
    do = torch.randn(B, H, T, D, generator=g).to(DEVICE).transpose(1, 2)
    doc_ids = _docs(T, [20])[None].long()  # int64 doc ids are accepted too
    assert not q.is_contiguous() and v.stride(-1) != 1 and not do.is_contiguous()
    ref = _run(A.attention_torch, q, k, v, do, doc_ids, 2, 16, torch.float64)
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out = kernels.get("attention", variant)(*leaves, doc_ids, 2, SCALE, 16)
    got = (out, *torch.autograd.grad(out, leaves, do))
    for n, gt, r in zip(NAMES, got, ref, strict=True):
        torch.testing.assert_close(gt.double(), r, atol=1e-5, rtol=1e-5, msg=lambda m, n=n: f"{n}: {m}")


@pytest.mark.parametrize("variant", VARIANTS)
def test_window_int_and_tensor_identical(variant):
    _skip_unless_runs(variant)
    q, k, v, do, doc_ids, _, bs = _case("window_gt_tile")
    fn = kernels.get("attention", variant)
    a = _run(fn, q, k, v, do, doc_ids, 3, bs, torch.float32)
    b = _run(fn, q, k, v, do, doc_ids, torch.tensor(3, device=DEVICE), bs, torch.float32)
    c = _run(fn, q, k, v, do, doc_ids, torch.tensor([3], dtype=torch.int64), bs, torch.float32)  # host, 1 elem
    for n, x, y, z in zip(NAMES, a, b, c, strict=True):
        assert torch.equal(x, y) and torch.equal(x, z), n


class _Recorder:
    """Stands in for a @triton.jit kernel: records each launch's non-tensor arguments, then launches."""

    def __init__(self, kernel, log):
        self.kernel, self.log = kernel, log

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            sig = tuple(("tensor", a.dtype) if isinstance(a, torch.Tensor) else a for a in args)
            self.log.append((self.kernel, grid, sig, tuple(sorted(kwargs.items()))))
            return self.kernel[grid](*args, **kwargs)

        return launch


def _cache_sizes():
    """Compiled-kernel count of each attention kernel (GPU only; the interpreter compiles nothing)."""
    sizes = []
    for kern in (K.attn_fwd_kernel, K.attn_bwd_dkdv_kernel, K.attn_bwd_dq_kernel):
        caches = getattr(kern, "device_caches", {})
        sizes.append(sum(len(c[0]) for c in caches.values()))
    return sizes


def test_changing_window_does_not_recompile():
    """Every launch gets identical scalar/constexpr arguments whatever the window (int or tensor), so the
    JIT's specialisation key cannot change; on a GPU the compiled-kernel caches also stay the same size."""
    _skip_unless_runs("triton")
    q, k, v, do, doc_ids, _, bs = _case("window_gt_tile")
    logs = []
    for w in (2, torch.tensor(2, device=DEVICE), torch.tensor(6, device=DEVICE), 9):
        log = []
        with pytest.MonkeyPatch.context() as mp:  # not the test's monkeypatch: that one also poisons outputs
            for name in ("attn_fwd_kernel", "attn_bwd_preprocess_kernel", "attn_bwd_dkdv_kernel",
                         "attn_bwd_dq_kernel"):
                mp.setattr(K, name, _Recorder(getattr(K, name), log))
            _run(A.attention_triton, q, k, v, do, doc_ids, w, bs, torch.float32)
        logs.append(log)
        if len(logs) == 2:
            sizes = _cache_sizes()
    assert len(logs[0]) == 4 and all(log == logs[0] for log in logs)
    assert _cache_sizes() == sizes


@needs_triton
@interpreter_only
def test_interpreter_tile_is_read_at_launch(monkeypatch):
    """The interpreter's tile sizes come from kernels.common.INTERPRETER_TILE at each launch, cut to T rounded
    up to a power of two: (t, t/2) for the forward and dQ, (t/2, t) for dK/dV, t/2 rows for the preprocess."""
    q, k, v, do, doc_ids, w, bs = _case("T_not_tile_multiple")  # T = 83
    seen = {}
    for tile in (32, 256):
        log = []
        with pytest.MonkeyPatch.context() as mp:
            for name in ("attn_fwd_kernel", "attn_bwd_preprocess_kernel", "attn_bwd_dkdv_kernel",
                         "attn_bwd_dq_kernel"):
                mp.setattr(K, name, _Recorder(getattr(K, name), log))
            mp.setattr(kernels.common, "INTERPRETER_TILE", tile)
            _run(A.attention_triton, q, k, v, do, doc_ids, w, bs, torch.float32)
        seen[tile] = [(dict(kw).get("BLOCK_M"), dict(kw).get("BLOCK_N")) for *_, kw in log]
    assert seen[32] == [(32, 16), (16, None), (16, 32), (32, 16)]
    assert seen[256] == [(128, 64), (64, None), (64, 128), (128, 64)]


if triton is not None:

    @triton.jit
    def _range_probe(DS, DE, WINDOW, KEYS, QUERIES, T, block_size, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr):
        i = tl.program_id(0)
        w = tl.maximum(tl.load(WINDOW), 1)
        if i * BLOCK_M < T:
            a, b, c, d = K._key_range(DS, i * BLOCK_M, T, w, block_size, BLOCK_M, BLOCK_N)
            tl.store(KEYS + 4 * i + tl.arange(0, 4), tl.where(tl.arange(0, 4) == 0, a, tl.where(
                tl.arange(0, 4) == 1, b, tl.where(tl.arange(0, 4) == 2, c, d))))
        if i * BLOCK_N < T:
            a, b, c, d = K._query_range(DE, i * BLOCK_N, T, w, block_size, BLOCK_M, BLOCK_N)
            tl.store(QUERIES + 4 * i + tl.arange(0, 4), tl.where(tl.arange(0, 4) == 0, a, tl.where(
                tl.arange(0, 4) == 1, b, tl.where(tl.arange(0, 4) == 2, c, d))))


def _segments(lo, full_lo, full_hi, hi, step):
    """(masked tile starts, unmasked tile starts) of the kernels' three loops."""
    masked = list(range(lo, min(full_lo, hi), step)) + list(range(max(full_lo, full_hi), hi, step))
    return masked, list(range(full_lo, full_hi, step))


@pytest.mark.parametrize("T,bs,w,lengths,tiles", [(150, 16, 2, [40, 1, 70], (32, 16)),
                                                   (150, 16, 4, [], (16, 32)),
                                                   (131, 7, 3, [3, 3, 50], (16, 16)),
                                                   (200, 64, 1, [100], (32, 32)),
                                                   (160, 16, 8, [64], (32, 32))])
def test_tile_skipping_is_exact(T, bs, w, lengths, tiles):
    """The kernels visit exactly the tiles with at least one visible (query, key) pair -- so the work grows
    with the window, not T^2 -- and skip the token mask exactly on the tiles where every pair is visible."""
    _skip_unless_runs("triton")
    BM, BN = tiles
    doc_ids = _docs(T, lengths)[None]
    doc_start, doc_end = A._doc_bounds(doc_ids)
    n = triton.cdiv(T, min(BM, BN))
    keys = torch.full((n, 4), -7, dtype=torch.int32, device=DEVICE)
    queries = torch.full((n, 4), -7, dtype=torch.int32, device=DEVICE)
    window = torch.tensor(w, dtype=torch.int32, device=DEVICE)
    _range_probe[(n,)](doc_start, doc_end, window, keys, queries, T, bs, BLOCK_M=BM, BLOCK_N=BN)
    mask = A.attention_mask(doc_ids, w, bs)[0].cpu()
    keys, queries = keys.tolist(), queries.tolist()
    for i, m0 in enumerate(range(0, T, BM)):  # forward and dQ: key tiles of query tile m0
        masked, full = _segments(*keys[i], BN)
        assert len(set(masked + full)) == len(masked + full)
        blocks = {n0: mask[m0:m0 + BM, n0:n0 + BN] for n0 in range(0, T, BN)}
        assert sorted(masked + full) == [n0 for n0, b in blocks.items() if b.any()], m0
        assert full == [n0 for n0, b in blocks.items() if b.all() and n0 + BN <= T], m0
    for i, n0 in enumerate(range(0, T, BN)):  # dK/dV: query tiles of key tile n0
        masked, full = _segments(*queries[i], BM)
        blocks = {m0: mask[m0:m0 + BM, n0:n0 + BN] for m0 in range(0, T, BM)}
        assert sorted(masked + full) == [m0 for m0, b in blocks.items() if b.any()], n0
        assert full == [m0 for m0, b in blocks.items() if b.all() and n0 + BN <= T and m0 + BM <= T], n0


def test_lse_matches_reference():
    _skip_unless_runs("triton")
    q, k, v, do, doc_ids, w, bs = _case("window_gt_tile")
    _, lse, _ = A.attention_triton_fwd(q.float(), k.float(), v.float(), doc_ids, w, SCALE, bs)
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * SCALE
    s = s.masked_fill(~A.attention_mask(doc_ids, w, bs)[:, None], float("-inf"))
    torch.testing.assert_close(lse.double(), torch.logsumexp(s, -1), atol=1e-5, rtol=1e-5)


def _args(**over):
    q, k, v, _ = _inputs(1, 20, 1, 64, torch.float32)
    args = dict(q=q, k=k, v=v, doc_ids=torch.zeros(1, 20, dtype=torch.int32, device=DEVICE), window_blocks=1,
                scale=SCALE, block_size=16)
    args.update(over)
    return args


MISUSE = {  # name -> (argument overrides, error type, text the message must contain)
    "int_dtype": (lambda a: dict(q=a["q"].int()), TypeError, "q must be float32"),
    "mixed_dtypes": (lambda a: dict(k=a["k"].half()), TypeError, "dtypes differ"),
    "rank": (lambda a: dict(q=a["q"][0]), ValueError, "q must have shape"),
    "shape_mismatch": (lambda a: dict(v=a["v"][:, :10]), ValueError, "shapes differ"),
    "device_mismatch": (lambda a: dict(doc_ids=a["doc_ids"].to("meta")), ValueError, "one device"),
    "doc_ids_shape": (lambda a: dict(doc_ids=a["doc_ids"][:, :5]), ValueError, "doc_ids must have shape"),
    "doc_ids_dtype": (lambda a: dict(doc_ids=a["doc_ids"].float()), TypeError, "doc_ids must be"),
    "window_negative": (lambda a: dict(window_blocks=-1), ValueError, "window_blocks must be >= 0"),
    "window_float": (lambda a: dict(window_blocks=1.5), TypeError, "window_blocks must be"),
    "window_float_tensor": (lambda a: dict(window_blocks=torch.tensor(1.0)), TypeError, "window_blocks"),
    "block_size_zero": (lambda a: dict(block_size=0), ValueError, "block_size"),
}


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("case", MISUSE)
def test_misuse_raises(variant, case):
    _skip_unless_runs(variant)
    over, err, text = MISUSE[case]
    args = _args()
    args.update(over(args))
    with pytest.raises(err, match=text):
        kernels.get("attention", variant)(**args)


TRITON_MISUSE = {
    "float64": (lambda a: dict(q=a["q"].double(), k=a["k"].double(), v=a["v"].double()), TypeError, "float64"),
    "head_dim_32": (lambda a: dict(q=a["q"][..., :32], k=a["k"][..., :32], v=a["v"][..., :32]), ValueError,
                    "head dim D=32"),
    "tiles": (lambda a: dict(tiles=(24, 16)), ValueError, "tiles"),
}


@pytest.mark.parametrize("case", TRITON_MISUSE)
def test_triton_misuse_raises(case):
    _skip_unless_runs("triton")
    over, err, text = TRITON_MISUSE[case]
    args = _args()
    args.update(over(args))
    with pytest.raises(err, match=text):
        A.attention_triton(**args)


def test_triton_checks_doc_ids_order_on_request(monkeypatch):
    _skip_unless_runs("triton")
    doc_ids = torch.tensor([[0] * 10 + [1] * 5 + [0] * 5], dtype=torch.int32, device=DEVICE)
    A.attention_triton(**_args(doc_ids=doc_ids))  # not checked by default: no host sync
    monkeypatch.setattr(A, "CHECK_DOC_IDS", True)
    with pytest.raises(ValueError, match="non-decreasing"):
        A.attention_triton(**_args(doc_ids=doc_ids))


@needs_triton
@interpreter_only
def test_triton_refuses_bf16_on_interpreter():
    with pytest.raises(TypeError, match="bfloat16"):
        A.attention_triton(**_args(q=_args()["q"].bfloat16(), k=_args()["k"].bfloat16(),
                                   v=_args()["v"].bfloat16()))


# ---- GPU: recipe-like shapes ------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("T,window", [(4096, 1), (4096, 14), (16384, 7), (16384, 14)])
@pytest.mark.parametrize("variant", [v for v in VARIANTS if v != "torch"])
def test_gpu_recipe_shapes(variant, T, window, dtype):
    _skip_unless_runs(variant, dtype, f"gpu-recipe-T{T}-w{window}-{str(dtype).removeprefix('torch.')}")
    g = torch.Generator().manual_seed(T + window)
    lengths = torch.randint(1, 1500, (T // 100,), generator=g).tolist()
    doc_ids = _docs(T, lengths)[None]
    q, k, v, do = _inputs(1, T, 6, 128, torch.float32, seed=window)
    _lowp_check(variant, q, k, v, do, doc_ids, window, 128, dtype, torch.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("variant", [v for v in VARIANTS if v == "triton"])  # sdpa/torch read the window
def test_gpu_no_host_sync(variant):
    fn = kernels.get("attention", variant)
    q, k, v, do = _inputs(1, 1024, 6, 128, torch.bfloat16)
    leaves = [t.requires_grad_() for t in (q, k, v)]
    doc_ids = _docs(1024, [300, 1, 200])[None]
    for w in (3, torch.tensor(3, device=DEVICE)):
        fn(*leaves, doc_ids, w, SCALE, 128).backward(do)  # compile outside the check
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            fn(*leaves, doc_ids, w, SCALE, 128).backward(do)
        finally:
            torch.cuda.set_sync_debug_mode("default")


def test_flex_forward_matches_reference_on_cpu():
    """The flex variant is registered (and fully tested) only with CUDA, since PyTorch has no CPU backward
    for flex_attention; its mask_mod and window handling are checked here on the CPU, forward only."""
    pytest.importorskip("torch.nn.attention.flex_attention")
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 256, 2, 64, generator=g) for _ in range(3))
    doc_ids = torch.stack([_docs(256, [50, 100, 6], "cpu"), _docs(256, [200], "cpu")])
    with torch.no_grad():
        for w in (0, 2, torch.tensor(3)):  # an int, a tensor (no recompile), 0 behaving as 1
            ref = A.attention_torch(q.double(), k.double(), v.double(), doc_ids, w, SCALE, 32)
            got = A.attention_flex(q, k, v, doc_ids, w, SCALE, 32)
            assert got.shape == ref.shape and got.dtype == torch.float32
            torch.testing.assert_close(got.double(), ref, atol=1e-5, rtol=1e-5)
