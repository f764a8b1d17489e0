"""``speedrun bench kernels``: every variant of every hot op, checked against the reference, then timed.

For each op, shape (speedrun/bench/kernel_cases.py) and variant:

1. Correctness, on the very inputs that get timed: the variant's output and, for the modes with a
   backward, each of its input gradients, one tensor at a time, against the reference, which is the op's
   ``torch`` variant on the same inputs upcast to fp32. A variant is *wrong* when any tensor's max abs error
   exceeds that tensor's tolerance, max(2 x PyTorch's own error for that tensor in that dtype,
   RTOL[dtype] x max|reference tensor|), where PyTorch's own error is the largest error of the
   PyTorch-implemented variants (``torch``, and ``sdpa`` for attention) run eagerly in that dtype (Tri Dao's
   rule; the floor covers fp32, where PyTorch's error is ~0). Kernel outputs are poisoned (NaN) before the
   variant runs, so an element it never writes is an error. A wrong variant is reported as ``wrong`` (which
   tensor, by how much) and not timed; a variant that raises is reported as ``error`` (out of memory:
   ``skipped``).
2. Timing (speedrun/bench/measure.py): median, p20, p80 per mode. The forward runs with inputs that
   require grad (as in training: it saves what the backward needs); ``bwd`` times the backward alone
   on a retained graph; ``fwd+bwd`` both.
3. Derived: TFLOP/s and GB/s from the counted FLOPs and minimum bytes, as % of the device's peaks measured
   in the same run, speed-up vs the eager reference and vs its torch.compile, peak memory (GPU).

Variants: ``torch`` (the op's reference, eager), ``torch_compile`` (the same function under
``torch.compile``), and every other variant the op registers in its ``VARIANTS`` (``triton``; for
attention also ``sdpa`` and ``flex``).
"""

from __future__ import annotations

import argparse
import math
import sys

import torch

import kernels
import kernels.common
from speedrun.bench import kernel_cases as kc
from speedrun.bench.cli import add_common_arguments
from speedrun.bench.kernels_report import Row, fmt, plot, table, to_csv
from speedrun.bench.measure import (
    PeakMemory,
    bench_device,
    device_name,
    measure_peaks,
    results_dir,
    time_fn,
    versions,
)
from speedrun.data.shards import atomic_write_text
from speedrun.runlog import repo_or_absolute_path, utc_now

RTOL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
PYTORCH_VARIANTS = ("torch", "sdpa")  # eager PyTorch implementations: their error defines "PyTorch's own"
COMPILED = "torch_compile"


def bench_variants(op: str) -> list[str]:
    """The eager reference, its torch.compile, then the op's other registered variants."""
    registered = kernels.variants(op)
    return ["torch", COMPILED] + [v for v in registered if v != "torch"]


_compiled: dict[str, object] = {}


def variant_fn(op: str, variant: str):
    if variant == COMPILED:
        if op not in _compiled:
            _compiled[op] = kernels.common.compile_static(kernels.get(op, "torch"))
        return _compiled[op]
    return kernels.get(op, variant)


# --------------------------------------------------------------------------------------------------
# Running one variant
# --------------------------------------------------------------------------------------------------

def _fresh(prob: kc.Problem) -> tuple[list, tuple]:
    """New leaf tensors for the differentiated inputs (so no .grad accumulates); the rest as they are."""
    leaves = [a.detach().requires_grad_() for a in prob.args[:prob.n_leaves]]
    return leaves, (*leaves, *prob.args[prob.n_leaves:])


def results(fn, prob: kc.Problem, with_grads: bool) -> list[torch.Tensor]:
    """[output, grads of the leaves...] of one call (the grads only when ``with_grads``)."""
    leaves, args = _fresh(prob)
    if not with_grads or prob.n_leaves == 0:
        with torch.no_grad():
            return [_primary(fn(*args, **prob.kwargs)).detach()]
    out = _primary(fn(*args, **prob.kwargs))
    return [out.detach(), *torch.autograd.grad(out, leaves, prob.grad_out)]


def _primary(out):
    """An op's main output: itself, or the first of a tuple (mlp_fp8 also returns its activation amax)."""
    return out[0] if isinstance(out, tuple) else out


def tensor_errors(got: list[torch.Tensor], ref: list[torch.Tensor]) -> list[tuple[float, float]]:
    """(max abs error, max |reference|) of each result tensor; a wrong shape or NaN/inf in ``got`` gives inf."""
    out = []
    for g, r in zip(got, ref, strict=True):
        scale = float(r.float().abs().max()) if r.numel() else 0.0  # float(): FP8 outputs (quantize_down)
        if g.shape != r.shape:
            out.append((math.inf, scale))
            continue
        d = (g.float() - r.float()).abs()
        out.append((math.inf if not bool(torch.isfinite(d).all()) else float(d.max()) if d.numel() else 0.0, scale))
    return out


def result_names(n: int) -> list[str]:
    return ["output"] + [f"gradient of input {i}" for i in range(n - 1)]


def timed_call(fn, prob: kc.Problem, mode: str):
    """A no-argument callable doing ``mode`` once (the graph of ``bwd`` is built here, once)."""
    leaves, args = _fresh(prob)
    if mode == "fwd" or prob.n_leaves == 0:
        return lambda: fn(*args, **prob.kwargs)
    if mode == "bwd":
        out = _primary(fn(*args, **prob.kwargs))
        return lambda: torch.autograd.grad(out, leaves, prob.grad_out, retain_graph=True)
    return lambda: torch.autograd.grad(_primary(fn(*args, **prob.kwargs)), leaves, prob.grad_out)


# --------------------------------------------------------------------------------------------------
# The benchmark
# --------------------------------------------------------------------------------------------------

def run(ops, variants, modes, dtype, device, quick, peaks, shapes="all", log=print) -> list[Row]:
    """Rows for every op x case x variant x mode asked for (see the module docstring)."""
    cfg = kc.bench_config(device)
    meta = dict(dtype=str(dtype).removeprefix("torch."), device=device_name(device), **_versions_row(),
                timestamp=utc_now())
    rows = []
    for op in ops:
        op_variants = [v for v in bench_variants(op) if variants is None or v in variants]
        op_modes = [m for m in kc.op_modes(op) if m in modes]
        for case in kc.cases(op, cfg, quick, device.type == "cuda"):
            if shapes == "recipe" and not case.recipe:
                continue
            case_rows = _bench_case(case, op_variants, op_modes, dtype, device, quick, peaks, meta, log)
            rows += case_rows
    return rows


def _versions_row() -> dict:
    v = versions()
    return {"torch": v["torch"], "triton": v["triton"]}


def correctness(case, prob, op_variants, dtype, device, with_grads) -> dict[str, tuple]:
    """variant -> (status, detail, max error, tolerance): each variant checked against the fp32 reference."""
    try:
        ref = results(kernels.get(case.op, "torch"), kc.as_reference(prob), with_grads)
        pytorch_err = [0.0] * len(ref)
        for v in PYTORCH_VARIANTS:
            if v in kernels.variants(case.op):
                errs = _pytorch_errors(case.op, v, prob, ref, with_grads, device)
                pytorch_err = [max(a, b) for a, b in zip(pytorch_err, errs, strict=True)]
    except Exception as e:  # e.g. the fp32 reference does not fit in memory: nothing can be checked
        _free(device)
        return {v: ("skipped", f"reference could not run: {_describe(e)}", None, None) for v in op_variants}
    checked = {v: _check(case, v, prob, ref, pytorch_err, with_grads, dtype, device) for v in op_variants}
    del ref
    return checked


def _bench_case(case, op_variants, op_modes, dtype, device, quick, peaks, meta, log) -> list[Row]:
    prob = kc.problem(case, dtype, device)
    with_grads = any(m != "fwd" for m in op_modes) and prob.n_leaves > 0
    checked = correctness(case, prob, op_variants, dtype, device, with_grads)
    rows, times = [], {}
    for variant in op_variants:
        base = dict(op=case.op, variant=variant, shape=case.label, size=case.size, size_name=case.size_name,
                    recipe=case.recipe, **meta)
        status, detail, err, tol = checked[variant]
        variant_rows = {}
        for mode in op_modes:
            row = Row(**base, mode=mode, status=status, detail=detail, max_error=err, tolerance=tol,
                      **dict.fromkeys(("median_ms", "p20_ms", "p80_ms", "tflops", "gbps", "pct_peak_flops",
                                       "pct_peak_bw", "speedup_vs_torch", "speedup_vs_compile", "peak_mem_mib")))
            if status == "ok":
                _time_row(row, variant_fn(case.op, variant), prob, mode, device, quick, peaks)
            variant_rows[mode] = row
        _derive_bwd(variant_rows, prob, peaks)
        for row in variant_rows.values():
            times[(variant, row.mode)] = row.median_ms
            rows.append(row)
            log(_progress_line(row))
    for row in rows:
        if row.median_ms:
            for attr, other in (("speedup_vs_torch", "torch"), ("speedup_vs_compile", COMPILED)):
                base_ms = times.get((other, row.mode))
                setattr(row, attr, base_ms / row.median_ms if base_ms else None)
    del prob
    _free(device)
    return rows


def _pytorch_errors(op, variant, prob, ref, with_grads, device) -> list[float]:
    """Each result tensor's max error for an eager PyTorch variant in the problem's dtype; zeros when it cannot
    run this case (e.g. sdpa's T x T mask does not fit: its own row then says why)."""
    try:
        return [err for err, _ in tensor_errors(results(kernels.get(op, variant), prob, with_grads), ref)]
    except Exception:
        _free(device)
        return [0.0] * len(ref)


def _check(case, variant, prob, ref, pytorch_err, with_grads, dtype, device):
    """(status, detail, max error, tolerance) of ``variant`` on ``prob``: every result tensor within its own
    tolerance; the error and tolerance reported are those of the tensor furthest off (relative to its own)."""
    try:
        with kernels.common.poisoned_outputs():
            got = results(variant_fn(case.op, variant), prob, with_grads)
    except Exception as e:  # a variant that cannot run this case is reported, the benchmark goes on
        _free(device)
        status = "skipped" if isinstance(e, torch.OutOfMemoryError) else "error"  # too big here, or broken
        return status, _describe(e), None, None
    checks = []
    for name, (err, scale), own in zip(result_names(len(ref)), tensor_errors(got, ref), pytorch_err, strict=True):
        tol = max(2 * own, RTOL.get(dtype, 1e-4) * scale)
        checks.append((err / tol if tol > 0 else (0.0 if err == 0 else math.inf), name, err, tol))
    _, name, err, tol = max(checks)
    if not err <= tol:
        return "wrong", f"{name}: max error {err:.3g} > tolerance {tol:.3g}", err, tol
    return "ok", "", err, tol


def _time_row(row: Row, fn, prob, mode, device, quick, peaks) -> None:
    try:
        call = timed_call(fn, prob, mode)
        with PeakMemory(device) as mem:
            call()  # compilation / autotuning finish here, before any timing
        t = time_fn(call, device, quick)
    except Exception as e:
        _free(device)
        row.status, row.detail = "error", _describe(e)
        return
    row.median_ms, row.p20_ms, row.p80_ms, row.peak_mem_mib = t.median_ms, t.p20_ms, t.p80_ms, mem.mib
    _rates(row, prob, peaks)


def _derive_bwd(by_mode: dict, prob, peaks) -> None:
    """A backward that cannot run twice on one graph (the triton cross-entropy hands its gradient buffer
    over) cannot be timed alone: its time is then fwd+bwd minus fwd (no percentiles), and the row says so."""
    fwd, bwd, both = (by_mode.get(m) for m in ("fwd", "bwd", "fwd+bwd"))
    if not (bwd and fwd and both and bwd.status == "error" and fwd.median_ms and both.median_ms):
        return
    diff = both.median_ms - fwd.median_ms
    bwd.status, bwd.peak_mem_mib = "ok", both.peak_mem_mib
    if diff <= 0.02 * both.median_ms:  # e.g. a forward that already computed the gradient
        bwd.detail = (f"not measurable alone: fwd+bwd minus fwd = {diff:.3g} ms is within the noise "
                      "(the backward cannot run twice on one graph)")
        return
    bwd.detail = "derived: fwd+bwd minus fwd (the backward cannot run twice on one graph)"
    bwd.median_ms = diff
    _rates(bwd, prob, peaks)


def _rates(row: Row, prob, peaks) -> None:
    flops, nbytes = prob.flops.get(row.mode), prob.min_bytes.get(row.mode)
    seconds = row.median_ms * 1e-3
    if seconds <= 0:
        return
    if flops:
        row.tflops = flops / seconds / 1e12
        row.pct_peak_flops = 100 * row.tflops / peaks.matmul_tflops
    if nbytes:
        row.gbps = nbytes / seconds / 1e9
        row.pct_peak_bw = 100 * row.gbps / peaks.copy_gbps


def _describe(e: Exception) -> str:
    first_line = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {first_line}"[:200]


def _free(device):
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _progress_line(r: Row) -> str:
    what = f"{r.op:14s} {r.shape:18s} {r.variant:14s} {r.mode:8s}"
    if r.status != "ok":
        return f"  {what} {r.status.upper()}: {r.detail}"
    return f"  {what} {fmt(r.median_ms, '10.3f')} ms" + (f"  ({r.detail})" if r.detail else "")


# --------------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------------

def _choices(text: str, allowed, what: str) -> list[str]:
    items = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in items if s not in allowed]
    if not items or bad:
        raise argparse.ArgumentTypeError(f"unknown {what} {', '.join(bad) or repr(text)}; choose from "
                                         f"{', '.join(allowed)} (comma-separated)")
    return items


def add_arguments(p: argparse.ArgumentParser) -> None:
    ops = list(kernels.OP_MODULES)
    p.add_argument("--op", type=lambda s: _choices(s, ops, "op"), default=ops, help=f"ops ({', '.join(ops)})")
    p.add_argument("--variant", type=lambda s: [x.strip() for x in s.split(",") if x.strip()], default=None,
                   help="variants (default: all; e.g. torch,torch_compile,triton,sdpa,flex)")
    p.add_argument("--mode", type=lambda s: _choices(s, kc.MODES, "mode"), default=list(kc.MODES),
                   help="fwd, bwd, fwd+bwd (default: all)")
    p.add_argument("--shapes", choices=["all", "recipe"], default="all",
                   help="the recipe's shapes only, or also the sweep over the main size (default: all)")
    p.add_argument("--quick", action="store_true", help="the recipe's shapes only, fewer timing repetitions")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default=None,
                   help="input dtype (default: bfloat16 on GPU, float32 on CPU)")
    add_common_arguments(p)


def kernels_command(args) -> int:
    device = bench_device(args.device)
    if args.variant is not None:
        known = sorted({v for op in args.op for v in bench_variants(op)})
        unknown = [v for v in args.variant if v not in known]
        if unknown or not args.variant:
            raise SystemExit(f"unknown variant {', '.join(unknown) or '(none)'}; variants of "
                             f"{', '.join(args.op)} here: {', '.join(known)}")
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    cpu = device.type == "cpu"
    if cpu and dtype == torch.bfloat16:
        raise SystemExit("--dtype bfloat16 on CPU: the Triton interpreter's bf16 dot is wrong; use float32 or float16")
    out_dir = results_dir(device, args.out)
    print(f"bench kernels on {device_name(device)}, {dtype}, torch {torch.__version__}; "
          f"results in {repo_or_absolute_path(out_dir)}")
    if cpu:
        print("note: CPU run (Triton interpreter): correctness checks and the report pipeline only; "
              "the times mean nothing")
    with kernels.common.interpreter_settings_for_model_runs(device):  # CPU: the interpreter's large tiles
        peaks = measure_peaks(device, dtype, args.quick)
        print(f"measured peaks: matmul {peaks.matmul_tflops:.2f} TFLOP/s ({peaks.dtype}, n={peaks.matmul_n}), "
              f"copy {peaks.copy_gbps:.1f} GB/s")
        shapes = "recipe" if args.quick else args.shapes
        rows = run(args.op, args.variant, args.mode, dtype, device, args.quick, peaks, shapes)
    text = table(rows)
    print(text)
    header = (f"# {device_name(device)}, torch {torch.__version__}, {dtype}; peaks measured: matmul "
              f"{peaks.matmul_tflops:.2f} TFLOP/s, copy {peaks.copy_gbps:.1f} GB/s"
              + ("; CPU interpreter run: times mean nothing" if cpu else ""))
    atomic_write_text(out_dir / "kernels.csv", to_csv(rows))
    atomic_write_text(out_dir / "kernels.txt", header + "\n" + text + "\n")
    for op in args.op:
        plot(rows, op, out_dir / f"kernels_{op}.png", cpu)
    wrong = [r for r in rows if r.status in ("wrong", "error")]
    print(f"wrote {repo_or_absolute_path(out_dir / 'kernels.csv')}, kernels.txt, kernels_<op>.png; "
          f"{sum(r.status == 'ok' for r in rows)} timed, {len(wrong)} wrong or failed")
    return 1 if wrong else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="speedrun bench kernels")
    add_arguments(parser)
    sys.exit(kernels_command(parser.parse_args()))
