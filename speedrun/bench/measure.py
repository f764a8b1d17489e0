"""How the benchmarks measure: timing, the device's own peak rates, peak memory, where results go.

Timing. On a CUDA GPU every time comes from ``triton.testing.do_bench`` (CUDA events; the L2 cache
flushed before each call; warm-up first): the median with the 20th and 80th percentiles, in ms. On a
CPU (the Triton interpreter: times mean nothing there, the reports say so) the same three numbers come
from ``time.perf_counter`` over a few calls after one warm-up call, so that the whole pipeline runs.

Peaks. Derived rates are shown as a share of what this device does in the same process: the peak matmul
rate (a large square matmul in the benchmark's dtype) and the copy bandwidth (a large device-to-device
copy: bytes read + bytes written per second), each measured with the same timer.
"""

from __future__ import annotations

import datetime
import re
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from speedrun import REPO_ROOT


@dataclass(frozen=True)
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float


def time_fn(fn, device: torch.device, quick: bool = False) -> Timing:
    """Median, p20 and p80 of ``fn()``'s run time in ms (module docstring). ``fn`` must already have run
    once (compilation, autotuning)."""
    if device.type == "cuda":
        import triton.testing

        warmup, rep = (10, 40) if quick else (25, 100)
        p50, p20, p80 = triton.testing.do_bench(fn, warmup=warmup, rep=rep, quantiles=[0.5, 0.2, 0.8])
        return Timing(p50, p20, p80)
    fn()  # warm-up
    samples = []
    for _ in range(3 if quick else 7):
        t0 = time.perf_counter()
        fn()
        samples.append(1000 * (time.perf_counter() - t0))
    return timing_from_samples(samples)


def timing_from_samples(samples_ms: list[float]) -> Timing:
    """Median, p20, p80 of a list of times (linear interpolation between order statistics, as numpy)."""
    if not samples_ms:
        raise ValueError("no timing samples")
    s = sorted(samples_ms)

    def q(p):
        x = p * (len(s) - 1)
        lo = int(x)
        hi = min(lo + 1, len(s) - 1)
        return s[lo] + (s[hi] - s[lo]) * (x - lo)

    return Timing(statistics.median(s), q(0.2), q(0.8))


@dataclass(frozen=True)
class DevicePeaks:
    matmul_tflops: float  # measured: n x n x n matmul in `dtype`
    copy_gbps: float  # measured: bytes read + written per second by a device copy
    dtype: str
    matmul_n: int
    copy_bytes: int


def measure_peaks(device: torch.device, dtype: torch.dtype, quick: bool = False) -> DevicePeaks:
    """The device's matmul rate and copy bandwidth, measured now with time_fn."""
    if device.type == "cuda":
        n, copy_bytes = (8192, 1 << 30) if not quick else (4096, 1 << 28)
    else:
        n, copy_bytes = 512, 1 << 26
    tflops = 2 * n**3 / (_time_matmul(n, dtype, device, quick) * 1e-3) / 1e12
    gbps = 2 * copy_bytes / (_time_copy(copy_bytes, device, quick) * 1e-3) / 1e9
    return DevicePeaks(tflops, gbps, str(dtype).removeprefix("torch."), n, copy_bytes)


def _time_matmul(n: int, dtype: torch.dtype, device: torch.device, quick: bool) -> float:
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    torch.matmul(a, b)
    return time_fn(lambda: torch.matmul(a, b), device, quick).median_ms


def _time_copy(nbytes: int, device: torch.device, quick: bool) -> float:
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    dst.copy_(src)
    return time_fn(lambda: dst.copy_(src), device, quick).median_ms


class PeakMemory:
    """Peak device memory allocated inside the ``with`` block above what was allocated on entry, in MiB;
    ``None`` on a CPU (not measured there)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.mib: float | None = None

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.mib = (torch.cuda.max_memory_allocated(self.device) - self._base) / 2**20


def bench_device(requested: str | None) -> torch.device:
    """The device a bench command runs on: ``requested`` ("cuda"/"cpu"), else CUDA when available."""
    if requested == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA GPU")
    return torch.device(requested or ("cuda" if torch.cuda.is_available() else "cpu"))


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "cpu"


def versions() -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {"torch": torch.__version__, "triton": triton_version, "cuda": torch.version.cuda}


def slug(text: str) -> str:
    """A file-name-safe lower-case form of ``text`` ("NVIDIA H100 80GB HBM3" -> "nvidia-h100-80gb-hbm3")."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"




def results_dir(device: torch.device, out: str | None = None) -> Path:
    """``out`` if given, else bench/results/<date>_<device slug>/ in the repository, or <date>_<HHMMSS>_<slug>/
    when that folder already holds an earlier run's results (UTC; never written into); created."""
    if out:
        path = Path(out)
    else:
        now = datetime.datetime.now(datetime.timezone.utc)
        results, name = REPO_ROOT / "bench" / "results", slug(device_name(device))
        path = results / f"{now:%Y-%m-%d}_{name}"
        if path.exists() and any(path.iterdir()):
            path = results / f"{now:%Y-%m-%d_%H%M%S}_{name}"
    path.mkdir(parents=True, exist_ok=True)
    return path
