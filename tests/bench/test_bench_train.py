"""speedrun bench train: the numbers it derives from its own timings, on the tiny preset with torch kernels."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from speedrun.bench import train_bench as tb
from speedrun.config import get_preset

CPU = torch.device("cpu")


def _small_tiny():
    cfg = get_preset("sub3min-tiny")
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, seq_len=128))


def test_synthetic_pairs_are_documents_of_the_model_vocabulary():
    cfg = _small_tiny()
    pairs = tb.synthetic_pairs(cfg, CPU, seed=0)
    assert len(pairs) == cfg.data.batch_slots
    for x, y in pairs:
        assert x.shape == y.shape == (128,) and x.dtype == torch.int64
        assert int(x[0]) == cfg.model.eot_token and bool((x[1:] == y[:-1]).all())  # targets are the next tokens
        assert 0 <= int(x.min()) and int(x.max()) < cfg.model.vocab_size
    assert len({tuple(x.tolist()) for x, _ in pairs}) == len(pairs)  # random, not repeated


def test_one_kernel_set_rates_and_profile():
    cfg = _small_tiny()
    r = tb.bench_kernel_set(cfg, CPU, steps=3, warmup=1, profile_steps=1, log=lambda line: None)
    assert r["kernels"] == "torch" and r["p20_ms"] <= r["median_ms"] <= r["p80_ms"]
    assert r["tokens_per_step"] == 8 * 128
    assert r["tokens_per_s"] == pytest.approx(r["tokens_per_step"] / (r["median_ms"] / 1000))
    assert r["mfu"] is None  # no known peak on a CPU
    shares = [e["share"] for e in r["breakdown"]]
    assert 0 < len(shares) <= tb.TOP_OPS and shares == sorted(shares, reverse=True) and 0 < sum(shares) <= 1 + 1e-9
    assert any("mm" in e["op"] for e in r["breakdown"])  # matmuls take time in a transformer step
    text = tb.report([r, dict(r, kernels="triton", median_ms=2 * r["median_ms"])], cfg, CPU)
    assert "| torch | False |" in text and "step time ratio 2.000" in text and "CPU run" in text


def test_a_staged_recipe_is_timed_at_its_last_step():
    """record89-tiny: its race on synthetic shards, every step at the last step's batch (6144 tokens)."""
    cfg = get_preset("record89-tiny")
    r = tb.bench_kernel_set(cfg, CPU, steps=1, warmup=0, profile_steps=0, log=lambda line: None)
    assert r["tokens_per_step"] == 6144 and r["median_ms"] > 0 and r["breakdown"] == []
    assert "6,144 tokens per step" in tb.report([r], cfg, CPU)


class _HostRead(torch.nn.Module):
    def forward(self, x, window):
        y = x * 2
        return y[: int(window)].sum()  # a host read of a tensor: a graph break


def test_graph_breaks_name_where_and_why():
    x = torch.randn(8, generator=torch.Generator().manual_seed(0))
    breaks = tb.graph_breaks(_HostRead(), x, torch.tensor(3))
    assert len(breaks) == 1 and "tests/bench/test_bench_train.py:" in breaks[0]
    assert tb.graph_breaks(torch.nn.Linear(8, 2), x) == []


def test_a_triton_set_with_graph_breaks_is_reported_failed_and_not_timed():
    cfg = _small_tiny()
    timed = dict(kernels="torch", compile=True, graph_breaks=["kernels/attention.py:125: host read"], steps=3,
                 median_ms=10.0, p20_ms=9.0, p80_ms=11.0, tokens_per_step=1024, tokens_per_s=102400.0, mfu=None,
                 peak_mem_mib=100.0, breakdown=[])
    broken = dict(kernels="triton", compile=True, graph_breaks=["kernels/mlp.py:197: AttrSource"], median_ms=None,
                  tokens_per_step=1024, breakdown=[])
    text = tb.report([timed, broken], cfg, CPU)
    assert "| triton | True | 1 | not timed |" in text and "| torch | True | 1 | 10.0 |" in text
    assert "Graph breaks, kernels triton (FAILED" in text and "`kernels/mlp.py:197: AttrSource`" in text
    assert "Graph breaks, kernels torch (by design" in text and "step time ratio" not in text
