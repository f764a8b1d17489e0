"""Where the kernel tests run, for every file in tests/kernels.

On a machine with a CUDA GPU the tests run there, on compiled Triton kernels; elsewhere on the CPU, with
Triton under its interpreter (TRITON_INTERPRET=1, set by tests/conftest.py). Inputs are drawn on the CPU
from a seeded generator and then moved to ``DEVICE`` (``on_device``), so a case holds the same values on
either machine. A case of the ``triton`` variant is skipped where the kernels cannot run (no GPU and no
interpreter; see conftest.py), never failed.
"""

from __future__ import annotations

import pytest
import torch

from kernels.common import interpreting, triton_usable

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TRITON_RUNS = triton_usable(DEVICE)  # False without triton, or on the CPU without TRITON_INTERPRET=1
WHY_NOT = f"the Triton kernels cannot run on {DEVICE} here (no CUDA GPU, and TRITON_INTERPRET is not 1)"

needs_triton = pytest.mark.skipif(not TRITON_RUNS, reason=WHY_NOT)
interpreter_only = pytest.mark.skipif(not interpreting(), reason="checks a setting of the CPU interpreter")


def on_device(*tensors: torch.Tensor):
    """The tensors moved to ``DEVICE`` (one tensor, or a tuple for several)."""
    moved = tuple(t.to(DEVICE) for t in tensors)
    return moved[0] if len(moved) == 1 else moved


def assert_close_where_roundings_may_flip(got: torch.Tensor, want: torch.Tensor, rel: float, name: str = ""):
    """||got - want|| / ||want|| <= rel. For a GPU, where the library's matmuls sum in another order than the
    reference (and Hopper's FP8 tensor cores accumulate with fewer bits, as the record's kernels do), so that
    the first rounding to bf16 or FP8 after a sum can flip; a flipped FP8 rounding moves a value by up to 1/16
    of it. On the CPU the tests that call this compare exactly instead."""
    err = (got.double() - want.double()).norm() / want.double().norm().clamp(min=1e-30)
    assert err <= rel, f"{name}: relative error {err:.3g} > {rel:.3g}"
