"""speedrun bench launch: every launch runs once, on its own, and a failing one is named, not fatal."""

from __future__ import annotations

import pytest
import torch

from kernels.common import interpreting
from speedrun.bench import aot, launch

triton = pytest.importorskip("triton")
tl = triton.language
pytestmark = pytest.mark.skipif(not interpreting(), reason="launches on the CPU need Triton's interpreter")


@triton.jit
def _writes_one(x_ptr, BLOCK: tl.constexpr):
    tl.store(x_ptr + tl.arange(0, BLOCK), tl.full((BLOCK,), 1.0, tl.float32))


@triton.jit
def _fails(x_ptr, BLOCK: tl.constexpr):
    tl.store(x_ptr + tl.arange(0, BLOCK), no_such_name)  # noqa: F821 - the failure under test


_tuned = triton.autotune(configs=[triton.Config({"BLOCK": 4}), triton.Config({"BLOCK": 8})], key=[])(_writes_one)


def test_each_launch_runs_once_and_a_failure_is_named(monkeypatch):
    x = torch.zeros(8)

    def drive(device, only=None):
        _fails[(1,)](x, BLOCK=8)
        _tuned[(1,)](x)  # an autotuned kernel: once per config, not tuned

    monkeypatch.setattr(aot, "drive_ops", drive)
    rows = launch.launch_all(torch.device("cpu"))
    assert [(r.kernel, r.status.split(":")[0]) for r in rows] == [
        ("_fails", "InterpreterError"), ("_writes_one", "ok"), ("_writes_one", "ok")]
    assert [r.config for r in rows[1:]] == ["BLOCK=4, num_ctas=1, num_stages=3, num_warps=4",
                                            "BLOCK=8, num_ctas=1, num_stages=3, num_warps=4"]
    assert x.tolist() == [1.0] * 8  # the launches ran
    text = launch.report(rows, torch.device("cpu"))
    assert "3 launches of 3 distinct kernel configurations; 1 failed." in text and "| _fails | BLOCK=8 |" in text

