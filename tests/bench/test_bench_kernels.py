"""speedrun bench kernels: the counts it derives rates from, its correctness gate (a wrong variant is caught
and not timed), its reports, and its command line. On CPU everything runs on the tiny preset's shapes
under the Triton interpreter (times mean nothing; what is checked is that the pipeline is right)."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
import torch

import kernels
import kernels.attention as A
import kernels.common
import kernels.mlp
from speedrun.bench import kernel_cases as kc
from speedrun.bench import kernels_bench as kb
from speedrun.bench.kernels_report import table
from speedrun.bench.measure import DevicePeaks, timing_from_samples
from speedrun.cli import main

CPU = torch.device("cpu")
PEAKS = DevicePeaks(matmul_tflops=1.0, copy_gbps=10.0, dtype="float32", matmul_n=64, copy_bytes=1 << 20)


@pytest.mark.parametrize("T,window,block", [(300, 2, 16), (257, 1, 64), (128, 50, 8)])
def test_kept_pairs_counts_the_mask(T, window, block):
    g = torch.Generator().manual_seed(T)
    many_short_docs = torch.randint(0, 40, (1, T), generator=g).sort(1).values.to(torch.int32)
    doc_ids = torch.cat([kc.synthetic_doc_ids(1, T, g), many_short_docs])
    brute = int(A.attention_mask(doc_ids, window, block).sum())  # the op's own mask, materialised
    assert kc.kept_pairs(doc_ids, window, block) == brute


def test_synthetic_doc_ids_are_documents():
    ids = kc.synthetic_doc_ids(3, 5000, torch.Generator().manual_seed(0))
    assert ids.shape == (3, 5000) and ids.dtype == torch.int32
    assert bool((ids[:, 1:] >= ids[:, :-1]).all()) and int(ids[:, -1].min()) >= 1  # several documents per row


def test_timing_quantiles_match_numpy():
    samples = list(np.random.default_rng(0).exponential(3.0, size=11))
    t = timing_from_samples(samples)
    assert t.median_ms == pytest.approx(np.median(samples))
    assert (t.p20_ms, t.p80_ms) == pytest.approx(tuple(np.percentile(samples, [20, 80])))
    with pytest.raises(ValueError):
        timing_from_samples([])


def test_cases_come_from_the_preset():
    gpt2 = kc.bench_config(torch.device("cuda"))
    attn = kc.cases("attention", gpt2, quick=True, on_gpu=True)
    assert [(c.params["T"], c.params["H"], c.params["D"]) for c in attn] == [(gpt2.data.seq_len, 6, 128)]
    ce = kc.cases("cross_entropy", gpt2, quick=False, on_gpu=True)
    assert [c.params["N"] for c in ce] == [gpt2.data.seq_len // d for d in (8, 4, 2, 1)]
    assert all(c.params["V"] == 50304 for c in ce) and [c.recipe for c in ce] == [False, False, False, True]
    # Muon's matrices of the real model: qkv (3, 768, 768), out (768, 768), fc (3072, 768), proj (768, 3072)
    assert sorted(c.params["shape"] for c in kc.cases("newton_schulz", gpt2, True, True)) == sorted(
        [(3, 768, 768), (768, 768), (3072, 768), (768, 3072)])
    with pytest.raises(ValueError, match="unknown op"):
        kc.cases("softmax", gpt2, True, True)


def test_problem_inputs_are_random_and_counted():
    cfg = kc.bench_config(CPU)
    case = kc.cases("mlp", cfg, True, False)[0]
    prob = kc.problem(case, torch.float32, CPU)
    x = prob.args[0].detach()
    assert int((x == 0).sum()) == 0 and float(x.std()) > 0.5  # random, not zeros
    M, dim, hidden = case.params["M"], case.params["dim"], case.params["hidden"]
    assert prob.flops == {"fwd": 4.0 * M * dim * hidden, "bwd": 8.0 * M * dim * hidden,
                          "fwd+bwd": 12.0 * M * dim * hidden}
    assert prob.min_bytes["fwd+bwd"] == prob.min_bytes["fwd"] + prob.min_bytes["bwd"]
    ref = kc.as_reference(kc.problem(kc.cases("newton_schulz", cfg, True, False)[0], torch.float16, CPU))
    assert ref.kwargs["dtype"] == torch.float32


def _wrong_mlp(x, w_fc, w_proj):
    """relu instead of relu^2: the kind of bug the gate exists for."""
    return torch.nn.functional.linear(torch.relu(torch.nn.functional.linear(x, w_fc)), w_proj)


def _broken_mlp(x, w_fc, w_proj):
    raise RuntimeError("kernel launch failed")


def test_wrong_variant_is_reported_and_not_timed(monkeypatch):
    monkeypatch.setitem(kernels.mlp.VARIANTS, "wrong", _wrong_mlp)
    monkeypatch.setitem(kernels.mlp.VARIANTS, "broken", _broken_mlp)
    rows = kb.run(["mlp"], ["torch", "wrong", "broken"], ["fwd", "fwd+bwd"], torch.float32, CPU, True, PEAKS,
                  log=lambda line: None)
    by = {(r.variant, r.mode): r for r in rows}
    assert set(by) == {(v, m) for v in ("torch", "wrong", "broken") for m in ("fwd", "fwd+bwd")}
    for mode in ("fwd", "fwd+bwd"):
        assert by["torch", mode].status == "ok" and by["torch", mode].median_ms > 0
        wrong = by["wrong", mode]
        assert wrong.status == "wrong" and wrong.median_ms is None and wrong.max_error > wrong.tolerance
        assert by["broken", mode].status == "error" and "kernel launch failed" in by["broken", mode].detail
    assert "wrong" in table(rows) and "max error" in table(rows)


def test_every_op_quick_end_to_end(tmp_path, capsys):
    """The CI pass of `speedrun bench kernels --quick`: every op, the CPU-runnable variants, CSV + table + PNGs."""
    out = tmp_path / "res"
    tile, threads = kernels.common.INTERPRETER_TILE, torch.get_num_threads()
    assert main(["bench", "kernels", "--quick", "--variant", "torch,triton,sdpa", "--out", str(out)]) == 0
    # the interpreter settings of the run are restored (they leaked into later tests once)
    assert (kernels.common.INTERPRETER_TILE, torch.get_num_threads()) == (tile, threads)
    printed = capsys.readouterr().out
    assert "times mean nothing" in printed and "0 wrong or failed" in printed
    rows = list(csv.DictReader((out / "kernels.csv").read_text().splitlines()))
    assert {r["op"] for r in rows} == set(kernels.OP_MODULES)
    assert all(r["status"] == "ok" and r["device"] == "cpu" and r["torch"] == torch.__version__ for r in rows)
    ns_modes = {r["mode"] for r in rows if r["op"] == "newton_schulz"}
    assert ns_modes == {"fwd"}
    triton = [r for r in rows if r["variant"] == "triton"]
    if "triton" in kernels.variants("mlp"):
        assert {r["op"] for r in triton} == {op for op in kernels.OP_MODULES if "triton" in kernels.variants(op)}
        ce_bwd = next(r for r in triton if r["op"] == "cross_entropy" and r["mode"] == "bwd")
        assert "cannot run twice" in ce_bwd["detail"]  # its gradient is computed by the forward
    timed = [r for r in rows if r["median_ms"]]
    assert timed and all(float(r["p20_ms"] or r["median_ms"]) <= float(r["median_ms"]) for r in timed)
    attn = [r for r in timed if r["op"] == "attention"]
    assert all(float(r["tflops"]) > 0 and math.isfinite(float(r["gbps"])) for r in attn)
    assert all(float(r["speedup_vs_torch"]) == 1.0 for r in timed if r["variant"] == "torch")
    for op in kernels.OP_MODULES:
        assert (out / f"kernels_{op}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "CPU interpreter run" in (out / "kernels.txt").read_text()


def test_torch_compile_variant_and_speedups():
    rows = kb.run(["newton_schulz"], ["torch", "torch_compile"], ["fwd"], torch.float32, CPU, True, PEAKS,
                  log=lambda line: None)
    assert rows and all(r.status == "ok" for r in rows)
    cases = {c.label: c for c in kc.cases("newton_schulz", kc.bench_config(CPU), True, False)}
    for r in rows:
        other = next(o for o in rows if o.shape == r.shape and o.variant != r.variant)
        ratio = (other.median_ms / r.median_ms) if r.variant == "torch_compile" else 1.0
        assert r.speedup_vs_torch == pytest.approx(ratio)
        flops = kc.problem(cases[r.shape], torch.float32, CPU).flops["fwd"]
        assert r.tflops == pytest.approx(flops / (r.median_ms * 1e-3) / 1e12)
        assert r.pct_peak_flops == pytest.approx(100 * r.tflops / PEAKS.matmul_tflops)


@pytest.mark.parametrize("argv,message", [
    (["--op", "softmax"], "unknown op softmax"),
    (["--mode", "sideways"], "unknown mode sideways"),
    (["--variant", "cudnn"], "unknown variant cudnn"),
    (["--dtype", "bfloat16", "--device", "cpu"], "bf16 dot is wrong"),
])
def test_misuse_is_refused(argv, message, tmp_path, capsys):
    try:
        code = main(["bench", "kernels", "--quick", "--out", str(tmp_path), *argv])
    except SystemExit as e:  # argparse's usage errors
        code = e.code
    assert code in (1, 2) and message in capsys.readouterr().err


def test_a_reference_that_cannot_run_skips_the_case(monkeypatch):
    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 13.00 GiB")

    monkeypatch.setitem(kernels.mlp.VARIANTS, "torch", out_of_memory)
    rows = kb.run(["mlp"], ["torch", "triton"], ["fwd"], torch.float32, CPU, True, PEAKS, log=lambda line: None)
    assert rows and all(r.status == "skipped" and r.median_ms is None for r in rows)
    assert all(r.detail.startswith("reference could not run: OutOfMemoryError") for r in rows)


# ---------------------------------------------------------------------------------------------
# Broken variants: the benchmark's check must call every one of them wrong
# ---------------------------------------------------------------------------------------------


class _EditGrad(torch.autograd.Function):
    """Identity forward; the backward applies ``edit`` to the gradient."""

    @staticmethod
    def forward(ctx, x, edit):
        ctx.edit = edit
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return ctx.edit(grad), None


def _grad_bug(fn, edit):
    """``fn`` with the gradient of its first input edited."""
    return lambda x, *rest, **kw: fn(_EditGrad.apply(x, edit), *rest, **kw)


def _output_bug(fn, edit):
    """``fn`` with its output edited."""
    return lambda *args, **kw: edit(fn(*args, **kw).clone())


def _zero_last_row(t):
    t[..., -1, :] = 0
    return t


def _head_wrong(t):  # attention (B, T, H, D): head 0; else the first of the last dim's columns
    if t.dim() == 4:
        t[..., 0, :] *= 0.5
    else:
        t[..., 0] *= 0.5
    return t


BUGS = {
    "grad_x0.7": lambda fn: _grad_bug(fn, lambda g: 0.7 * g),
    "grad_x2": lambda fn: _grad_bug(fn, lambda g: 2 * g),
    "grad_zero": lambda fn: _grad_bug(fn, torch.zeros_like),
    "grad_row_dropped": lambda fn: _grad_bug(fn, lambda g: _zero_last_row(g.clone())),
    "grad_head_wrong": lambda fn: _grad_bug(fn, lambda g: _head_wrong(g.clone())),
    "out_x0.7": lambda fn: _output_bug(fn, lambda t: 0.7 * t),
    "out_row_dropped": lambda fn: _output_bug(fn, _zero_last_row),
    "out_head_wrong": lambda fn: _output_bug(fn, _head_wrong),
}
NO_GRADIENT_OPS = ("newton_schulz",)  # forward only: its bugs are output bugs
FOUR_OPS = ("attention", "mlp", "cross_entropy", "newton_schulz")


def _register_bugs(monkeypatch, op):
    module = kernels._module(op)
    names = [name for name in BUGS if not (op in NO_GRADIENT_OPS and name.startswith("grad"))]
    if op == "cross_entropy":  # a scalar loss has no rows or heads to get wrong: only its gradient does
        names = [name for name in names if not name.startswith("out_") or name == "out_x0.7"]
    for name in names:
        monkeypatch.setitem(module.VARIANTS, name, BUGS[name](module.VARIANTS["torch"]))
    return names


@pytest.mark.parametrize("op", FOUR_OPS)
def test_every_injected_bug_is_reported_wrong(op, monkeypatch):
    """Gradient x0.7, x2, zeros, one row dropped, one head (or column) wrong, and output bugs, each on its own
    variant, through the benchmark's own check at the --quick shapes: all `wrong`, the reference `ok`."""
    names = _register_bugs(monkeypatch, op)
    case = kc.cases(op, kc.bench_config(CPU), True, False)[0]
    prob = kc.problem(case, torch.float32, CPU)
    checked = kb.correctness(case, prob, ["torch", *names], torch.float32, CPU, with_grads=prob.n_leaves > 0)
    assert checked["torch"][0] == "ok"
    assert {name: checked[name][0] for name in names} == dict.fromkeys(names, "wrong"), checked


def test_gradient_bugs_are_caught_at_the_recipes_vocabulary(monkeypatch):
    """N = 1024 rows of V = 50304 (the loss ~10 and every gradient entry <= 1/N: one tolerance for all
    tensors, scaled by the loss, would pass all of these; the recipe's 4096 rows took 30 s here)."""
    _register_bugs(monkeypatch, "cross_entropy")
    names = ["grad_x0.7", "grad_x2", "grad_zero"]  # the three the old single tolerance let through
    case = kc.Case("cross_entropy", "N=1024,V=50304", 1024, "tokens", True,
                   dict(N=1024, V=50304, cap=30.0, scale=7.5))
    prob = kc.problem(case, torch.float32, CPU)
    checked = kb.correctness(case, prob, names, torch.float32, CPU, with_grads=True)
    assert {name: checked[name][0] for name in names} == dict.fromkeys(names, "wrong")
    assert all("gradient of input 0" in checked[name][1] for name in names)


def test_an_unwritten_output_element_is_caught(monkeypatch):
    """A kernel that forgets to write an element: the check runs with poisoned (NaN) outputs."""
    if "triton" not in kernels.variants("mlp"):
        pytest.skip("Triton is not importable")

    def forgets_one(x, w_fc, w_proj):
        out = kernels.common.new_empty((x.shape[0], w_proj.shape[0]), x.dtype, x.device)
        out[1:] = kernels.get("mlp", "torch")(x, w_fc, w_proj)[1:].detach()
        return out

    monkeypatch.setitem(kernels.mlp.VARIANTS, "forgets_one", forgets_one)
    case = kc.cases("mlp", kc.bench_config(CPU), True, False)[0]
    prob = kc.problem(case, torch.float32, CPU)
    status, detail, err, _ = kb.correctness(case, prob, ["forgets_one"], torch.float32, CPU, False)["forgets_one"]
    assert status == "wrong" and err == math.inf


def test_a_second_run_on_the_same_day_gets_its_own_results_folder(tmp_path, monkeypatch):
    """The default folder is bench/results/<date>_<device>/; a later run that day must not write into an
    earlier run's results (the suite's second H100 run of 2026-11-27 would have)."""
    from speedrun.bench import measure

    monkeypatch.setattr(measure, "REPO_ROOT", tmp_path)
    cpu = torch.device("cpu")
    first = measure.results_dir(cpu)
    assert first.parent == tmp_path / "bench" / "results" and first.is_dir()
    assert measure.results_dir(cpu) == first  # still empty: the same folder
    (first / "kernels.csv").write_text("earlier results\n")
    second = measure.results_dir(cpu)
    assert second != first and second.is_dir() and second.name.endswith(first.name.split("_", 1)[1])
    assert (first / "kernels.csv").read_text() == "earlier results\n"
    assert measure.results_dir(cpu, str(tmp_path / "mine")) == tmp_path / "mine"
