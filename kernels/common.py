"""Small helpers shared by the kernel files: output allocation, the CPU interpreter's tile size, device
capability checks, torch.compile with static shapes."""

from __future__ import annotations

import contextlib
import os

import torch

# When True, every output buffer a launcher allocates is filled with NaN (integers: -1) before the
# kernel runs, so an element the kernel forgets to write fails the tests instead of passing by luck.
# Tests switch it on (tests/kernels/conftest.py); it costs a fill, so it is off otherwise.
POISON_OUTPUTS = False


@contextlib.contextmanager
def poisoned_outputs():
    """POISON_OUTPUTS on inside the block (the benchmark's correctness check), as it was after."""
    global POISON_OUTPUTS
    previous, POISON_OUTPUTS = POISON_OUTPUTS, True
    try:
        yield
    finally:
        POISON_OUTPUTS = previous


def new_empty(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """torch.empty, poisoned when POISON_OUTPUTS is set. Launchers allocate every output with this."""
    out = torch.empty(shape, dtype=dtype, device=device)
    if POISON_OUTPUTS:
        out.fill_(float("nan") if dtype.is_floating_point else -1)
    return out


def interpreting() -> bool:
    """True when Triton runs under its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# The tile edge the kernels use under Triton's CPU interpreter (GPU runs never read it). The interpreter
# runs every program of a launch one after another, each tl op a numpy call with ~0.1 ms of Python
# overhead, so its cost is mostly per program: a 32x32x32 matmul program costs nearly as much as a
# 128x128x128 one (numpy's share is small up to ~256). Small tiles (the default) let the kernel tests
# reach multi-tile paths (ragged edges, K loops, tile skipping) with small shapes; a model-level run
# under the interpreter should call use_large_interpreter_tiles() (and limit_interpreter_threads()) so
# that each launch has a few programs instead of hundreds.
# Read by every launcher at launch time, so it may change between calls. A power of two in [32, 512]
# (Triton caps a tensor at 2^20 elements); each op derives its own sizes from it:
#   mlp (matmul + epilogue)    BLOCK_M, BLOCK_N, BLOCK_K = tile each
#   newton_schulz (syrk)       BLOCK, BLOCK_K = tile each
#   attention                  forward and dQ: (queries, keys) = (tile, tile/2); dK/dV: (tile/2, tile);
#                              the backward preprocess: tile/2 rows (unequal, so both orders get tested)
#   cross_entropy              vocab chunk up to 128 * tile (4096 at the default, as on the GPU), and
#                              (tile/32)^2 rows per program (1 at the default, as on the GPU)
# where each "tile" is first cut to the dimension it tiles, rounded up to a power of two (at least 32;
# interpreter_block()), since more would only be masked off. Tiles larger than the problem still occur
# (non-power-of-two sizes) and are fine: every kernel masks (or wraps and masks) its edges.
INTERPRETER_TILE = 32
DEFAULT_INTERPRETER_TILE = INTERPRETER_TILE
# What use_large_interpreter_tiles() sets. For the tiny preset with 8 x 128 tokens (dim 128, mlp 512) the
# MLP up-projection becomes 4 x 2 programs instead of 32 x 16, each attention (b, h) one program (its
# tiles cut to 128), each Newton-Schulz Gram matrix one program, the cross-entropy 64 rows per program.
LARGE_INTERPRETER_TILE = 256


def interpreter_tile() -> int:
    """INTERPRETER_TILE, checked (a power of two in [32, 512]). Launchers call this at launch time."""
    t = INTERPRETER_TILE
    if isinstance(t, bool) or not isinstance(t, int) or not 32 <= t <= 512 or t & (t - 1):
        raise ValueError(f"kernels.common.INTERPRETER_TILE must be a power of two in [32, 512], got {t!r}")
    return t


def interpreter_block(n: int) -> int:
    """The interpreter's tile edge along a dimension of size ``n``: INTERPRETER_TILE, but no more than ``n``
    rounded up to a power of two (and at least 32, so the default tile is never cut): a larger tile would
    only add masked-off work. Launchers call this at launch time."""
    t = interpreter_tile()
    return min(t, max(32, 1 << max(int(n) - 1, 0).bit_length()))


def use_large_interpreter_tiles(tile: int = LARGE_INTERPRETER_TILE) -> int:
    """Make the kernels use ``tile``-sized tiles under the CPU interpreter (from the next launch on);
    returns the previous value. For model-level runs with ``--kernels triton`` on a CPU: the default small
    tiles exist for the kernel tests and make such runs many times slower. No effect on GPU runs."""
    global INTERPRETER_TILE
    previous = INTERPRETER_TILE
    INTERPRETER_TILE = tile
    try:
        interpreter_tile()
    except ValueError:
        INTERPRETER_TILE = previous
        raise
    return previous


def limit_interpreter_threads(threads: int = 1):
    """Run PyTorch's CPU ops and numpy's BLAS (the interpreter's tl.dot is a numpy matmul) on ``threads``
    threads; returns a function that restores the previous counts. For model-level runs under the CPU
    interpreter: there the work alternates between interpreted Python (one thread) and small torch ops /
    BLAS calls, whose idle worker threads spin and take cores from the Python thread, and whose calls
    then wait for a descheduled worker. On a loaded 2-core machine that made a 3-step tiny-preset run
    ~3.5x slower with the default 2 threads than with 1. numpy's BLAS is reached through ctypes and only
    when it is OpenBLAS, found in this process's memory map (Linux); otherwise it is left alone."""
    try:
        import numpy  # noqa: F401  (loads its BLAS, so that it is found below)
    except ImportError:
        pass
    previous_torch = torch.get_num_threads()
    torch.set_num_threads(threads)
    blas = _openblas_thread_setters()
    previous_blas = [get() for get, _ in blas]
    for _, set_threads in blas:
        set_threads(threads)

    def restore():
        torch.set_num_threads(previous_torch)
        for (_, set_threads), n in zip(blas, previous_blas, strict=True):
            set_threads(n)

    return restore


@contextlib.contextmanager
def interpreter_settings_for_model_runs(device: torch.device):
    """Inside the block, model-sized work under the CPU interpreter gets use_large_interpreter_tiles() and
    limit_interpreter_threads(); both are restored on exit. Does nothing on a GPU or without the interpreter."""
    if device.type != "cpu" or not interpreting():
        yield
        return
    previous_tile = use_large_interpreter_tiles()
    restore_threads = limit_interpreter_threads()
    try:
        yield
    finally:
        restore_threads()
        use_large_interpreter_tiles(previous_tile)


def _openblas_thread_setters() -> list:
    """(get, set) thread-count functions of each OpenBLAS library loaded in this process (numpy's bundled
    one exports them as scipy_openblas_{get,set}_num_threads64_); empty where none is found."""
    import ctypes

    try:
        with open("/proc/self/maps") as f:
            paths = sorted({line.split()[-1] for line in f if "openblas" in line.lower() and ".so" in line})
    except OSError:
        return []
    found = []
    for path in paths:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for prefix in ("scipy_openblas", "openblas"):
            for suffix in ("64_", "_64_", ""):
                get = getattr(lib, f"{prefix}_get_num_threads{suffix}", None)
                set_ = getattr(lib, f"{prefix}_set_num_threads{suffix}", None)
                if get is not None and set_ is not None:
                    get.restype, get.argtypes = ctypes.c_int, []
                    set_.restype, set_.argtypes = None, [ctypes.c_int]
                    found.append((get, set_))
                    break
            else:
                continue
            break
    return found


def triton_usable(device: torch.device) -> bool:
    """Triton kernels can run on ``device``: a CUDA GPU, or the CPU under the interpreter."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return device.type == "cuda" or (device.type == "cpu" and interpreting())


# Dynamo compiles a function again for every new input shape or Python value it specialised on (record #89's
# model: each stage's batch and number of MTP weights, train and eval; under the torch kernel set, whose graph
# splits, each layer's attention and MLP as frames of their own; a benchmark: every size and dtype). Past its
# recompile limit (8 by default) the function runs eagerly from then on or, under fullgraph=True, fails. Record
# #89 raises the limit to 64 (spec recipe-frontier.md, "Compilation").
RECOMPILE_LIMIT = 64


def compile_static(fn, **options):
    """``torch.compile(fn, dynamic=False, **options)``, compiled again for up to RECOMPILE_LIMIT shapes."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    return torch.compile(fn, dynamic=False, **options)


def cuda_capability() -> tuple[int, int] | None:
    return torch.cuda.get_device_capability() if torch.cuda.is_available() else None


def supports_fp8() -> bool:
    """FP8 matmuls (torch._scaled_mm): compute capability 8.9 (Ada) or newer."""
    cap = cuda_capability()
    return cap is not None and cap >= (8, 9)


class _NoBackward(torch.autograd.Function):
    """Carries a result that has no gradient: differentiating it raises (instead of a silently wrong one)."""

    @staticmethod
    def forward(ctx, inp, out, name):
        ctx.name = name
        return out.clone()

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError(f"{ctx.name} has no backward: call it on tensors that do not require grad "
                           "(the optimizers do, under torch.no_grad), or use the torch variant")


def refuse_backward(inp: torch.Tensor, out: torch.Tensor, name: str) -> torch.Tensor:
    """``out`` (computed without autograd from ``inp``), made to refuse differentiation when ``inp`` needs a
    gradient; returned as it is otherwise."""
    if inp.requires_grad and torch.is_grad_enabled():
        return _NoBackward.apply(inp, out.detach(), name)
    return out
