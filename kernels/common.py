"""Small helpers shared by the kernel files: output allocation, device capability checks."""

from __future__ import annotations

import os

import torch

# When True, every output buffer a launcher allocates is filled with NaN (integers: -1) before the
# kernel runs, so an element the kernel forgets to write fails the tests instead of passing by luck.
# Tests switch it on (tests/kernels/conftest.py); it costs a fill, so it is off otherwise.
POISON_OUTPUTS = False


def new_empty(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """torch.empty, poisoned when POISON_OUTPUTS is set. Launchers allocate every output with this."""
    out = torch.empty(shape, dtype=dtype, device=device)
    if POISON_OUTPUTS:
        out.fill_(float("nan") if dtype.is_floating_point else -1)
    return out


def interpreting() -> bool:
    """True when Triton runs under its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_usable(device: torch.device) -> bool:
    """Triton kernels can run on ``device``: a CUDA GPU, or the CPU under the interpreter."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return device.type == "cuda" or (device.type == "cpu" and interpreting())


def cuda_capability() -> tuple[int, int] | None:
    return torch.cuda.get_device_capability() if torch.cuda.is_available() else None


def supports_fp8() -> bool:
    """FP8 matmuls (torch._scaled_mm): compute capability 8.9 (Ada) or newer."""
    cap = cuda_capability()
    return cap is not None and cap >= (8, 9)


def is_hopper() -> bool:
    cap = cuda_capability()
    return cap is not None and cap[0] == 9
